"""Triton kernels for the per-token linear-softmax statistics, and their host launchers.

Kernels (``N`` rows of ``hidden [N, D]``, ``V`` rows of ``weight [V, D]``; ``z = cap(h·Wᵀ + b) / temperature``):

* ``_lce_stats_fwd_kernel`` — fused forward on a 2-D grid, (row block × vocabulary split), flattened in grouped
  order ``pid = i_n · splits + i_s``: the ``splits`` programs of one row block run side by side, so their re-reads
  of the ``[BLOCK_N, D]`` block of ``h`` hit L2, and a wave of ``P`` resident programs streams each vocabulary
  slice of ``W`` once from HBM for its ``P / splits`` row blocks. A program runs ``cdiv(cdiv(V, BLOCK_V), splits)``
  V tiles (the last split fewer); per tile the fp32 logits come from a loop of ``cdiv(D, BLOCK_D)``
  ``[BLOCK_N, BLOCK_D] × [BLOCK_D, BLOCK_V]`` ``tl.dot`` steps, then an online max / Σe^{z−m} / Σe^{z−m}(z−m)
  (entropy), the target logit (from the same accumulator) and Σz. Each program writes its partials to an fp32
  ``[5, splits, N]`` workspace; :func:`_combine_splits` merges them deterministically (fixed-order torch
  reductions) and returns the loss relative to the row max, ``nll = log S + (M − z_y)``, so it never cancels at
  large logits. Rows are visited in ``row_order`` (active rows first, a device-side stable argsort); programs whose
  row block is past the device-side active count exit at once: ignored / zero-weight rows cost no GEMM work and no
  host sync is needed. ``splits`` comes from :func:`fwd_splits` (SM count, L2 size, occupancy; a fixed rule under
  the interpreter) and :func:`fwd_plan` states the whole launch.

  Cost, per forward (``n_b = cdiv(N_active, BLOCK_N)`` active row blocks, ``P`` resident programs): tensor-core
  FLOPs ``2 · n_b·BLOCK_N · V · D`` (padded to tiles); L2→SMEM operand traffic ``n_b·BLOCK_N · V · D · elt ·
  (1/BLOCK_V + 1/BLOCK_N)`` (a plain tiled GEMM's); HBM ``h`` once (``N · D · elt``) + ``W`` ``n_b · splits / P``
  times (``V · D · elt`` each) + the workspace (``20 · splits · N`` bytes written and read once); elementwise
  ~20 fp32 ops per logit (exp, max, sums; + tanh with soft-capping) against ``2 · D`` tensor-core FLOPs.
* ``_lce_bwd_dh_kernel`` — recompute backward for ``dhidden``: grid over row blocks, loop over V tiles, form
  ``dx`` (fp32) in registers and accumulate ``dx·W`` into an fp32 ``[N, D]`` buffer owned by the program.
* ``_lce_bwd_dw_kernel`` — recompute backward for ``dweight`` / ``dbias``: grid over V tiles, loop over the active
  row blocks, accumulate ``dxᵀ·h`` into the program's rows of an fp32 ``[V, D]`` buffer. Deterministic: no
  atomics, a fixed reduction order.
* ``_lce_chunk_row_kernel`` — the chunked path (:mod:`.chunked`): one program per row of a cuBLAS fp32 logits
  chunk; statistics relative to the row max (``lse``, ``nll``, smoothing and entropy terms), then ``dx`` in the
  input dtype for per-row coefficients (gradient-in-forward or recompute backward). It also serves the fused
  strategy's optional chunked backward (``T3S_FUSED_BACKWARD=chunked``, driven from :mod:`.function`).

Cost model: the recompute kernels read-modify-write an fp32 ``[BLOCK_N, D]`` (``dh``) or ``[BLOCK_V, D]`` (``dW``)
slab once per tile of the other axis, so at LLM shapes (D = 4096, V = 152k) they are bandwidth-bound (~0.6 TB of
fp32 traffic each at N = 32k) and give deterministic, bit-reproducible gradients. The chunked path costs 6·n·D·V
(8·n·D·V for per-token outputs) at cuBLAS speed over the n active rows; ``dispatch.FUSED_MAX_FLOPS`` is the rule.

Outputs of the primitive: ``(lse, nll = lse − z_y, Σz, entropy)``; its backward maps ``g_nll`` to ``g_lse += g_nll``,
``g_tgt = −g_nll`` (see :class:`~.function.LinearTokenStatsFunction`).

Backward of the primitive (per row, upstream ``g_lse, g_tgt, g_sumz, g_ent``; ``p = softmax(z)``)::

    dz_v = g_lse·p_v + g_tgt·[v = y] + g_sumz − g_ent·p_v·(z_v − Σ_u p_u z_u)
    dx_v = dz_v / temperature · (1 − tanh²(x_v / softcap))   (the last factor only with softcap)

Autotuning: each kernel ships one known-good config; ``T3S_AUTOTUNE=1`` turns on a small search.
"""

from __future__ import annotations

import os

import torch

from .._triton import interpreting, tl, triton

__all__ = [
    "active_rows",
    "fused_backward_mode",
    "fwd_plan",
    "fwd_splits",
    "lce_chunk_rows",
    "lce_stats_bwd",
    "lce_stats_fwd",
    "scale_unless_one",
]

_AUTOTUNE = os.environ.get("T3S_AUTOTUNE", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in fp32 to ≲ 2 ulp (torch's fp32 error ×≤ 2): an odd minimax polynomial for ``|x| < 0.625`` (Cephes
    ``tanhf``; ``1 − 2/(e^{2x}+1)`` loses up to 1e-3 relative there to cancellation), ``1 − 2e/(1+e)`` with
    ``e = e^{−2|x|} ≤ 0.29`` and the sign restored above (never overflows; exact limits ±1). Plain ``tl`` ops, so the
    interpreter runs the same formula (libdevice does not run there)."""
    b_ax = tl.abs(x)
    b_z = x * x
    b_p = ((((-5.70498872745e-3 * b_z + 2.06390887954e-2) * b_z - 5.37397155531e-2) * b_z + 1.33314422036e-1) * b_z
           - 3.33332819422e-1)
    b_small = x + x * b_z * b_p
    b_e = tl.exp(-2.0 * b_ax)
    b_large = 1.0 - 2.0 * b_e / (1.0 + b_e)
    b_large = tl.where(x < 0, -b_large, b_large)
    return tl.where(b_ax < 0.625, b_small, b_large)


@triton.jit
def _lce_logits_tile(
    h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 ``h[o_n] · W[o_v]ᵀ``: ``[BLOCK_N, BLOCK_V]``; masked rows / columns are 0."""
    b_acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_h = h + o_n[:, None] * stride_hn + o_d[None, :] * stride_hd
        p_w = w + o_v[:, None].to(tl.int64) * stride_wv + o_d[None, :] * stride_wd  # int64: V·D may pass 2^31
        b_h = tl.load(p_h, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        b_w = tl.load(p_w, mask=m_v[:, None] & m_d[None, :], other=0.0)  # [BLOCK_V, BLOCK_D]
        if UPCAST:  # interpreter: tl.dot on half operands is unreliable there
            b_h = b_h.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_acc = tl.dot(b_h, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
    return b_acc


@triton.jit
def _lce_transform(b_x, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Raw logits -> (transformed logits z, tanh(x / softcap) or a dummy)."""
    if HAS_SOFTCAP:
        b_t = _tanh(b_x / softcap)
        b_z = softcap * b_t * inv_temp
    else:
        b_t = b_x
        b_z = b_x * inv_temp
    return b_z, b_t


@triton.jit
def _lce_row_tile(p_x, b, o_v, m_v, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Columns ``o_v`` of one row of stored logits ``p_x`` (+ bias) in fp32 -> ``_lce_transform``'s ``(z, tanh)``."""
    b_x = tl.load(p_x + o_v, mask=m_v, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_x += tl.load(b + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_z, b_t = _lce_transform(b_x, softcap, inv_temp, HAS_SOFTCAP)
    return b_z, b_t


@triton.jit
def _lce_online_stats(
    b_z, m_v, o_v, b_y, b_m, b_s, b_a, b_t, b_sz,
    AXIS: tl.constexpr, WITH_TGT: tl.constexpr, WITH_SUMZ: tl.constexpr, WITH_A: tl.constexpr,
):
    """Fold one V tile of transformed logits ``b_z`` into its rows' running fp32 statistics; returns them updated.

    ``m`` (max), ``s = Σ e^{z−m}``; ``a = Σ e^{z−m}(z−m)`` (``WITH_A``; kept relative to the running max so large
    logits do not cancel); the target logit ``t`` (``WITH_TGT``: the column where ``o_v == b_y``) and ``Σ z``
    (``WITH_SUMZ``). ``m_v`` masks the valid columns; ``m_v``, ``o_v`` and ``b_y`` come broadcast to ``b_z``. A
    ``[BLOCK_N, BLOCK_V]`` tile reduces over ``AXIS=1`` (statistics ``[BLOCK_N]``), one row's ``[BLOCK_V]`` tile over
    ``AXIS=0`` (scalars).
    """
    b_zm = tl.where(m_v, b_z, float("-inf"))
    if WITH_TGT:
        b_t += tl.sum(tl.where(o_v == b_y, b_z, 0.0), axis=AXIS)
    if WITH_SUMZ:
        b_sz += tl.sum(tl.where(m_v, b_z, 0.0), axis=AXIS)
    b_m_new = tl.maximum(b_m, tl.max(b_zm, axis=AXIS))
    if AXIS == 1:
        b_m_b = b_m_new[:, None]  # broadcast over the tile's columns
    else:
        b_m_b = b_m_new
    b_alpha = tl.exp(b_m - b_m_new)
    b_e = tl.exp(b_zm - b_m_b)  # 0 on masked columns
    if WITH_A:
        b_shift = tl.where(b_s > 0, b_m - b_m_new, 0.0)  # avoid (-inf) * 0 on the first tile
        b_a = b_alpha * (b_a + b_shift * b_s) + tl.sum(b_e * tl.where(m_v, b_z - b_m_b, 0.0), axis=AXIS)
    b_s = b_s * b_alpha + tl.sum(b_e, axis=AXIS)
    return b_m_new, b_s, b_a, b_t, b_sz


@triton.jit
def _lce_dx(
    b_z, b_th, m_v, o_v, b_y, b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h, inv_temp,
    HAS_SOFTCAP: tl.constexpr, HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr,
):
    """dL/dx (fp32) of a tile from ``_lce_transform``'s ``(z, tanh)``; per-row operands come broadcast to the tile.

    ``dz = g_lse·p + g_tgt·[v = y] (+ g_sumz) (− g_ent·p·(z − Σ p z))``, with ``p = e^{(z − m) − log s}`` formed
    relative to the row max ``m`` (``log s = log Σ e^{z − m}``; never ``z − lse`` of two absolute values, which
    loses ``p`` at large logits) and ``z − Σ p z = (z − m) − log s + H``; 0 where ``m_v`` is false;
    ``dx = dz / temperature (· (1 − tanh²))``; the target entry is formed in fp32 (no ``p_y − 1`` cancellation).
    """
    b_q = (b_z - b_m) - b_ls
    b_p = tl.exp(tl.where(m_v, b_q, float("-inf")))  # 0 where masked
    b_dz = b_gl * b_p + tl.where(o_v == b_y, b_gt, 0.0)
    if HAS_G_SUMZ:
        b_dz += b_gs
    if HAS_G_ENT:
        b_dz -= b_ge * b_p * (b_q + b_h)
    b_dx = b_dz * inv_temp
    if HAS_SOFTCAP:
        b_dx = b_dx * (1.0 - b_th * b_th)
    return b_dx


@triton.jit
def _lce_dlogits(
    b_x, b_y, o_v, m_v, m_n, b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h, softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr,
):
    """dL/dx for a ``[BLOCK_N, BLOCK_V]`` tile of raw logits ``b_x`` (fp32); 0 on masked rows / columns."""
    b_z, b_t = _lce_transform(b_x, softcap, inv_temp, HAS_SOFTCAP)
    m_nv = m_n[:, None] & m_v[None, :]
    b_dx = _lce_dx(
        b_z, b_t, m_nv, o_v[None, :], b_y[:, None], b_m[:, None], b_ls[:, None], b_gl[:, None], b_gt[:, None],
        b_gs[:, None], b_ge[:, None], b_h[:, None], inv_temp, HAS_SOFTCAP, HAS_G_SUMZ, HAS_G_ENT,
    )  # [BLOCK_N, BLOCK_V]
    return tl.where(m_nv, b_dx, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# fused forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _lce_stats_fwd_kernel(
    h, w, b, y, row_order, n_active, part,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_pf, stride_ps, ignore_index, softcap, inv_temp,
    n_splits,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RETURN_SUMZ: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (row block, vocabulary split): partial statistics of ``cdiv(cdiv(V, BLOCK_V), n_splits)`` V tiles
    (the last split fewer) into ``part``.

    Program order is grouped: ``pid = i_n · n_splits + i_s``, so the programs of one row block run side by side and
    their re-reads of the ``[BLOCK_N, D]`` block of ``h`` hit L2. ``part`` is fp32 ``[5, n_splits, N]`` (field
    stride ``stride_pf``, split stride ``stride_ps``): ``m`` (max), ``s = Σ e^{z−m}``, ``a = Σ e^{z−m}(z−m)``,
    the target logit (0 unless the target column is in this split) and ``Σ z``; only active rows are written.
    """
    pid = tl.program_id(0).to(tl.int64)
    i_n = pid // n_splits
    i_s = pid % n_splits
    n_act = tl.load(n_active).to(tl.int64)
    if i_n * BLOCK_N >= n_act:  # no active row in this block: no GEMM work, nothing to write
        return
    o_r = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # positions in row_order
    m_n = (o_r < N) & (o_r < n_act)  # active rows of this block
    o_n = tl.load(row_order + o_r, mask=m_n, other=0).to(tl.int64)  # row ids
    b_y = tl.load(y + o_n, mask=m_n, other=ignore_index).to(tl.int64)  # [BLOCK_N]
    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)  # running max
    b_s = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z - m}
    b_a = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ e^{z - m} (z - m)
    b_t = tl.zeros([BLOCK_N], dtype=tl.float32)  # target logit
    b_sz = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σ z
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits)
    v_lo = i_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < v_hi
        b_x = _lce_logits_tile(
            h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # [BLOCK_N, BLOCK_V]
        if HAS_BIAS:
            b_x += tl.load(b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        b_z, _ = _lce_transform(b_x, softcap, inv_temp, HAS_SOFTCAP)
        b_m, b_s, b_a, b_t, b_sz = _lce_online_stats(
            b_z, m_v[None, :], o_v[None, :], b_y[:, None], b_m, b_s, b_a, b_t, b_sz,
            1, True, RETURN_SUMZ, RETURN_ENTROPY,
        )
    p_part = part + i_s * stride_ps + o_n
    tl.store(p_part, b_m, mask=m_n)
    tl.store(p_part + stride_pf, b_s, mask=m_n)
    tl.store(p_part + 3 * stride_pf, b_t, mask=m_n)
    if RETURN_ENTROPY:
        tl.store(p_part + 2 * stride_pf, b_a, mask=m_n)
    if RETURN_SUMZ:
        tl.store(p_part + 4 * stride_pf, b_sz, mask=m_n)


# ----------------------------------------------------------------------------------------------------------------
# fused backward (recompute)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _lce_load_row_coefs(
    o_n, m_n, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent,
    HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr, HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr,
):
    """Per-row ``(m, log s, g_lse, g_tgt, g_sumz, g_ent, H)``: the forward's row max and ``log Σ e^{z − m}``
    (``lse = m + log s``, kept apart so ``p`` is formed relative to the max), upstream gradients, entropy."""
    b_m = tl.load(rmax + o_n, mask=m_n, other=0.0)
    b_ls = tl.load(logs + o_n, mask=m_n, other=0.0)
    b_gl = tl.load(g_lse + o_n, mask=m_n, other=0.0) if HAS_G_LSE else tl.zeros_like(b_m)
    b_gt = tl.load(g_tgt + o_n, mask=m_n, other=0.0) if HAS_G_TGT else tl.zeros_like(b_m)
    b_gs = tl.load(g_sumz + o_n, mask=m_n, other=0.0) if HAS_G_SUMZ else tl.zeros_like(b_m)
    if HAS_G_ENT:
        b_ge = tl.load(g_ent + o_n, mask=m_n, other=0.0)
        b_h = tl.load(ent + o_n, mask=m_n, other=0.0)
    else:
        b_ge = tl.zeros_like(b_m)
        b_h = tl.zeros_like(b_m)
    return b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h


@triton.jit
def _lce_acc_slab(
    acc, o_a, m_a, stride_a, b_g, x, o_x, m_x, stride_xr, stride_xd, D,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``acc[o_a, :] += b_g · x[o_x, :]`` over ``D`` in ``BLOCK_D`` tiles: ``acc`` fp32 (row stride ``stride_a``)."""
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        p_x = x + o_x[:, None].to(tl.int64) * stride_xr + o_d[None, :] * stride_xd  # int64: V·D may pass 2^31
        b_x = tl.load(p_x, mask=m_x[:, None] & m_d[None, :], other=0.0)  # [len(o_x), BLOCK_D]
        if UPCAST:
            b_x = b_x.to(tl.float32)
        p_a = acc + o_a[:, None] * stride_a + o_d[None, :]
        m_ad = m_a[:, None] & m_d[None, :]
        b_acc = tl.load(p_a, mask=m_ad, other=0.0)  # fp32 [len(o_a), BLOCK_D]
        b_acc = tl.dot(b_g, b_x, b_acc, input_precision=DOT_PRECISION)
        tl.store(p_a, b_acc, mask=m_ad)


@triton.jit
def _lce_bwd_dh_kernel(
    h, w, b, y, row_order, n_active, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, dh,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_dhn, ignore_index, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr,
    HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    n_act = tl.load(n_active).to(tl.int64)
    if i_n * BLOCK_N >= n_act:  # dh is zero-initialised: nothing to do for inactive blocks
        return
    o_r = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = (o_r < N) & (o_r < n_act)
    o_n = tl.load(row_order + o_r, mask=m_n, other=0).to(tl.int64)
    b_y = tl.load(y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
    b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h = _lce_load_row_coefs(
        o_n, m_n, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, HAS_G_LSE, HAS_G_TGT, HAS_G_SUMZ, HAS_G_ENT
    )
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = _lce_logits_tile(
            h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if HAS_BIAS:
            b_x += tl.load(b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        b_dx = _lce_dlogits(
            b_x, b_y, o_v, m_v, m_n, b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h, softcap, inv_temp,
            HAS_SOFTCAP, HAS_G_SUMZ, HAS_G_ENT,
        )  # [BLOCK_N, BLOCK_V] fp32
        if not UPCAST:
            b_dx = b_dx.to(w.dtype.element_ty)
        _lce_acc_slab(  # dh[rows] += dx · W[o_v]
            dh, o_n, m_n, stride_dhn, b_dx, w, o_v, m_v, stride_wv, stride_wd, D, UPCAST, DOT_PRECISION, BLOCK_D
        )


@triton.jit
def _lce_bwd_dw_kernel(
    h, w, b, y, row_order, n_active, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, dw, db,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_dwv, ignore_index, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LSE: tl.constexpr, HAS_G_TGT: tl.constexpr,
    HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    n_act = tl.load(n_active).to(tl.int64)
    if HAS_BIAS:
        b_bias = tl.load(b + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_db = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, n_act, BLOCK_N):  # active row blocks only (device-side count, no host sync)
        o_r = r0 + tl.arange(0, BLOCK_N)
        m_n = (o_r < N) & (o_r < n_act)
        o_n = tl.load(row_order + o_r, mask=m_n, other=0).to(tl.int64)
        b_y = tl.load(y + o_n, mask=m_n, other=ignore_index).to(tl.int64)
        b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h = _lce_load_row_coefs(
            o_n, m_n, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, HAS_G_LSE, HAS_G_TGT, HAS_G_SUMZ, HAS_G_ENT
        )
        b_x = _lce_logits_tile(
            h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_hd, stride_wv, stride_wd,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        if HAS_BIAS:
            b_x += b_bias[None, :]
        b_dx = _lce_dlogits(
            b_x, b_y, o_v, m_v, m_n, b_m, b_ls, b_gl, b_gt, b_gs, b_ge, b_h, softcap, inv_temp,
            HAS_SOFTCAP, HAS_G_SUMZ, HAS_G_ENT,
        )  # [BLOCK_N, BLOCK_V] fp32
        if NEED_DB:
            b_db += tl.sum(b_dx, axis=0)
        if NEED_DW:
            b_dxt = tl.trans(b_dx)  # [BLOCK_V, BLOCK_N]
            if not UPCAST:
                b_dxt = b_dxt.to(h.dtype.element_ty)
            _lce_acc_slab(  # dW[o_v] += dxᵀ · h[rows]
                dw, o_v, m_v, stride_dwv, b_dxt, h, o_n, m_n, stride_hn, stride_hd, D, UPCAST, DOT_PRECISION, BLOCK_D
            )
    if NEED_DB:
        tl.store(db + o_v, b_db, mask=m_v)


# ----------------------------------------------------------------------------------------------------------------
# chunked strategy: row kernel over a cuBLAS logits chunk, dx written in place
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _lce_chunk_row_kernel(
    x, dx, b, y, lse, ent, nll, smooth, rmax, logs, acc, g_lse, g_tgt, g_sumz, g_ent, g_lse2, stride_xn, stride_dxn, V,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_STATS: tl.constexpr, WANT_SMOOTH: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WRITE_DX: tl.constexpr, HAS_G_SUMZ: tl.constexpr, HAS_G_ENT: tl.constexpr,
    HAS_G_LSE2: tl.constexpr, WANT_ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per (active) row of fp32 raw logits ``x`` (the chunked path of :mod:`.chunked`).

    ``COMPUTE_STATS``: online max / Σe^{z−m} over V tiles, with the target logit, ``Σ(z − m)`` and
    ``Σe^{z−m}(z − m)`` kept relative to the running max; writes ``lse``, ``nll = log s − (z_y − m)`` (never the
    difference of two absolute values), ``smooth = log s − Σ(z − m)/V``, ``ent``, and the row max ``m`` / ``log s``
    (``rmax`` / ``logs``, what a later recompute forms ``p`` from), and ``acc = [z_y = max z]`` (``WANT_ACC``).
    Else ``lse``, ``rmax``, ``logs`` / ``ent`` are read. ``p = e^{(z − m) − log s}`` is always relative to the row
    max (exact at large logits).
    ``WRITE_DX``: ``dx = [(g_lse + 2·g_lse2·lse)·p + g_tgt·[v = y] + g_sumz − g_ent·p·(z − lse + H)] / T · (1 − tanh²)``
    in ``dx``'s dtype (may alias ``x``: each tile is read before it is written).
    """
    i_n = tl.program_id(0).to(tl.int64)
    p_x = x + i_n * stride_xn
    b_y = tl.load(y + i_n).to(tl.int64)
    if COMPUTE_STATS:
        b_m = float("-inf")
        b_s = 0.0
        b_a = 0.0  # Σ e^{z - m} (z - m)
        b_t = 0.0  # z_y
        b_sd = 0.0  # Σ (z - m)
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            b_z, _ = _lce_row_tile(p_x, b, o_v, m_v, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
            b_zm = tl.where(m_v, b_z, float("-inf"))
            b_t += tl.sum(tl.where(o_v == b_y, b_z, 0.0), axis=0)
            b_m_new = tl.maximum(b_m, tl.max(b_zm, axis=0))
            b_shift = tl.where(b_s > 0, b_m - b_m_new, 0.0)  # no (-inf) * 0 on the first tile
            b_e = tl.exp(b_zm - b_m_new)  # 0 on masked columns
            b_d = tl.where(m_v, b_z - b_m_new, 0.0)
            b_alpha = tl.exp(b_m - b_m_new)
            if WANT_ENTROPY:
                b_a = b_alpha * (b_a + b_shift * b_s) + tl.sum(b_e * b_d, axis=0)
            if WANT_SMOOTH:
                b_sd += v0 * b_shift + tl.sum(b_d, axis=0)
            b_s = b_s * b_alpha + tl.sum(b_e, axis=0)
            b_m = b_m_new
        b_log_s = tl.log(b_s)
        b_lse = b_m + b_log_s
        tl.store(lse + i_n, b_lse)
        tl.store(rmax + i_n, b_m)
        tl.store(logs + i_n, b_log_s)
        tl.store(nll + i_n, tl.maximum(b_log_s - (b_t - b_m), 0.0))
        if WANT_ACC:  # the target attains the row max (ties count as correct); both exact values of one z
            tl.store(acc + i_n, (b_t >= b_m).to(tl.float32))
        if WANT_SMOOTH:
            tl.store(smooth + i_n, b_log_s - b_sd / V)
        if WANT_ENTROPY:
            b_h = tl.maximum(b_log_s - b_a / b_s, 0.0)
            tl.store(ent + i_n, b_h)
    else:
        b_lse = tl.load(lse + i_n)
        b_m = tl.load(rmax + i_n)
        b_log_s = tl.load(logs + i_n)
        if HAS_G_ENT:
            b_h = tl.load(ent + i_n)
    if WRITE_DX:
        b_gl = tl.load(g_lse + i_n)
        if HAS_G_LSE2:
            b_gl += 2.0 * tl.load(g_lse2 + i_n) * b_lse
        b_gt = tl.load(g_tgt + i_n)
        b_gs = tl.load(g_sumz + i_n) if HAS_G_SUMZ else 0.0
        b_ge = tl.load(g_ent + i_n) if HAS_G_ENT else 0.0
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            b_z, b_th = _lce_row_tile(p_x, b, o_v, m_v, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
            b_q = (b_z - b_m) - b_log_s
            b_p = tl.exp(tl.where(m_v, b_q, float("-inf")))
            b_dz = b_gl * b_p + tl.where(o_v == b_y, b_gt, 0.0)
            if HAS_G_SUMZ:
                b_dz += b_gs
            if HAS_G_ENT:
                b_dz -= b_ge * b_p * (b_q + b_h)  # z - Σ p z = (z - m) - log s + H
            b_dx = b_dz * inv_temp
            if HAS_SOFTCAP:
                b_dx = b_dx * (1.0 - b_th * b_th)
            tl.store(dx + i_n * stride_dxn + o_v, b_dx.to(dx.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------------------------
# configs (one known-good per kernel; T3S_AUTOTUNE=1 searches a few)
# ----------------------------------------------------------------------------------------------------------------


# Shipped configs, (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) per kernel and operand width: each was
# compiled for sm_90 (triton 3.9) and is free of register spills (ptxas STACK 0); speed is unmeasured here.
_CONFIGS = {
    ("fwd", 2): (128, 128, 64, 8, 3),
    ("dh", 2): (64, 128, 64, 8, 3),
    ("dw", 2): (64, 64, 64, 8, 3),
    ("fwd", 4): (64, 64, 32, 4, 2),
    ("dh", 4): (32, 64, 32, 8, 2),
    ("dw", 4): (32, 64, 32, 8, 2),
}
# Programs of the fused forward resident per SM with its shipped config (registers and shared memory of the sm_90
# compile, checked by tests/kernels/_aot_compile.py); the split rule sizes waves with it.
_CTAS_PER_SM = {("fwd", 2): 1, ("fwd", 4): 2}


def _tile_config(kind: str, dtype: torch.dtype) -> dict:
    if interpreting():  # big tiles = few Python-level iterations; still small enough to exercise every mask
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32)
    bn, bv, bd, nw, ns = _CONFIGS[(kind, 4 if dtype == torch.float32 else 2)]
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns)


def _autotune_configs():
    return [
        triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd), num_warps=nw, num_stages=ns)
        for bn, bv, bd, nw, ns in [
            (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 2),
            (32, 64, 32, 8, 2),
        ]
    ]


_KEY = ["V", "D"]
if _AUTOTUNE and not interpreting():  # pragma: no cover - GPU-only path
    _fwd_tuned = triton.autotune(_autotune_configs(), key=_KEY)(_lce_stats_fwd_kernel)
    _dh_tuned = triton.autotune(_autotune_configs(), key=_KEY, reset_to_zero=["dh"])(_lce_bwd_dh_kernel)
    _dw_tuned = triton.autotune(_autotune_configs(), key=_KEY, reset_to_zero=["dw", "db"])(_lce_bwd_dw_kernel)
else:
    _fwd_tuned = _dh_tuned = _dw_tuned = None


def _check_reset_args(tuned, args: dict) -> None:
    """The autotuner zeroes its ``reset_to_zero`` arguments before every trial: none may share memory with another
    argument (a placeholder aliasing ``lse`` once zeroed it and gave wrong gradients)."""
    for name in getattr(tuned, "reset_to_zero", ()):
        t = args[name]
        for other, u in args.items():
            if other != name and isinstance(u, torch.Tensor) and u.untyped_storage().data_ptr() == (
                t.untyped_storage().data_ptr()
            ):
                raise RuntimeError(f"autotuned launch: reset_to_zero argument {name!r} aliases {other!r}")


def _launch(kind: str, kernel, tuned, grid_fn, args: dict, dtype: torch.dtype):
    """Launch with the shipped config, or through the autotuner when ``T3S_AUTOTUNE=1``."""
    if tuned is not None:
        _check_reset_args(tuned, args)
        tuned[lambda meta: (grid_fn(meta),)](**args)
    else:
        cfg = _tile_config(kind, dtype)
        kernel[(grid_fn(cfg),)](**args, **cfg)


def _dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs: exact ``"ieee"`` dots unless the user opted into TF32 (``torch.set_float32_matmul_precision``).
    Half inputs: Triton's default (the flag only affects fp32 operands). Interpreter: ``"ieee"`` (operands are
    upcast to fp32 there)."""
    if interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


# ----------------------------------------------------------------------------------------------------------------
# upstream-gradient scaling of gradients formed in the forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _scale_unless_one_kernel(x, scale, n, BLOCK: tl.constexpr):
    """``x *= scale`` over ``n`` contiguous elements, a no-op when the device scalar ``scale`` is 1: every program
    reads the scalar first and returns at once (a loss's ``backward()`` seeds 1, so the common call costs one
    scalar read per program instead of a pass over ``x``, with no host sync). Grid-stride loop."""
    b_s = tl.load(scale).to(tl.float32)
    if b_s == 1.0:
        return
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for o0 in range(pid * BLOCK, n, step):
        o = o0 + tl.arange(0, BLOCK)
        m = o < n
        b_x = tl.load(x + o, mask=m, other=0.0)
        tl.store(x + o, (b_x.to(tl.float32) * b_s).to(b_x.dtype), mask=m)


_SCALE_BLOCK = 4096
_SCALE_MAX_PROGRAMS = 1024


def scale_unless_one(x: torch.Tensor, scale: torch.Tensor) -> None:
    """In place ``x *= scale`` (``scale``: a one-element device tensor) that costs no pass over ``x`` when
    ``scale == 1``; no host read."""
    if x.numel() == 0:
        return
    assert x.is_contiguous(), "scale_unless_one takes a contiguous tensor"
    grid = (min(_SCALE_MAX_PROGRAMS, triton.cdiv(x.numel(), _SCALE_BLOCK)),)
    _scale_unless_one_kernel[grid](x, scale.reshape(1), x.numel(), BLOCK=_SCALE_BLOCK)


# ----------------------------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------------------------


FUSED_BACKWARDS = ("kernel", "chunked")


def fused_backward_mode() -> str:
    """Backward of the fused strategy, from ``T3S_FUSED_BACKWARD`` (read at call time):

    * ``"kernel"`` (default): the two Triton recompute kernels; deterministic, skip ignored / zero-weight rows.
    * ``"chunked"``: the chunked path's sweep (:mod:`.chunked`): cuBLAS logits chunks of the active rows + the
      Triton row kernel for ``dx`` + cuBLAS ``dh`` / ``dW`` (GEMM-speed, bounded workspace).
    """
    mode = os.environ.get("T3S_FUSED_BACKWARD", "kernel")
    if mode not in FUSED_BACKWARDS:
        raise ValueError(f"T3S_FUSED_BACKWARD must be one of {FUSED_BACKWARDS}, got {mode!r}")
    return mode


def active_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_order, n_active)``: active rows first (stable), and their count as a device int32 [1]; no sync."""
    inactive = (targets == ignore_index).to(torch.int8)
    row_order = torch.argsort(inactive, stable=True)
    n_active = (targets.numel() - inactive.sum(dtype=torch.int32)).reshape(1).to(torch.int32)
    return row_order.contiguous(), n_active


def _common(hidden, weight, bias, targets, opts):
    N, D = hidden.shape
    V = weight.shape[0]
    return dict(
        h=hidden, w=weight, b=bias if bias is not None else hidden, y=targets.contiguous(),
        N=N, V=V, D=D, stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        ignore_index=opts.ignore_index, softcap=float(opts.softcap or 1.0), inv_temp=1.0 / float(opts.temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        UPCAST=interpreting(), DOT_PRECISION=_dot_precision(hidden.dtype),
    )


_INTERPRET_SPLITS = 3  # device-free rule under the interpreter: tests see several splits on small vocabularies
_DEVICE_SLOTS: dict[str, tuple[int, int]] = {}


def _device_slots(device: torch.device) -> tuple[int, int]:
    """``(SM count, L2 bytes)`` of a CUDA device, cached."""
    key = str(device)
    if key not in _DEVICE_SLOTS:
        p = torch.cuda.get_device_properties(device)
        _DEVICE_SLOTS[key] = (p.multi_processor_count, int(getattr(p, "L2_cache_size", 50 * 2**20)))
    return _DEVICE_SLOTS[key]


def fwd_splits(N: int, V: int, D: int, block_n: int, block_v: int, elt_bytes: int, sms: int | None,
               l2_bytes: int = 50 * 2**20, ctas_per_sm: int = 1) -> int:
    """Vocabulary splits of the fused forward (the rule; ``sms=None``: the interpreter's fixed rule).

    With ``P = sms · ctas_per_sm`` programs resident at once and the grouped order, a wave holds ``P / S`` row
    blocks × all ``S`` splits. Two constraints:

    * L2: the ``P / S`` resident ``[block_n, D]`` blocks of ``h`` must fit in half of L2, so their per-V-tile
      re-reads never go to HBM: ``S ≥ P · block_n · D · elt / (L2 / 2)``. ``W`` is then read from HBM once per
      wave of row blocks: ``cdiv(N, block_n) · S / P`` passes over ``W``.
    * waves: among ``S`` from that floor up to 8 waves' worth, take the one with the best wave efficiency
      ``work / (waves · P · tiles_per_split)``, the smallest ``S`` within 5 % of the best (fewer ``W`` passes).

    The result never leaves a split empty (``S = cdiv(v_tiles, cdiv(v_tiles, S))``); the workspace
    ``5 · S · N · 4`` bytes stays small (``S · cdiv(N, block_n) ≤ 8 P`` unless the L2 floor is higher).
    """
    v_tiles = max(1, -(-V // block_v))
    if sms is None:
        s = min(v_tiles, _INTERPRET_SPLITS)
    else:
        slots = max(1, sms * ctas_per_sm)
        n_blocks = max(1, -(-N // block_n))
        s_lo = min(v_tiles, max(1, -(-(slots * block_n * D * elt_bytes) // max(1, l2_bytes // 2))))
        s_hi = min(v_tiles, max(s_lo, -(-8 * slots // n_blocks)))
        s_lo = min(s_lo, s_hi)

        def efficiency(s):
            per = -(-v_tiles // s)
            waves = -(-(n_blocks * s) // slots)
            return n_blocks * v_tiles / (waves * slots * per)

        eff = {s: efficiency(s) for s in range(s_lo, s_hi + 1)}
        best = max(eff.values())
        s = min(s for s, e in eff.items() if e >= best - 0.05)
    return -(-v_tiles // -(-v_tiles // s))


def fwd_plan(N: int, V: int, D: int, dtype: torch.dtype, device: torch.device | None = None, *,
             sms: int | None = None, l2_bytes: int | None = None, n_active: int | None = None) -> dict:
    """Launch plan of the fused forward and its counts (what a cost model reads; nothing is launched).

    ``grid = cdiv(N, BLOCK_N) · splits`` programs; an active program runs ``tiles_per_split`` V tiles (the last
    split fewer), each a loop of ``d_steps = cdiv(D, BLOCK_D)`` ``[BLOCK_N, BLOCK_D] × [BLOCK_D, BLOCK_V]`` dots.
    The SM count / L2 size come from ``device`` (CUDA) or ``sms`` / ``l2_bytes`` (e.g. an H100's 132 / 50 MiB on a
    CPU machine); neither: the interpreter's fixed rule. Counts for ``n_active`` active rows (default ``N``):
    ``flops`` (tensor-core, tile-padded), ``l2_operand_bytes`` (operand tiles loaded into shared memory),
    ``hbm_bytes`` (``h`` once, ``W`` once per wave of row blocks, the partials workspace written and read),
    ``workspace_bytes``.
    """
    width = 4 if dtype == torch.float32 else 2
    if sms is None and device is not None and device.type == "cuda" and not interpreting():
        sms, l2_bytes = _device_slots(device)
    cfg = _tile_config("fwd", dtype) if sms is None else dict(zip(
        ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages"), _CONFIGS[("fwd", width)]))
    bn, bv, bd = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    elt = torch.finfo(dtype).bits // 8
    ctas = _CTAS_PER_SM.get(("fwd", width), 1)
    splits = fwd_splits(N, V, D, bn, bv, elt, sms, l2_bytes or 50 * 2**20, ctas)
    v_tiles = max(1, triton.cdiv(V, bv))
    per = triton.cdiv(v_tiles, splits)
    n_b = triton.cdiv(N if n_active is None else n_active, bn)
    d_steps = triton.cdiv(D, bd)
    slots = (sms or 1) * ctas
    workspace = 5 * splits * N * 4
    return dict(
        cfg, splits=splits, tiles_per_split=per, grid=triton.cdiv(N, bn) * splits, d_steps=d_steps,
        flops=2 * n_b * bn * v_tiles * bv * d_steps * bd,
        l2_operand_bytes=n_b * v_tiles * d_steps * (bn + bv) * bd * elt,
        hbm_bytes=n_b * bn * D * elt + max(1.0, n_b * splits / slots) * V * D * elt + 2 * workspace,
        workspace_bytes=workspace,
    )


def _combine_splits(part, active, want_sumz, want_entropy, keep_relative=False):
    """Deterministic merge of the per-split partials ``part [5, S, N]`` (fp32, torch ops in a fixed order).

    ``M = max_s m_s``, ``S = Σ_s s_s e^{m_s − M}``; the loss is kept relative to the max,
    ``nll = log S + (M − z_y)`` (never ``lse − z_y`` of two absolute values, which cancel at large logits);
    ``lse = M + log S``; entropy ``H = log S − A / S`` with ``A = Σ_s e^{m_s − M}(a_s + (m_s − M) s_s)``.
    Inactive rows (unwritten partials) come out 0. ``keep_relative``: also ``(M, log S)``, what the recompute
    backward forms ``p`` from.
    """
    m, s, t = part[0], part[1], part[3]
    big_m = m.amax(0)
    safe_m = torch.where(active, big_m, torch.zeros_like(big_m))  # no (-inf) - (-inf) on inactive rows
    scale = torch.exp(m - safe_m)  # [S, N]; 0 for empty splits
    s_tot = (s * scale).sum(0)
    log_s = torch.log(s_tot)
    zero = torch.zeros_like(big_m)
    nll = torch.where(active, log_s + (safe_m - t.sum(0)), zero)
    lse = torch.where(active, safe_m + log_s, zero)
    sumz = torch.where(active, part[4].sum(0), zero) if want_sumz else None
    ent = None
    if want_entropy:
        shift = torch.where(s > 0, m - safe_m, torch.zeros_like(m))  # empty splits: avoid (-inf) · 0
        a_tot = (scale * (part[2] + shift * s)).sum(0)
        ent = torch.where(active, (log_s - a_tot / s_tot).clamp_min(0.0), zero)
    if keep_relative:
        return lse, nll, sumz, ent, safe_m, torch.where(active, log_s, zero)
    return lse, nll, sumz, ent


def lce_stats_fwd(hidden, weight, bias, targets, row_order, n_active, opts, keep_relative=False):
    """Fused forward: ``(lse, nll, sumz | None, entropy | None)`` fp32 ``[N]`` (``nll = lse − z_y``, formed
    relative to the row max); stores nothing else. Workspace: the fp32 ``[5, splits, N]`` partials.
    ``keep_relative``: also the row max and ``log Σ e^{z − max}`` (for :func:`lce_stats_bwd`)."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if N == 0:
        z = torch.zeros(0, **f32)
        out = (z, z.clone(), z.clone() if opts.want_sumz else None, z.clone() if opts.want_entropy else None)
        return (*out, z.clone(), z.clone()) if keep_relative else out
    plan = fwd_plan(N, V, D, hidden.dtype, hidden.device)
    splits = plan["splits"]
    part = torch.empty(5, splits, N, **f32)
    args = _common(hidden, weight, bias, targets, opts)
    args.update(
        row_order=row_order, n_active=n_active, part=part, stride_pf=part.stride(0), stride_ps=part.stride(1),
        n_splits=splits,
        RETURN_SUMZ=opts.want_sumz, RETURN_ENTROPY=opts.want_entropy,
    )
    _launch("fwd", _lce_stats_fwd_kernel, _fwd_tuned, lambda m: triton.cdiv(N, m["BLOCK_N"]) * splits, args,
            hidden.dtype)
    return _combine_splits(part, targets != opts.ignore_index, opts.want_sumz, opts.want_entropy, keep_relative)


def lce_stats_bwd(
    hidden, weight, bias, targets, row_order, n_active, rmax, logs, ent, g_lse, g_tgt, g_sumz, g_ent, opts,
    *, need_dh: bool, need_dw: bool, need_db: bool, dw_dtype: torch.dtype | None = None,
):
    """Recompute backward of the primitive for arbitrary per-token upstream gradients (any may be ``None``), from
    the forward's row max ``rmax`` and ``logs = log Σ e^{z − rmax}`` (``p`` relative to the max: exact at large
    logits).
    ``dW`` accumulates in fp32 and is returned in ``dw_dtype`` (default ``weight``'s; fp32 for fp32 master
    weights: the accumulator itself)."""
    N, D = hidden.shape
    V = weight.shape[0]

    def prep(g):
        return None if g is None else g.detach().float().contiguous()

    g_lse, g_tgt, g_sumz, g_ent = prep(g_lse), prep(g_tgt), prep(g_sumz), prep(g_ent)
    args = _common(hidden, weight, bias, targets, opts)
    args.update(
        row_order=row_order, n_active=n_active, rmax=rmax, logs=logs, ent=ent if ent is not None else logs,
        g_lse=g_lse if g_lse is not None else logs, g_tgt=g_tgt if g_tgt is not None else logs,
        g_sumz=g_sumz if g_sumz is not None else logs, g_ent=g_ent if g_ent is not None else logs,
        HAS_G_LSE=g_lse is not None, HAS_G_TGT=g_tgt is not None, HAS_G_SUMZ=g_sumz is not None,
        HAS_G_ENT=g_ent is not None,
    )
    dh = dw = db = None
    if need_dh:
        dh_acc = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
        _launch(
            "dh", _lce_bwd_dh_kernel, _dh_tuned, lambda m: triton.cdiv(N, m["BLOCK_N"]),
            dict(args, dh=dh_acc, stride_dhn=dh_acc.stride(0)), hidden.dtype,
        )
        dh = dh_acc.to(hidden.dtype)
    if need_dw or need_db:
        dw_acc = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else None
        db_acc = torch.empty(V, dtype=torch.float32, device=hidden.device) if need_db else None
        # own placeholders for absent outputs: the autotuner zeroes dw / db (reset_to_zero) before every trial
        unused = torch.zeros(1, dtype=torch.float32, device=hidden.device)
        _launch(
            "dw", _lce_bwd_dw_kernel, _dw_tuned, lambda m: triton.cdiv(V, m["BLOCK_V"]),
            dict(
                args, dw=dw_acc if need_dw else unused, db=db_acc if need_db else unused.clone(),
                stride_dwv=dw_acc.stride(0) if need_dw else 0, NEED_DW=need_dw, NEED_DB=need_db,
            ),
            hidden.dtype,
        )
        dw = dw_acc.to(dw_dtype or weight.dtype) if need_dw else None
        db = db_acc.to(bias.dtype) if need_db else None
    return dh, dw, db


def chunk_row_block(V: int) -> dict:
    """Launch config of the row kernels: one program per row, ``BLOCK_V`` columns per tile."""
    if interpreting():
        return dict(BLOCK_V=min(128, triton.next_power_of_2(V)))
    return dict(BLOCK_V=min(8192, triton.next_power_of_2(V)), num_warps=16 if V >= 8192 else 8)


def lce_chunk_rows(x, dx, bias, y, lse, ent, nll, smooth, rmax, logs, g, *, softcap, temperature,
                   compute_stats: bool, want_smooth: bool, want_entropy: bool, acc=None) -> None:
    """Launch ``_lce_chunk_row_kernel`` over the ``k`` rows of fp32 raw logits ``x [k, V]`` (the chunked path).

    ``g``: a :class:`~t3s_kernels.linear_ce.chunked.RowGrads` of ``[k]`` fp32 coefficients (``dx`` written) or
    ``None``; ``lse`` / ``nll`` / ``smooth`` / ``ent`` / ``rmax`` / ``logs`` (row max, ``log Σ e^{z − max}``):
    ``[k]`` fp32 outputs (``compute_stats``) or inputs.
    """
    k, V = x.shape
    if k == 0:
        return
    dummy = lse
    write_dx = g is not None

    def arg(t):
        return t.contiguous() if t is not None else dummy

    _lce_chunk_row_kernel[(k,)](
        x=x, dx=dx if write_dx else x, b=bias if bias is not None else x, y=y.contiguous(), lse=lse,
        ent=arg(ent), nll=arg(nll), smooth=arg(smooth), rmax=rmax, logs=logs, acc=arg(acc),
        g_lse=arg(g.g_lse if write_dx else None), g_tgt=arg(g.g_tgt if write_dx else None),
        g_sumz=arg(g.g_sumz if write_dx else None), g_ent=arg(g.g_ent if write_dx else None),
        g_lse2=arg(g.g_lse2 if write_dx else None),
        stride_xn=x.stride(0), stride_dxn=dx.stride(0) if write_dx else x.stride(0), V=V,
        softcap=float(softcap or 1.0), inv_temp=1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_STATS=compute_stats,
        WANT_SMOOTH=compute_stats and want_smooth, WANT_ENTROPY=compute_stats and want_entropy,
        WRITE_DX=write_dx, HAS_G_SUMZ=write_dx and g.g_sumz is not None,
        HAS_G_ENT=write_dx and g.g_ent is not None, HAS_G_LSE2=write_dx and g.g_lse2 is not None,
        WANT_ACC=compute_stats and acc is not None,
        **chunk_row_block(V),
    )
