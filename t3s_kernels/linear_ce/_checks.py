"""Argument checks of :func:`~t3s_kernels.linear_cross_entropy` that need more than a type test.

Value checks (target range, finite / non-negative weights, the normaliser) follow one rule, :func:`require`: on
CPU (and with ``T3S_CHECK_INPUTS=1`` everywhere) they raise ``ValueError`` eagerly; on CUDA an eager check would
force a host sync on every call, so they run as ``torch._assert_async`` (device-side assert, no sync); on meta
tensors there are no values to check and they are skipped.

What signed weights mean (the choice documented in the functional and the README):

* ``reduction="sum"`` / ``"none"``: any finite weight, negative included (RL-style signed per-token weights such
  as advantages); weight 0 ≡ ignored.
* ``reduction="mean"`` without ``normalizer``: the denominator is ``Σ wᵢ``, which for signed weights can be 0 or
  negative with tokens left, so a negative weight is an error.
* ``reduction="mean"`` with ``normalizer``: the denominator is the normaliser, not the weights, so signed weights
  are allowed; the normaliser must be finite and ``>= 0``, and 0 only when no weighted token is left (an empty
  optimizer step: loss 0, gradients 0). A mean never silently becomes a sum.
"""

from __future__ import annotations

import math
import operator
import os

import torch

from .._guards import reject_transforms
from .._triton import IMPLS
from .chunked import WEIGHT_GRAD_ACCUMULATIONS

__all__ = [
    "check_chunked_args",
    "check_tensor",
    "check_token_weight",
    "resolve_compute_dtype",
    "validate_inputs",
    "NEGATIVE_MEAN_WEIGHT",
    "check_class_weight",
    "check_mean_weights",
    "check_normalizer",
    "check_normalizer_not_empty",
    "check_shift",
    "fold_class_weight",
    "require",
    "value_check_mode",
]


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

NEGATIVE_MEAN_WEIGHT = (
    "token_weight must be >= 0 for reduction='mean' without a normalizer (the denominator Σ wᵢ of a weighted mean "
    "is undefined for signed weights); signed (RL-style) weights work with reduction='sum' / 'none', or with "
    "reduction='mean' and an explicit normalizer"
)


def value_check_mode(device: torch.device) -> str:
    """``"skip"`` on meta tensors, ``"async"`` under ``torch.compile``, ``"eager"`` off CUDA or with
    ``T3S_CHECK_INPUTS=1``, else ``"async"``."""
    if device.type == "meta":
        return "skip"
    if torch.compiler.is_compiling():  # a traced graph must not sync with the host
        return "async"
    if device.type != "cuda" or os.environ.get("T3S_CHECK_INPUTS", "0") == "1":
        return "eager"
    return "async"


def require(ok: torch.Tensor, message: str, device: torch.device) -> None:
    """Raise ``ValueError(message)`` unless the bool scalar ``ok`` holds (eagerly, asynchronously or not at all,
    per :func:`value_check_mode`)."""
    mode = value_check_mode(device)
    if mode == "eager":
        if not bool(ok):
            raise ValueError(message)
    elif mode == "async":
        torch._assert_async(ok, message)


def check_shift(shift, targets: torch.Tensor, fn: str) -> int:
    """``shift`` as a token count: ``False`` → 0, ``True`` → 1, an int ``k >= 0`` → ``k`` (Cut Cross-Entropy's
    ``shift``); anything else is a ``TypeError`` (a float or a string is never rounded into a shift)."""
    if isinstance(shift, bool):
        k = int(shift)
    else:
        try:
            k = operator.index(shift)
        except TypeError:
            raise TypeError(
                f"{fn}: shift must be a bool or a non-negative int (position t is scored against "
                f"targets[..., t + shift]), got {type(shift).__name__} {shift!r}"
            ) from None
        if k < 0:
            raise ValueError(f"{fn}: shift must be >= 0 (position t is scored against targets[..., t + shift]), "
                             f"got {k}")
    if k and targets.dim() < 1:
        raise ValueError(f"{fn}: shift={shift!r} needs targets with a sequence dim [..., T], got a 0-d tensor")
    return k


def check_normalizer(normalizer, reduction: str, fn: str) -> None:
    """Type, shape and value of ``normalizer``: finite and ``>= 0`` (0 is checked further once the active tokens
    are known, by :func:`check_normalizer_not_empty`)."""
    if reduction != "mean":
        raise ValueError(f"{fn}: normalizer only applies to reduction='mean', got reduction={reduction!r}")
    msg = f"{fn}: normalizer must be finite and >= 0 (it is the denominator of the mean)"
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"{fn}: normalizer must be a one-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"{fn}: normalizer must be a real number tensor, got {normalizer.dtype}")
        n = normalizer.detach().reshape(())
        if value_check_mode(n.device) == "eager":
            value = n.item()
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{msg}, got tensor({value!r})")
        else:
            require((n >= 0) & torch.isfinite(n) if n.is_floating_point() else n >= 0, msg, n.device)
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        kind = type(normalizer).__name__
        raise TypeError(f"{fn}: normalizer must be a float or a one-element tensor, got {kind}")
    elif not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"{msg}, got {normalizer!r}")


def check_normalizer_not_empty(normalizer, targets: torch.Tensor, token_weight, ignore_index: int, fn: str) -> None:
    """A zero ``normalizer`` is accepted only when no token with a nonzero weight is left (the mean of nothing is
    0): a zero normaliser with tokens to score would otherwise have to become a sum or an inf."""
    if isinstance(normalizer, torch.Tensor):
        n = normalizer.detach().reshape(()).to(targets.device)
    elif normalizer == 0:
        n = None
    else:
        return
    active = targets != ignore_index
    if token_weight is not None:
        active = active & (token_weight != 0)
    nothing_left = ~active.any()
    ok = nothing_left if n is None else (n != 0) | nothing_left
    require(ok, f"{fn}: normalizer is 0 but some tokens have a nonzero weight: the mean is undefined "
                "(pass the total weight of the whole step, > 0)", targets.device)


def check_class_weight(class_weight, V: int, device: torch.device, *, label_smoothing: float, signed_ok: bool,
                       fn: str) -> None:
    """``class_weight``: a finite float ``[V]`` tensor on the inputs' device, ``>= 0`` unless signed weights are
    allowed (see the module docstring); not combined with label smoothing."""
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"{fn}: class_weight must be a torch.Tensor of shape [V], got {type(class_weight).__name__}")
    if tuple(class_weight.shape) != (V,):
        raise ValueError(f"{fn}: class_weight must have shape [V] = ({V},), got {tuple(class_weight.shape)}")
    if not class_weight.is_floating_point():
        raise TypeError(f"{fn}: class_weight must be a float tensor, got {class_weight.dtype}")
    if class_weight.device != device:
        raise ValueError(f"{fn}: class_weight must be on {device}, got {class_weight.device}")
    if label_smoothing > 0:
        raise ValueError(
            f"{fn}: class_weight with label_smoothing > 0 is not supported: torch.nn.functional.cross_entropy then "
            "weights the smoothing term's log-prob of every class by its class weight, which is not a per-token "
            "weight; use one of the two, or F.cross_entropy on materialised logits"
        )
    cw = class_weight.detach()
    ok = torch.isfinite(cw).all()
    if not signed_ok:
        ok = ok & (cw >= 0).all()
    what = "finite" if signed_ok else "finite and >= 0 for reduction='mean' without a normalizer"
    require(ok, f"{fn}: class_weight must be {what}", device)


def fold_class_weight(class_weight: torch.Tensor, targets: torch.Tensor, token_weight, ignore_index: int):
    """The per-token weight ``token_weight · class_weight[targets]`` (``class_weight[targets]`` alone without
    ``token_weight``); ignored positions get weight 0. Exact: without label smoothing F.cross_entropy's class
    weight is a per-token weight with the weighted-mean denominator ``Σ class_weight[yᵢ]``."""
    active = targets != ignore_index
    safe = torch.where(active, targets, torch.zeros_like(targets)).long()
    cw = class_weight.detach()[safe] * active
    if token_weight is None:
        return cw
    return token_weight.detach().to(torch.promote_types(token_weight.dtype, cw.dtype)) * cw


def check_mean_weights(targets: torch.Tensor, token_weight, normalizer, ignore_index: int, fn: str) -> None:
    """The rules of ``reduction="mean"`` for a caller that reduces per-token losses itself (``targets`` and
    ``token_weight`` already aligned, e.g. shifted): weights ``>= 0`` without a normaliser, else a valid one."""
    if normalizer is None:
        if token_weight is not None and token_weight.numel():
            require((token_weight.detach() >= 0).all(), f"{fn}: {NEGATIVE_MEAN_WEIGHT}", token_weight.device)
        return
    check_normalizer(normalizer, "mean", fn)
    check_normalizer_not_empty(normalizer, targets, token_weight, ignore_index, fn)


def check_tensor(name: str, t, *, shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")


def validate_inputs(
    hidden, weight, targets, bias, *, ignore_index, softcap, temperature, impl, fn: str, vocab_size: int | None = None,
    master_ok: bool = False,
) -> tuple[int, int]:
    """Types, shapes, devices and the target range; ``(V_local, D)``. ``master_ok``: fp32 weights with half
    ``hidden`` (a ``compute_dtype`` was given)."""
    check_tensor("hidden", hidden, shape_hint="[..., D]")
    check_tensor("weight", weight, shape_hint="[V, D]")
    check_tensor("targets", targets, shape_hint="[...] (hidden.shape[:-1])")
    reject_transforms(
        fn, "Call it outside the transform: hidden [..., D] takes any leading batch dims (instead of vmap), "
        "gradients come from torch.autograd (loss.backward() / torch.autograd.grad), and reduction='none' gives "
        "per-token losses whose backward takes any per-token upstream gradient.",
        hidden=hidden, weight=weight, targets=targets, bias=bias,
    )
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have shape [..., D] (at least 1-D), got a 0-d tensor")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden must be float16/bfloat16/float32/float64, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{fn}: hidden's last dim ({hidden.shape[-1]}) must equal weight.shape[1] (D={D}); "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if V < 1:
        raise ValueError(f"{fn}: weight must have at least one row (V >= 1), got shape {tuple(weight.shape)}")
    master = weight.dtype == torch.float32 and hidden.dtype in (torch.float16, torch.bfloat16) and master_ok
    if weight.dtype != hidden.dtype and not master:
        raise TypeError(
            f"{fn}: weight dtype ({weight.dtype}) must equal hidden dtype ({hidden.dtype}), or be float32 (master "
            "weights) with compute_dtype= set to hidden's half dtype (torch.autocast sets it)"
        )
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(
            f"{fn}: hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, "
            f"{targets.device}"
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{fn}: targets must be an integer tensor (class indices), got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{fn}: targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, shape_hint="[V]")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{fn}: bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a float tensor, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{fn}: bias must be on {hidden.device}, got {bias.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (temperature > 0):
        raise ValueError(f"{fn}: temperature must be a float > 0, got {temperature!r}")
    if temperature == float("inf"):
        raise ValueError(f"{fn}: temperature must be finite, got {temperature!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not (0 < softcap < float("inf"))
    ):
        raise ValueError(f"{fn}: softcap must be None or a finite float > 0, got {softcap!r}")
    # targets in [0, V) or == ignore_index (V global under vocabulary parallelism)
    V_local, V = V, (vocab_size or V)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if value_check_mode(hidden.device) == "eager":
        if targets.numel() and bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"{fn}: targets must be in [0, V={V}) or equal ignore_index={ignore_index}; found {first}"
            )
    elif targets.numel() and value_check_mode(hidden.device) == "async":
        torch._assert_async(~bad.any(), f"{fn}: targets must be in [0, V={V}) or equal ignore_index={ignore_index}")
    return V_local, D


def check_token_weight(token_weight, targets, fn: str, *, signed_ok: bool = True) -> None:
    """``signed_ok=False`` (``reduction="mean"`` without a normaliser): the weights are the mean's denominator,
    so they must be ``>= 0`` (see :mod:`._checks` for what signed weights mean)."""
    check_tensor("token_weight", token_weight, shape_hint="[...] (same shape as targets)")
    reject_transforms(fn, "Call it outside the transform.", token_weight=token_weight)
    if not token_weight.is_floating_point():
        raise TypeError(f"{fn}: token_weight must be a float tensor, got {token_weight.dtype}")
    if tuple(token_weight.shape) != tuple(targets.shape):
        raise ValueError(
            f"{fn}: token_weight must have the shape of targets {tuple(targets.shape)}, got {tuple(token_weight.shape)}"
        )
    if token_weight.device != targets.device:
        raise ValueError(f"{fn}: token_weight must be on {targets.device}, got {token_weight.device}")
    if token_weight.numel():
        tw = token_weight.detach()
        require(torch.isfinite(tw).all(), f"{fn}: token_weight must be finite (found NaN or inf)",
                        tw.device)
        if not signed_ok:
            require((tw >= 0).all(), f"{fn}: {NEGATIVE_MEAN_WEIGHT}", tw.device)


def check_chunked_args(fn, active_rows, workspace_bytes, weight_grad_accumulation, device) -> None:
    if active_rows is not None:
        if not isinstance(active_rows, torch.Tensor):
            kind = type(active_rows).__name__
            raise TypeError(f"{fn}: active_rows must be a 1-D int64 tensor of row indices, got {kind}")
        if active_rows.dim() != 1 or active_rows.dtype != torch.int64:
            raise ValueError(
                f"{fn}: active_rows must be a 1-D int64 tensor, got shape {tuple(active_rows.shape)} "
                f"{active_rows.dtype}"
            )
        if active_rows.device != device:
            raise ValueError(f"{fn}: active_rows must be on {device}, got {active_rows.device}")
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1
    ):
        raise ValueError(f"{fn}: workspace_bytes must be None or a positive int, got {workspace_bytes!r}")
    if weight_grad_accumulation not in WEIGHT_GRAD_ACCUMULATIONS:
        raise ValueError(
            f"{fn}: weight_grad_accumulation must be one of {WEIGHT_GRAD_ACCUMULATIONS}, "
            f"got {weight_grad_accumulation!r}"
        )


def resolve_compute_dtype(hidden, weight, compute_dtype, fn: str):
    """``hidden`` in the call's compute dtype. ``compute_dtype=None``: unchanged (``weight`` must then match it).
    Else one of fp16 / bf16 / fp32: ``hidden`` is cast to it (differentiably), and ``weight`` must be of that
    dtype or fp32 (master weights, read rounded to the compute dtype, their gradient accumulated in fp32)."""
    if compute_dtype is None:
        return hidden
    if compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{fn}: compute_dtype must be None or one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")
    if isinstance(weight, torch.Tensor) and weight.dtype not in (compute_dtype, torch.float32):
        raise TypeError(f"{fn}: with compute_dtype={compute_dtype}, weight must be {compute_dtype} or torch.float32 "
                        f"(master weights), got {weight.dtype}")
    if isinstance(hidden, torch.Tensor) and hidden.dtype in _COMPUTE_DTYPES and hidden.dtype != compute_dtype:
        hidden = hidden.to(compute_dtype)
    return hidden
