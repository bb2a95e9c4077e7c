"""Argument checks of :func:`t3s_kernels.block_diffusion.block_diffusion_union_mask`: every failure is a
``TypeError`` / ``ValueError`` naming the argument, raised before any work and the same in every backend."""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from t3s_kernels._guards import reject_meta, reject_transforms

WEIGHT_MODES = ("t3s_split", "uniform", "elbo_naive")
T_MODES = ("per_block", "per_sequence")
SAMPLERS = ("iid", "bd3lm", "stratified_perm")
MAX_G = 2**32  # the Philox counter's token index space


class UnionMaskArgs(NamedTuple):
    """The checked arguments, normalised: Python ints, and flat contiguous bool masks (None when not given)."""

    mask_token_id: int
    seed: int
    step: int
    token_offset: int
    maskable: torch.Tensor
    targets: torch.Tensor | None
    valid: torch.Tensor | None


def as_mask(name: str, x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer 0/1, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device}, input_ids on {like.device}")
    return x.reshape(-1).to(torch.bool).contiguous()


def check_mask_token_id(mask_token_id, ids_dtype: torch.dtype, vocab_size) -> int:
    """``mask_token_id`` as an int that every backend writes unchanged: an integer (not a bool or a float), in
    ``[0, vocab_size)`` when ``vocab_size`` is given, and representable in the id dtype."""
    if isinstance(vocab_size, bool) or (vocab_size is not None and not isinstance(vocab_size, int)):
        raise TypeError(f"vocab_size must be None or an int, got {type(vocab_size).__name__} {vocab_size!r}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    not_int = TypeError(f"mask_token_id must be an int token id, got {type(mask_token_id).__name__} {mask_token_id!r}")
    if isinstance(mask_token_id, bool):  # operator.index would take True as 1
        raise not_int
    try:
        mid = operator.index(mask_token_id)  # ints, numpy / torch integer scalars; a float (3.7) is refused
    except TypeError:
        raise not_int from None
    if mid < 0:
        raise ValueError(f"mask_token_id must be a token id >= 0, got {mid}")
    if vocab_size is not None and mid >= vocab_size:
        raise ValueError(f"mask_token_id={mid} is outside the vocabulary [0, vocab_size={vocab_size})")
    id_max = torch.iinfo(ids_dtype).max
    if mid > id_max:
        raise ValueError(f"mask_token_id={mid} does not fit input_ids' dtype {ids_dtype} (max {id_max})")
    return mid


def check_union_mask_args(
    input_ids, maskable, *, block_size, mask_token_id, vocab_size, targets, valid, cu_seqlens, eps_min, eps_max,
    t_mode, sampler, noise_level, weight_mode, target_weight, seed, step, token_offset,
) -> UnionMaskArgs:
    """Everything that can be checked before the layout is built (the layout checks ``cu_seqlens``' values and
    the number of ``noise_level`` entries; :func:`check_inverse_weights` the noise levels ``elbo_naive`` needs)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [B, L] or packed [T], got shape {tuple(input_ids.shape)}")
    mask_token_id = check_mask_token_id(mask_token_id, input_ids.dtype, vocab_size)
    masks = dict(input_ids=input_ids, maskable=maskable, targets=targets, valid=valid, cu_seqlens=cu_seqlens,
                 noise_level=noise_level)
    reject_transforms("block_diffusion_union_mask", "Call it outside the transform, on the whole batch.", **masks)
    reject_meta("block_diffusion_union_mask", "it reads the number of blocks on the host to size its outputs",
                **masks)
    if cu_seqlens is not None and input_ids.dim() != 1:
        raise ValueError("cu_seqlens needs packed input_ids of shape [T]")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not (0.0 <= eps_min <= eps_max <= 1.0):
        raise ValueError(f"need 0 <= eps_min <= eps_max <= 1, got eps_min={eps_min}, eps_max={eps_max}")
    if t_mode not in T_MODES:
        raise ValueError(f"t_mode must be one of {T_MODES}, got {t_mode!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
    if not (0 <= int(seed) < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not (0 <= int(step) < 2**31):
        raise ValueError(f"step must be in [0, 2**31), got {step}")
    if not (float(target_weight) == float(target_weight)) or abs(float(target_weight)) == float("inf"):
        raise ValueError(f"target_weight must be finite, got {target_weight}")
    seed, step, token_offset = int(seed), int(step), int(token_offset)
    T = input_ids.numel()
    if token_offset < 0 or token_offset + T > MAX_G:
        raise ValueError(f"token_offset + number of tokens must lie in [0, 2**32], got {token_offset} + {T}")
    maskable_f = as_mask("maskable", maskable, input_ids)
    if maskable_f is None:
        raise TypeError("maskable is required")
    return UnionMaskArgs(mask_token_id, seed, step, token_offset, maskable_f, as_mask("targets", targets, input_ids),
                         as_mask("valid", valid, input_ids))


def check_inverse_weights(t_blk: torch.Tensor, *, weight_mode: str, has_targets: bool, explicit_noise: bool,
                          eps_min: float, eps_max: float, complementary: bool) -> None:
    """``elbo_naive`` puts ``1/t`` on targets (and ``1/(1 − t)`` in the complementary view): t must stay off 0 / 1."""
    if weight_mode != "elbo_naive" or not has_targets:
        return
    if not explicit_noise and (eps_min <= 0 or (complementary and eps_max >= 1)):
        raise ValueError("weight_mode='elbo_naive' puts 1/t on targets: needs eps_min > 0 (and eps_max < 1 with "
                         "complementary=True)")
    if bool((t_blk <= 0).any()):
        raise ValueError("weight_mode='elbo_naive' puts 1/t on targets: needs t > 0 (eps_min > 0)")
    if complementary and bool((t_blk >= 1).any()):
        raise ValueError("weight_mode='elbo_naive' with complementary=True needs t < 1 (eps_max < 1)")
