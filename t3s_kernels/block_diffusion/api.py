"""Public op: :func:`block_diffusion_union_mask` (validation, defaults, noise-level sampling, dispatch on ``impl``)."""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from t3s_kernels._guards import reject_meta, reject_transforms
from t3s_kernels._triton import resolve_impl
from t3s_kernels.block_diffusion import reference as _ref

__all__ = ["COUNT_COLUMNS", "ComplementView", "UnionMaskOutput", "block_diffusion_union_mask"]

COUNT_COLUMNS = ("n_maskable", "n_random", "n_union", "n_target", "n_forced")
WEIGHT_MODES = ("t3s_split", "uniform", "elbo_naive")
T_MODES = ("per_block", "per_sequence")
SAMPLERS = ("iid", "bd3lm", "stratified_perm")
_MAX_G = 2**32


class ComplementView(NamedTuple):
    """The complementary view ``(¬m ∧ maskable) ∨ (target ∧ maskable)`` drawn from the same uniforms."""

    noisy_ids: torch.Tensor
    loss_weight: torch.Tensor
    code: torch.Tensor
    block_counts: torch.Tensor
    doc_counts: torch.Tensor


class UnionMaskOutput(NamedTuple):
    """Outputs of :func:`block_diffusion_union_mask` (``N`` documents, ``NB`` blocks, document-major order).

    Attributes:
        noisy_ids: like ``input_ids``: ``mask_token_id`` where ``m' = m ∨ (target ∧ maskable)``, the clean id elsewhere.
        loss_weight: float32, like ``input_ids``: 0 outside ``m'``; see ``weight_mode``.
        code: uint8, like ``input_ids``: 0 visible, 1 random (non-target), 2 random ∧ target, 3 forced target
            (target the random draw did not mask), 4 prompt (real, never maskable), 5 pad.
        t: float32 ``[NB]`` noise level of each block (linear schedule: masking probability ``p = t``).
        block_ptr: int64 ``[N + 1]``: the blocks of document ``d`` are ``block_ptr[d]:block_ptr[d + 1]``.
        block_counts: int32 ``[NB, 5]``, columns :data:`COUNT_COLUMNS` (n_maskable, n_random = ``|m|``,
            n_union = ``|m'|``, n_target = ``|B ∩ maskable|``, n_forced = ``|B ∖ m|``).
        doc_counts: int32 ``[N, 5]``: per-document sums of ``block_counts``.
        doc_weight_sum: float32 ``[N]``: per-document sum of ``loss_weight``.
        targets_dropped: int32 ``[N]``: targets on non-maskable positions (prompt / pad), ignored.
        complement: :class:`ComplementView` when ``complementary=True``, else ``None``.
    """

    noisy_ids: torch.Tensor
    loss_weight: torch.Tensor
    code: torch.Tensor
    t: torch.Tensor
    block_ptr: torch.Tensor
    block_counts: torch.Tensor
    doc_counts: torch.Tensor
    doc_weight_sum: torch.Tensor
    targets_dropped: torch.Tensor
    complement: ComplementView | None


def _as_mask(name: str, x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
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


def _check_mask_token_id(mask_token_id, ids_dtype: torch.dtype, vocab_size) -> int:
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


def _block_weights(t: torch.Tensor, weight_mode: str, target_weight: float):
    one = torch.ones_like(t)
    if weight_mode == "t3s_split":
        return one / t, one * target_weight
    if weight_mode == "elbo_naive":
        return one / t, one / t
    return one, one.clone()


def block_diffusion_union_mask(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    vocab_size: int | None = None,
    targets: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    eps_min: float = 1e-3,
    eps_max: float = 1.0,
    t_mode: str = "per_block",
    sampler: str = "stratified_perm",
    noise_level: torch.Tensor | None = None,
    weight_mode: str = "t3s_split",
    target_weight: float = 1.0,
    complementary: bool = False,
    seed: int = 0,
    step: int = 0,
    token_offset: int = 0,
    impl: str = "auto",
) -> UnionMaskOutput:
    """Block-diffusion masking with T3S union masking ``m' = m ∨ 1_B`` in one pass over the tokens.

    For token ``j`` of document ``d`` in block ``k = j // block_size`` (blocks counted from the document start; a
    partial last block is allowed): ``m_j = (u_j < t_{d,k}) ∧ maskable_j`` and ``m'_j = m_j ∨ (target_j ∧
    maskable_j)``; prompt and pad are never masked. ``u_j`` is Triton's ``tl.rand(seed, step · 2**32 + g)``
    (Philox4x32-10) with ``g = token_offset + flat index``: the mask of a token depends only on (seed, step, g),
    never on the batch split, the tiling or the rank — a micro-batch starting at global token ``g0`` passes
    ``token_offset=g0`` and gets exactly the slice of the full batch's mask. The Triton kernel, the C++ CPU op and
    the reference draw bit-identical uniforms.

    Args:
        input_ids: int32/int64 ``[B, L]`` (padded; each row is one document) or ``[T]`` (packed, with
            ``cu_seqlens``; tokens past ``cu_seqlens[-1]`` are pad).
        maskable: bool, like ``input_ids``: positions that may be masked (response tokens; ``labels != -100``).
        block_size: diffusion block size (any positive int; 32 for LLaDA2.0).
        mask_token_id: the ``[MASK]`` id (156895 for LLaDA2.0): an int in ``[0, vocab_size)`` that fits the dtype
            of ``input_ids`` (else ``TypeError`` / ``ValueError`` before any work, the same in every backend).
        vocab_size: optional vocabulary size; when given, ``mask_token_id`` must be below it.
        targets: bool, like ``input_ids``: the T3S target set B (e.g. ``Δc_t < −τ``). Targets outside
            ``maskable`` are dropped and counted in ``targets_dropped``.
        valid: bool, like ``input_ids``: real tokens (``attention_mask``); ``False`` marks pad (code 5).
        cu_seqlens: int ``[N + 1]`` document boundaries of a packed ``[T]`` batch.
        eps_min, eps_max: clipping window of the noise level, ``0 ≤ eps_min ≤ eps_max ≤ 1`` (BD3-LM default
            ``[1e-3, 1]``; dFactory's LLaDA2.0 SFT uses ``[0.3, 0.8]``).
        t_mode: ``"per_block"`` (BD3-LM) or ``"per_sequence"`` (LLaDA2.0 / dFactory: one t per document).
        sampler: ``"stratified_perm"`` (default; strata over the active units of this call, randomly permuted),
            ``"bd3lm"`` (BD3-LM's row-major antithetic strata) or ``"iid"`` (the only one whose t does not depend
            on which other sequences share the call).
        noise_level: float ``[N]`` (per_sequence) or ``[NB]`` (per_block) explicit t in ``[0, 1]``; replaces the
            sampler.
        weight_mode: ``"t3s_split"`` (random non-targets ``1/t``, every target ``target_weight``),
            ``"uniform"`` (1 on every masked token; dFactory / Fast-dLLM v2 parity), ``"elbo_naive"`` (``1/t`` on
            every masked token, targets included; ablation only).
        target_weight: λ of ``t3s_split``.
        complementary: also return the complementary view (random part ``¬m``, level ``1 − t``, weight
            ``1/(1 − t)`` under the ELBO modes; targets masked in both views).
        seed: Philox key, ``0 ≤ seed < 2**63``. step: ``0 ≤ step < 2**31`` (the optimizer step).
        token_offset: global index of this call's first token (``token_offset + T ≤ 2**32``).
        impl: ``"auto"`` (Triton on CUDA; on CPU the C++ op, built on first use, or the reference when no
            compiler is available), ``"triton"``, ``"cpp"`` or ``"reference"``.

    Returns:
        :class:`UnionMaskOutput`.

    Host syncs: the number of blocks (output allocation) is read on the host; this is a per-batch data-prep op.

    Examples:
        >>> import torch
        >>> ids = torch.arange(10).view(1, 10)
        >>> maskable = torch.arange(10).view(1, 10) >= 3
        >>> out = block_diffusion_union_mask(ids, maskable, block_size=4, mask_token_id=99,
        ...                                  targets=ids == 9, impl="reference")
        >>> int(out.noisy_ids[0, 9]), int(out.code[0, 0])
        (99, 4)
    """
    # ---- validation -------------------------------------------------------------------------------------------
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [B, L] or packed [T], got shape {tuple(input_ids.shape)}")
    mask_token_id = _check_mask_token_id(mask_token_id, input_ids.dtype, vocab_size)
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
    if token_offset < 0 or token_offset + T > _MAX_G:
        raise ValueError(f"token_offset + number of tokens must lie in [0, 2**32], got {token_offset} + {T}")
    maskable_f = _as_mask("maskable", maskable, input_ids)
    if maskable_f is None:
        raise TypeError("maskable is required")
    targets_f = _as_mask("targets", targets, input_ids)
    valid_f = _as_mask("valid", valid, input_ids)
    dev = input_ids.device
    if impl == "cpp":
        backend = "cpp"
    else:
        backend = resolve_impl(impl, dev)
        if impl == "auto" and backend == "reference" and dev.type == "cpu":
            backend = "cpp"
    if backend == "cpp":
        if dev.type != "cpu":
            raise ValueError(f"impl='cpp' needs CPU tensors, got {dev}")
        from t3s_kernels.block_diffusion.cpu import load_union_mask_op

        op = load_union_mask_op()
        if op is None:
            if impl == "cpp":
                raise RuntimeError("impl='cpp': the C++ union-mask op could not be built (see the warning)")
            backend = "reference"

    # ---- layout: documents and blocks ---------------------------------------------------------------------------
    ids = input_ids.reshape(-1).contiguous()
    if input_ids.dim() == 2:
        B, L = input_ids.shape
        doc_start = torch.arange(B, device=dev, dtype=torch.int64) * L
        doc_len = torch.full((B,), L, device=dev, dtype=torch.int64)
        covered = T
    else:
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], device=dev)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be an integer [N + 1] tensor, got {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        covered = int(cu[-1])
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or covered > T:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at <= {T}")
        doc_start, doc_len = cu[:-1].contiguous(), (cu[1:] - cu[:-1]).contiguous()
    n_docs = doc_start.numel()
    nb_doc = (doc_len + block_size - 1) // block_size
    blk_ptr = torch.zeros(n_docs + 1, device=dev, dtype=torch.int64)
    blk_ptr[1:] = torch.cumsum(nb_doc, 0)
    n_blocks = int(blk_ptr[-1])
    max_blocks = int(nb_doc.max()) if n_docs else 0
    blk_doc = torch.repeat_interleave(torch.arange(n_docs, device=dev), nb_doc, output_size=n_blocks)
    blk_k = torch.arange(n_blocks, device=dev, dtype=torch.int64) - blk_ptr[blk_doc]
    tok_doc = torch.repeat_interleave(torch.arange(n_docs, device=dev), doc_len, output_size=covered)
    real_f = maskable_f if valid_f is None else maskable_f & valid_f

    # ---- noise levels -------------------------------------------------------------------------------------------
    n_units = n_blocks if t_mode == "per_block" else n_docs
    if noise_level is not None:
        nl = torch.as_tensor(noise_level, device=dev).reshape(-1)
        if nl.numel() != n_units or not nl.dtype.is_floating_point:
            raise ValueError(
                f"noise_level must be a float tensor with {n_units} entries ({t_mode}), got {tuple(nl.shape)}"
            )
        if not bool(((nl >= 0) & (nl <= 1)).all()):
            raise ValueError("noise_level must lie in [0, 1]")
        t_unit = nl.to(torch.float32)
    else:
        if t_mode == "per_block":
            unit_index = token_offset + doc_start[blk_doc] + blk_k * block_size
        else:
            unit_index = token_offset + doc_start
        active = torch.ones(n_units, dtype=torch.bool, device=dev)
        if sampler == "stratified_perm":
            n_r = torch.zeros(n_docs, dtype=torch.int64, device=dev)
            r_cov = real_f[:covered]
            if t_mode == "per_block":
                tok_blk = blk_ptr[tok_doc] + (torch.arange(covered, device=dev) - doc_start[tok_doc]) // block_size
                n_r = torch.zeros(n_blocks, dtype=torch.int64, device=dev).index_add_(0, tok_blk, r_cov.long())
            else:
                n_r.index_add_(0, tok_doc, r_cov.long())
            active = n_r > 0
        t_unit = _ref.sample_noise_levels(
            unit_index, active, sampler=sampler, eps_min=eps_min, eps_max=eps_max, seed=seed, step=step
        )
    t_blk = (t_unit if t_mode == "per_block" else t_unit[blk_doc]).contiguous()
    needs_inv = weight_mode == "elbo_naive" and targets_f is not None
    if needs_inv and noise_level is None and (eps_min <= 0 or (complementary and eps_max >= 1)):
        raise ValueError("weight_mode='elbo_naive' puts 1/t on targets: needs eps_min > 0 (and eps_max < 1 with "
                         "complementary=True)")
    if needs_inv and bool((t_blk <= 0).any()):
        raise ValueError("weight_mode='elbo_naive' puts 1/t on targets: needs t > 0 (eps_min > 0)")
    if needs_inv and complementary and bool((t_blk >= 1).any()):
        raise ValueError("weight_mode='elbo_naive' with complementary=True needs t < 1 (eps_max < 1)")
    w_blk = _block_weights(t_blk, weight_mode, float(target_weight))
    wc_blk = _block_weights(1.0 - t_blk, weight_mode, float(target_weight)) if complementary else None

    # ---- run ----------------------------------------------------------------------------------------------------
    def alloc():
        return (
            torch.empty_like(ids),
            torch.empty(T, dtype=torch.float32, device=dev),
            torch.empty(T, dtype=torch.uint8, device=dev),
            torch.empty(n_blocks, 5, dtype=torch.int32, device=dev),
        )

    if backend == "reference":
        main, comp = _ref.union_mask_reference(
            ids,
            maskable_f,
            valid_f if valid_f is not None else torch.ones_like(maskable_f),
            targets_f if targets_f is not None else torch.zeros_like(maskable_f),
            doc_start,
            doc_len,
            t_blk,
            block_size=block_size,
            mask_token_id=mask_token_id,
            weight_mode=weight_mode,
            target_weight=float(target_weight),
            seed=seed,
            step=step,
            token_offset=token_offset,
            complementary=complementary,
        )
    else:
        main, comp = alloc(), (alloc() if complementary else None)
        if covered < T:  # packed tail: pad
            for o in [main] + ([comp] if comp is not None else []):
                o[0][covered:] = ids[covered:]
                o[1][covered:] = 0.0
                o[2][covered:] = _ref.PAD
        if backend == "triton":
            from t3s_kernels.block_diffusion.kernels import union_mask_triton

            union_mask_triton(
                ids, maskable_f, valid_f, targets_f, doc_start, doc_len, blk_ptr, max_blocks, t_blk, w_blk, wc_blk,
                *main, comp, block_size=block_size, mask_token_id=int(mask_token_id), seed=seed,
                rng_base=(step << 32) + token_offset,
                aligned=input_ids.dim() == 2 and input_ids.shape[1] % 16 == 0,
            )  # fmt: skip
        else:
            u8 = lambda x: None if x is None else x.view(torch.uint8)  # noqa: E731
            c = comp if comp is not None else (None, None, None, None)
            op(
                ids, u8(maskable_f), u8(valid_f), u8(targets_f), doc_start, doc_len, blk_ptr, t_blk, w_blk[0],
                w_blk[1], wc_blk[0] if wc_blk else None, wc_blk[1] if wc_blk else None, *main, *c,
                seed, step, token_offset, int(mask_token_id), block_size,
            )  # fmt: skip

    # ---- per-document reductions ----------------------------------------------------------------------------------
    def doc_sums(counts):
        sums = torch.zeros(n_docs, 5, dtype=torch.int64, device=dev).index_add_(0, blk_doc, counts.long())
        return sums.to(torch.int32)

    weight = main[1]
    doc_w = torch.zeros(n_docs, dtype=torch.float32, device=dev).index_add_(0, tok_doc, weight[:covered])
    if targets_f is not None:
        dropped_tok = (targets_f & ~real_f)[:covered].long()
        dropped = torch.zeros(n_docs, dtype=torch.int64, device=dev).index_add_(0, tok_doc, dropped_tok)
    else:
        dropped = torch.zeros(n_docs, dtype=torch.int64, device=dev)
    shape = input_ids.shape
    complement = None
    if comp is not None:
        complement = ComplementView(
            comp[0].view(shape), comp[1].view(shape), comp[2].view(shape), comp[3], doc_sums(comp[3])
        )
    return UnionMaskOutput(
        noisy_ids=main[0].view(shape),
        loss_weight=weight.view(shape),
        code=main[2].view(shape),
        t=t_blk,
        block_ptr=blk_ptr,
        block_counts=main[3],
        doc_counts=doc_sums(main[3]),
        doc_weight_sum=doc_w,
        targets_dropped=dropped.to(torch.int32),
        complement=complement,
    )
