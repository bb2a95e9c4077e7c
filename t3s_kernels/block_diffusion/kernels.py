"""Triton kernel of the block-diffusion union mask and its host launcher.

One program handles ``NBLK`` consecutive diffusion blocks of one document as a ``[NBLK, BS_P2]`` tile; the grid is
1-D, ``n_docs · cdiv(max_blocks, NBLK)`` programs (document-major), so any number of documents fits (CUDA caps grid
axes 1 and 2 at 65535)
(``BS_P2`` = next power of two ≥ block size), so per-block counts are row sums of the tile: no atomics, and any
block size works. Uniforms are ``tl.rand(seed, step · 2**32 + g)`` with ``g`` the global token index, so the mask
does not depend on the tiling, the grid or the batch split (see :mod:`.reference` for the exact layout).
"""

from __future__ import annotations

import torch

from t3s_kernels._triton import HAS_TRITON, tl, triton

__all__ = ["union_mask_triton"]

if HAS_TRITON:

    @triton.jit
    def _store_view(b_m, b_b, b_r, b_valid, b_wr, b_wt, b_ids, mask_id, noisy_ptr, w_ptr, code_ptr, o_t, m_t):
        """One view's outputs from its random mask ``b_m`` and the targets ``b_b``: noisy ids, weights, class codes.

        Returns the union mask ``m' = m | b``. Codes: 0 visible, 1 random, 2 random and target, 3 forced target,
        4 prompt, 5 pad.
        """
        b_union = b_m | b_b
        b_code = tl.where(b_b, tl.where(b_m, 2, 3), tl.where(b_m, 1, 0))
        b_code = tl.where(b_valid, tl.where(b_r, b_code, 4), 5)
        b_w = tl.where(b_b, b_wt[:, None], tl.where(b_m, b_wr[:, None], 0.0))
        tl.store(noisy_ptr + o_t, tl.where(b_union, mask_id, b_ids).to(noisy_ptr.dtype.element_ty), mask=m_t)
        tl.store(w_ptr + o_t, b_w.to(tl.float32), mask=m_t)
        tl.store(code_ptr + o_t, b_code.to(tl.uint8), mask=m_t)
        return b_union

    @triton.heuristics(
        {
            "HAS_VALID": lambda args: args["valid_ptr"] is not None,
            "HAS_TARGET": lambda args: args["target_ptr"] is not None,
            "HAS_COMP": lambda args: args["noisy_c_ptr"] is not None,
        }
    )
    @triton.jit(do_not_specialize=["seed", "rng_base", "mask_id"])
    def _union_mask_fwd_kernel(
        ids_ptr,  # [T] int32/int64
        maskable_ptr,  # [T] uint8
        valid_ptr,  # [T] uint8 or None
        target_ptr,  # [T] uint8 or None
        doc_start_ptr,  # [N] int64
        doc_len_ptr,  # [N] int64
        blk_ptr_ptr,  # [N + 1] int64
        p_ptr,  # [NB] fp32 masking probability (= t, linear schedule)
        wr_ptr,  # [NB] fp32 weight of random non-targets
        wt_ptr,  # [NB] fp32 weight of targets
        wrc_ptr,  # [NB] fp32 complementary view: weight of random non-targets
        wtc_ptr,  # [NB] fp32 complementary view: weight of targets
        noisy_ptr,  # [T] same dtype as ids
        w_ptr,  # [T] fp32
        code_ptr,  # [T] uint8
        cnt_ptr,  # [NB, 5] int32
        noisy_c_ptr,
        w_c_ptr,
        code_c_ptr,
        cnt_c_ptr,
        seed,  # 64-bit Philox key
        rng_base,  # step * 2**32 + token_offset
        mask_id,
        n_chunks,  # programs per document: cdiv(max_blocks, NBLK)
        BS: tl.constexpr,
        BS_P2: tl.constexpr,
        NBLK: tl.constexpr,
        HAS_VALID: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        HAS_COMP: tl.constexpr,
        ALIGNED: tl.constexpr,  # every document starts at a multiple of 16 tokens (padded rows, L % 16 == 0)
    ):
        # 1-D grid (axis 0 allows 2^31 - 1 programs; axes 1 and 2 stop at 65535): pid = document · n_chunks + chunk
        pid = tl.program_id(0).to(tl.int64)
        i_d = pid // n_chunks
        i_c = pid % n_chunks
        b_blk0 = tl.load(blk_ptr_ptr + i_d)
        b_nb = tl.load(blk_ptr_ptr + i_d + 1) - b_blk0
        if i_c * NBLK >= b_nb:
            return
        b_start = tl.load(doc_start_ptr + i_d)
        if ALIGNED:
            b_start = tl.multiple_of(b_start, 16)
        b_len = tl.load(doc_len_ptr + i_d)

        o_k = i_c * NBLK + tl.arange(0, NBLK).to(tl.int64)  # [NBLK] block index in the document
        o_i = tl.arange(0, BS_P2).to(tl.int64)  # [BS_P2]
        o_j = o_k[:, None] * BS + o_i[None, :]  # [NBLK, BS_P2] document-relative position
        m_k = o_k < b_nb  # [NBLK]
        m_t = m_k[:, None] & (o_i[None, :] < BS) & (o_j < b_len)  # [NBLK, BS_P2]
        o_t = b_start + o_j  # [NBLK, BS_P2] flat token index

        b_ids = tl.load(ids_ptr + o_t, mask=m_t, other=0)
        b_r = tl.load(maskable_ptr + o_t, mask=m_t, other=0) != 0  # [NBLK, BS_P2]
        if HAS_VALID:
            b_valid = tl.load(valid_ptr + o_t, mask=m_t, other=0) != 0
        else:
            b_valid = m_t
        b_r = b_r & b_valid & m_t
        if HAS_TARGET:
            b_b = (tl.load(target_ptr + o_t, mask=m_t, other=0) != 0) & b_r
        else:
            b_b = o_j < 0  # all False

        b_p = tl.load(p_ptr + b_blk0 + o_k, mask=m_k, other=0.0)  # [NBLK]
        b_u = tl.rand(seed, rng_base + o_t)  # [NBLK, BS_P2] fp32, counter (g, step, 0, 0)
        b_m = (b_u < b_p[:, None]) & b_r

        b_wr = tl.load(wr_ptr + b_blk0 + o_k, mask=m_k, other=0.0)
        b_wt = tl.load(wt_ptr + b_blk0 + o_k, mask=m_k, other=0.0)
        b_union = _store_view(b_m, b_b, b_r, b_valid, b_wr, b_wt, b_ids, mask_id, noisy_ptr, w_ptr, code_ptr, o_t, m_t)

        p_cnt = cnt_ptr + (b_blk0 + o_k) * 5  # [NBLK]
        tl.store(p_cnt + 0, tl.sum(b_r.to(tl.int32), axis=1), mask=m_k)
        tl.store(p_cnt + 1, tl.sum(b_m.to(tl.int32), axis=1), mask=m_k)
        tl.store(p_cnt + 2, tl.sum(b_union.to(tl.int32), axis=1), mask=m_k)
        tl.store(p_cnt + 3, tl.sum(b_b.to(tl.int32), axis=1), mask=m_k)
        tl.store(p_cnt + 4, tl.sum((b_b & ~b_m).to(tl.int32), axis=1), mask=m_k)

        if HAS_COMP:
            b_mc = ~b_m & b_r
            b_wrc = tl.load(wrc_ptr + b_blk0 + o_k, mask=m_k, other=0.0)
            b_wtc = tl.load(wtc_ptr + b_blk0 + o_k, mask=m_k, other=0.0)
            b_union_c = _store_view(b_mc, b_b, b_r, b_valid, b_wrc, b_wtc, b_ids, mask_id, noisy_c_ptr, w_c_ptr,
                                    code_c_ptr, o_t, m_t)
            p_cnt_c = cnt_c_ptr + (b_blk0 + o_k) * 5
            tl.store(p_cnt_c + 0, tl.sum(b_r.to(tl.int32), axis=1), mask=m_k)
            tl.store(p_cnt_c + 1, tl.sum(b_mc.to(tl.int32), axis=1), mask=m_k)
            tl.store(p_cnt_c + 2, tl.sum(b_union_c.to(tl.int32), axis=1), mask=m_k)
            tl.store(p_cnt_c + 3, tl.sum(b_b.to(tl.int32), axis=1), mask=m_k)
            tl.store(p_cnt_c + 4, tl.sum((b_b & ~b_mc).to(tl.int32), axis=1), mask=m_k)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0


def union_mask_grid(n_docs: int, max_blocks: int, nblk: int) -> tuple[tuple[int], int]:
    """``((programs,), chunks per document)``: a 1-D grid of ``n_docs · cdiv(max_blocks, nblk)`` programs."""
    n_chunks = -(-max_blocks // nblk)
    programs = n_docs * n_chunks
    if programs > MAX_GRID_X:
        raise ValueError(
            f"union mask: {n_docs} documents × {n_chunks} programs each exceeds CUDA's grid limit {MAX_GRID_X}; "
            "split the batch"
        )
    return (programs,), n_chunks


def union_mask_triton(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    valid: torch.Tensor | None,
    target: torch.Tensor | None,
    doc_start: torch.Tensor,
    doc_len: torch.Tensor,
    blk_ptr: torch.Tensor,
    max_blocks: int,
    p_blk: torch.Tensor,
    w_blk: tuple[torch.Tensor, torch.Tensor],
    wc_blk: tuple[torch.Tensor, torch.Tensor] | None,
    noisy: torch.Tensor,
    weight: torch.Tensor,
    code: torch.Tensor,
    counts: torch.Tensor,
    comp_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    block_size: int,
    mask_token_id: int,
    seed: int,
    rng_base: int,
    aligned: bool = False,
    tokens_per_program: int = 1024,
) -> None:
    """Launch :func:`_union_mask_fwd_kernel` over :func:`union_mask_grid` programs; writes the outputs."""
    n_docs = doc_start.numel()
    if n_docs == 0 or max_blocks == 0:
        return
    bs_p2 = _next_pow2(block_size)
    nblk = max(1, min(_next_pow2(max_blocks), max(1, tokens_per_program // bs_p2)))
    grid, n_chunks = union_mask_grid(n_docs, max_blocks, nblk)
    u8 = lambda x: None if x is None else x.view(torch.uint8)  # noqa: E731
    nc, wc, cc, kc = comp_out if comp_out is not None else (None, None, None, None)
    wrc, wtc = wc_blk if wc_blk is not None else (None, None)
    _union_mask_fwd_kernel[grid](
        ids_ptr=ids,
        maskable_ptr=u8(maskable),
        valid_ptr=u8(valid),
        target_ptr=u8(target),
        doc_start_ptr=doc_start,
        doc_len_ptr=doc_len,
        blk_ptr_ptr=blk_ptr,
        p_ptr=p_blk,
        wr_ptr=w_blk[0],
        wt_ptr=w_blk[1],
        wrc_ptr=wrc,
        wtc_ptr=wtc,
        noisy_ptr=noisy,
        w_ptr=weight,
        code_ptr=code,
        cnt_ptr=counts,
        noisy_c_ptr=nc,
        w_c_ptr=wc,
        code_c_ptr=cc,
        cnt_c_ptr=kc,
        seed=seed,
        rng_base=rng_base,
        mask_id=mask_token_id,
        n_chunks=n_chunks,
        BS=block_size,
        BS_P2=bs_p2,
        NBLK=nblk,
        ALIGNED=bool(aligned),
    )
