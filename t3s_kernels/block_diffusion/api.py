"""Public op: :func:`block_diffusion_union_mask` (its documentation, the layout, noise-level sampling and dispatch
on ``impl``; argument checks in :mod:`._checks`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from t3s_kernels._triton import resolve_impl
from t3s_kernels.block_diffusion import reference as _ref
from t3s_kernels.block_diffusion._checks import (  # noqa: F401 (the mode tuples stay importable from here)
    SAMPLERS,
    T_MODES,
    WEIGHT_MODES,
    check_inverse_weights,
    check_union_mask_args,
)

__all__ = ["COUNT_COLUMNS", "ComplementView", "UnionMaskOutput", "block_diffusion_union_mask"]

COUNT_COLUMNS = ("n_maskable", "n_random", "n_union", "n_target", "n_forced")


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


def _block_weights(t: torch.Tensor, weight_mode: str, target_weight: float):
    one = torch.ones_like(t)
    if weight_mode == "t3s_split":
        return one / t, one * target_weight
    if weight_mode == "elbo_naive":
        return one / t, one / t
    return one, one.clone()


class _Layout(NamedTuple):
    """Documents and blocks of a call: flat ids, each document's start and length, and block / token indices."""

    ids: torch.Tensor
    doc_start: torch.Tensor
    doc_len: torch.Tensor
    covered: int  # tokens inside documents; a packed batch's tail past cu_seqlens[-1] is pad
    blk_ptr: torch.Tensor
    n_blocks: int
    max_blocks: int
    blk_doc: torch.Tensor
    blk_k: torch.Tensor
    tok_doc: torch.Tensor

    @property
    def n_docs(self) -> int:
        return self.doc_start.numel()


def _layout(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None, block_size: int) -> _Layout:
    dev, T = input_ids.device, input_ids.numel()
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
    return _Layout(ids, doc_start, doc_len, covered, blk_ptr, n_blocks, max_blocks, blk_doc, blk_k, tok_doc)


def _choose_backend(impl: str, dev: torch.device):
    """``(backend, C++ op or None)``: ``auto`` on CPU prefers the C++ op and falls back to the reference."""
    if impl == "cpp":
        backend = "cpp"
    else:
        backend = resolve_impl(impl, dev)
        if impl == "auto" and backend == "reference" and dev.type == "cpu":
            backend = "cpp"
    if backend != "cpp":
        return backend, None
    if dev.type != "cpu":
        raise ValueError(f"impl='cpp' needs CPU tensors, got {dev}")
    from t3s_kernels.block_diffusion.cpu import load_union_mask_op

    op = load_union_mask_op()
    if op is None:
        if impl == "cpp":
            raise RuntimeError("impl='cpp': the C++ union-mask op could not be built (see the warning)")
        return "reference", None
    return "cpp", op


def _block_noise_levels(lay: _Layout, real_f: torch.Tensor, noise_level, *, t_mode: str, sampler: str,
                        eps_min: float, eps_max: float, seed: int, step: int, token_offset: int,
                        block_size: int) -> torch.Tensor:
    """The noise level t of every block: the explicit ``noise_level`` (checked), else drawn by ``sampler``."""
    dev = lay.ids.device
    n_units = lay.n_blocks if t_mode == "per_block" else lay.n_docs
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
            unit_index = token_offset + lay.doc_start[lay.blk_doc] + lay.blk_k * block_size
        else:
            unit_index = token_offset + lay.doc_start
        active = torch.ones(n_units, dtype=torch.bool, device=dev)
        if sampler == "stratified_perm":
            n_r = torch.zeros(lay.n_docs, dtype=torch.int64, device=dev)
            r_cov = real_f[:lay.covered]
            if t_mode == "per_block":
                offset_in_doc = torch.arange(lay.covered, device=dev) - lay.doc_start[lay.tok_doc]
                tok_blk = lay.blk_ptr[lay.tok_doc] + offset_in_doc // block_size
                n_r = torch.zeros(lay.n_blocks, dtype=torch.int64, device=dev).index_add_(0, tok_blk, r_cov.long())
            else:
                n_r.index_add_(0, lay.tok_doc, r_cov.long())
            active = n_r > 0
        t_unit = _ref.sample_noise_levels(
            unit_index, active, sampler=sampler, eps_min=eps_min, eps_max=eps_max, seed=seed, step=step
        )
    return (t_unit if t_mode == "per_block" else t_unit[lay.blk_doc]).contiguous()


def _run_backend(backend: str, op, lay: _Layout, args, t_blk, *, block_size: int, weight_mode: str,
                 target_weight: float, complementary: bool, aligned: bool):
    """``(main, complement or None)``, each ``(noisy_ids, loss_weight, code, block_counts)`` flat."""
    ids, dev, T = lay.ids, lay.ids.device, lay.ids.numel()
    maskable_f, valid_f, targets_f = args.maskable, args.valid, args.targets
    if backend == "reference":
        return _ref.union_mask_reference(
            ids,
            maskable_f,
            valid_f if valid_f is not None else torch.ones_like(maskable_f),
            targets_f if targets_f is not None else torch.zeros_like(maskable_f),
            lay.doc_start,
            lay.doc_len,
            t_blk,
            block_size=block_size,
            mask_token_id=args.mask_token_id,
            weight_mode=weight_mode,
            target_weight=target_weight,
            seed=args.seed,
            step=args.step,
            token_offset=args.token_offset,
            complementary=complementary,
        )
    w_blk = _block_weights(t_blk, weight_mode, target_weight)
    wc_blk = _block_weights(1.0 - t_blk, weight_mode, target_weight) if complementary else None

    def alloc():
        return (
            torch.empty_like(ids),
            torch.empty(T, dtype=torch.float32, device=dev),
            torch.empty(T, dtype=torch.uint8, device=dev),
            torch.empty(lay.n_blocks, 5, dtype=torch.int32, device=dev),
        )

    main, comp = alloc(), (alloc() if complementary else None)
    if lay.covered < T:  # packed tail: pad
        for o in [main] + ([comp] if comp is not None else []):
            o[0][lay.covered:] = ids[lay.covered:]
            o[1][lay.covered:] = 0.0
            o[2][lay.covered:] = _ref.PAD
    if backend == "triton":
        from t3s_kernels.block_diffusion.kernels import union_mask_triton

        union_mask_triton(
            ids, maskable_f, valid_f, targets_f, lay.doc_start, lay.doc_len, lay.blk_ptr, lay.max_blocks, t_blk,
            w_blk, wc_blk, *main, comp, block_size=block_size, mask_token_id=int(args.mask_token_id),
            seed=args.seed, rng_base=(args.step << 32) + args.token_offset, aligned=aligned,
        )  # fmt: skip
    else:
        u8 = lambda x: None if x is None else x.view(torch.uint8)  # noqa: E731
        c = comp if comp is not None else (None, None, None, None)
        op(
            ids, u8(maskable_f), u8(valid_f), u8(targets_f), lay.doc_start, lay.doc_len, lay.blk_ptr, t_blk,
            w_blk[0], w_blk[1], wc_blk[0] if wc_blk else None, wc_blk[1] if wc_blk else None, *main, *c,
            args.seed, args.step, args.token_offset, int(args.mask_token_id), block_size,
        )  # fmt: skip
    return main, comp


def _outputs(shape, lay: _Layout, args, real_f, t_blk, main, comp) -> UnionMaskOutput:
    """The outputs in the caller's shape, with the per-document reductions."""
    dev = lay.ids.device

    def doc_sums(counts):
        sums = torch.zeros(lay.n_docs, 5, dtype=torch.int64, device=dev).index_add_(0, lay.blk_doc, counts.long())
        return sums.to(torch.int32)

    weight = main[1]
    doc_w = torch.zeros(lay.n_docs, dtype=torch.float32, device=dev).index_add_(0, lay.tok_doc,
                                                                                 weight[:lay.covered])
    dropped = torch.zeros(lay.n_docs, dtype=torch.int64, device=dev)
    if args.targets is not None:
        dropped.index_add_(0, lay.tok_doc, (args.targets & ~real_f)[:lay.covered].long())
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
        block_ptr=lay.blk_ptr,
        block_counts=main[3],
        doc_counts=doc_sums(main[3]),
        doc_weight_sum=doc_w,
        targets_dropped=dropped.to(torch.int32),
        complement=complement,
    )


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
    args = check_union_mask_args(
        input_ids, maskable, block_size=block_size, mask_token_id=mask_token_id, vocab_size=vocab_size,
        targets=targets, valid=valid, cu_seqlens=cu_seqlens, eps_min=eps_min, eps_max=eps_max, t_mode=t_mode,
        sampler=sampler, noise_level=noise_level, weight_mode=weight_mode, target_weight=target_weight, seed=seed,
        step=step, token_offset=token_offset,
    )
    backend, op = _choose_backend(impl, input_ids.device)
    lay = _layout(input_ids, cu_seqlens, block_size)
    real_f = args.maskable if args.valid is None else args.maskable & args.valid
    t_blk = _block_noise_levels(lay, real_f, noise_level, t_mode=t_mode, sampler=sampler, eps_min=eps_min,
                                eps_max=eps_max, seed=args.seed, step=args.step, token_offset=args.token_offset,
                                block_size=block_size)
    check_inverse_weights(t_blk, weight_mode=weight_mode, has_targets=args.targets is not None,
                          explicit_noise=noise_level is not None, eps_min=eps_min, eps_max=eps_max,
                          complementary=complementary)
    main, comp = _run_backend(backend, op, lay, args, t_blk, block_size=block_size, weight_mode=weight_mode,
                              target_weight=float(target_weight), complementary=complementary,
                              aligned=input_ids.dim() == 2 and input_ids.shape[1] % 16 == 0)
    return _outputs(input_ids.shape, lay, args, real_f, t_blk, main, comp)
