"""The GEMM-bound chunked path: one device-agnostic implementation of every training reduction.

Per chunk of *active* rows (ignored and zero-weight rows are compacted away first, so they cost no GEMM work and
their hidden states are never read), the logits are a torch matmul (cuBLAS on CUDA, the CPU BLAS on CPU), the
row statistics and ``dlogits`` come from a row routine (a Triton kernel on CUDA / under the interpreter, torch
ops on CPU), and ``dh = dx·W``, ``dW += dxᵀ·h``, ``db += Σ dx`` are torch matmuls again.

Two sweeps share the loop:

* **gradient in the forward** (``reduction="mean" | "sum"``, the upstream gradient is a known per-token coefficient
  times one scalar): 2·n·D·V logits + 2·n·D·V ``dh`` + 2·n·D·V ``dW`` = **6·n·D·V** GEMM FLOPs (``n`` = active
  rows); the backward scales the stored gradients in place by ``grad_output``.
* **statistics forward + recompute backward** (``reduction="none"``, a differentiable ``lse`` / ``token_logprobs``):
  the forward stores per-token fp32 ``lse`` (and entropy) only, O(N); the backward recomputes the logits in the
  same chunks: 2·n·D·V + 6·n·D·V = **8·n·D·V**.

Chunk structure (``_Plan``): a *super-chunk* of ``rows`` rows of ``dlogits`` in the compute dtype (bf16 / fp16 on
CUDA, fp32 on CPU) is the operand of the two gradient GEMMs, so ``dh`` has M = ``rows`` and ``dW`` has K = ``rows``
(≥ 1024 at LLM shapes with the default budget); it is filled by *statistics sub-chunks* of ``stats_rows`` rows of
fp32 logits. When the compute dtype is fp32 the logits GEMM writes straight into the super-chunk (M = ``rows``)
and the sub-chunks are views of it. Every buffer is allocated once per call and reused (``out=`` / in-place ops):
resident memory is bounded by construction, whatever the allocator does.

Workspace budget: ``workspace_bytes`` (keyword of the public functions; default ``DEFAULT_WORKSPACE_BYTES`` per
device type, env ``T3S_WORKSPACE_BYTES`` overrides) bounds the super-chunk, the statistics sub-chunk and the scratch
rows together. At D = 4096, V = 151936 bf16 on CUDA (768 MiB, Triton rows), whatever N ≥ 1536: a 1536-row bf16
super-chunk (467 MB) + a 384-row fp32 sub-chunk (233 MB) = 700 MB, plus 25 MB of gathered ``h`` / ``dh`` rows when
rows are compacted or the hidden view is strided; a statistics-only sweep (no ``dlogits``: the ``reduction="none"``
forward, ``no_grad`` scoring) one 1280-row fp32 chunk (778 MB) at N = 32768, chunks of equal size otherwise
(1024 rows at N = 4096, not 3 × 1280 + 256). Sub-chunks are whole 128-row GEMM tiles, a super-chunk whole
sub-chunks. The row kernel writes each sub-chunk's statistics straight into the call's outputs.
On CPU (256 MiB, fp32): a 414-row super-chunk the logits GEMM fills directly + one 27-row fp32 scratch block (two
with softcap).

Weight-gradient accumulation (the dW contract; the N-outer loop sums ``dW`` over super-chunks):

* **fp32 weights** (also fp32 master weights under a lower-precision compute: ``hidden`` in bf16 / fp16, e.g. under
  ``torch.autocast``): the GEMMs read the weight rounded to the compute dtype (one cast copy per call on CUDA,
  V·D·2 bytes, as autocast's own weight cache holds), and ``dW`` accumulates in fp32 **straight into the fp32
  gradient returned** — exact to fp32 accumulation, no separate accumulator, either mode.
* **bf16 / fp16 weights**, ``weight_grad_accumulation="weight_dtype"`` (default, as Liger-Kernel and
  ``torch.nn.functional.linear_cross_entropy``): each super-chunk's GEMM sums its ``rows`` rows in fp32 and adds
  into the half-precision gradient output, rounding once per super-chunk: no extra workspace.
* bf16 / fp16 weights, ``"fp32"`` (opt-in): an fp32 ``[V, D]`` accumulator (V·D·4 bytes, 2.49 GB at V = 151936,
  D = 4096, above the 1 GiB budget); every chunk buffer is freed first and the accumulator is cast into the output
  in row blocks, so only the accumulator and the output (a returned gradient) are live then.

Measured error of ``dW`` against an fp64 oracle (relative Frobenius ``‖dW − dW₆₄‖ / ‖dW₆₄‖``; CPU, bf16 inputs,
sum reduction, N = 8192, D = 1024, V = 32768, 25 super-chunks as on a GPU at N = 32768 with the default budget;
``python -m bench.dw_error``): bf16 weights, ``"weight_dtype"`` **5.8e-3**; bf16 weights, ``"fp32"`` **1.7e-3**
(the final rounding to bf16 alone); fp32 master weights under a bf16 compute **2.8e-7** (fp32 accumulation). The
weight-dtype error grows with the number of super-chunks; the tests hold it under 1.5e-2 (and the fp32 mode under
6e-3).

Active rows: the caller may hand the row index over (``active_rows``); otherwise it is ``nonzero(active)``, one
host read of the count on CUDA (free on CPU). Rows outside the index contribute exactly nothing (exact zeros in
``dh``, no NaN / Inf from their hidden states can reach ``dW``).

Numerics: fp32 statistics; the per-token loss is formed relative to the row max,
``nll = log Σ exp(z − m) − (z_y − m)``, never as the difference of two absolute fp32 values; ``Σ z`` for label
smoothing and the entropy accumulator are kept relative to the max too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "ChunkedOptions",
    "RowGrads",
    "Stats",
    "active_row_index",
    "plan_chunks",
    "row_count",
    "rows_view",
    "recompute_backward",
    "stats_and_grads",
    "sweep_gradients",
]

MiB = 2**20
DEFAULT_WORKSPACE_BYTES = {"cuda": 768 * MiB, "cpu": 256 * MiB}
# CPU torch row routine: fp32 scratch blocks of this many bytes (rows of the super-chunk per row-op call; measured:
# 16 MiB beat 4 MiB by 1.7x on 2 cores, fewer calls outweigh the L2 misses)
_CPU_SCRATCH_BYTES = 16 * MiB
WEIGHT_GRAD_ACCUMULATIONS = ("weight_dtype", "fp32")


@dataclass(frozen=True)
class ChunkedOptions:
    """Options of the chunked path (``row_impl``: ``"triton"`` row kernel or ``"torch"`` row ops)."""

    softcap: float | None = None
    temperature: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    want_smooth: bool = False
    want_entropy: bool = False
    want_accuracy: bool = False
    workspace_bytes: int | None = None
    weight_grad_accumulation: str = "weight_dtype"
    row_impl: str = "torch"


class Stats(NamedTuple):
    """Per-token fp32 statistics of the active rows (compact, in active-row order)."""

    lse: torch.Tensor  # log Σ exp z
    nll: torch.Tensor  # lse − z_y, formed relative to the row max
    smooth: torch.Tensor | None  # lse − Σ z / V
    entropy: torch.Tensor | None  # −Σ p log p
    row_max: torch.Tensor | None = None  # max z and log Σ e^{z − max} (Triton rows: what a recompute forms p from;
    log_s: torch.Tensor | None = None  # the torch rows recompute log_softmax itself)
    accuracy: torch.Tensor | None = None  # 1.0 where z_y is the row max (ties count), else 0.0


class RowGrads(NamedTuple):
    """Per-row coefficients of ``dz = (g_lse + 2·g_lse2·lse)·p + g_tgt·[v = y] + g_sumz − g_ent·p·(z − Σpz)``
    (compact fp32 ``[n]`` or ``None`` for 0)."""

    g_lse: torch.Tensor
    g_tgt: torch.Tensor
    g_sumz: torch.Tensor | None = None
    g_ent: torch.Tensor | None = None
    g_lse2: torch.Tensor | None = None

    def take(self, sl) -> RowGrads:
        return RowGrads(*(None if g is None else g[sl] for g in self))


# ----------------------------------------------------------------------------------------------------------------
# active rows
# ----------------------------------------------------------------------------------------------------------------


def active_row_index(active: torch.Tensor, active_rows: torch.Tensor | None) -> torch.Tensor | None:
    """The compact index of the active rows, or ``None`` when every row is active (no gather needed).

    ``active``: bool ``[N]``. ``active_rows``: the caller's int64 index of exactly those rows (any order, no
    duplicates); checked eagerly on CPU (``ValueError``), device-side on CUDA (no sync). Without it,
    ``nonzero(active)`` reads the count back to the host (one sync on CUDA).
    """
    N = active.numel()
    if active_rows is None:
        idx = torch.nonzero(active).reshape(-1)
    else:
        idx = active_rows.reshape(-1)
        hits = torch.zeros(N, dtype=torch.int32, device=active.device)
        if idx.numel():
            hits.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        ok = (hits == active.to(torch.int32)).all()
        if active.device.type == "cuda" and os.environ.get("T3S_CHECK_INPUTS", "0") != "1":
            torch._assert_async(ok, "active_rows must list exactly the scored rows (target != ignore_index, "
                                "weight != 0)")
        elif not bool(ok):
            raise ValueError(
                "active_rows must list each scored row (target != ignore_index and token_weight != 0) exactly once; "
                f"got {idx.numel()} indices for {int(active.sum())} scored rows"
            )
    return None if idx.numel() == N else idx


# ----------------------------------------------------------------------------------------------------------------
# chunk plan
# ----------------------------------------------------------------------------------------------------------------


def _budget(device: torch.device, workspace_bytes: int | None) -> int:
    if workspace_bytes is not None:
        return int(workspace_bytes)
    env = os.environ.get("T3S_WORKSPACE_BYTES")
    if env:
        return int(env)
    return DEFAULT_WORKSPACE_BYTES.get(device.type, DEFAULT_WORKSPACE_BYTES["cuda"])


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """dtype of ``dlogits`` and of the gradient GEMMs: the input dtype on CUDA; fp32 on CPU (CPU BLAS has no
    half x half -> fp32 GEMM, so half inputs are upcast: ``weight`` once per call, ``hidden`` per chunk)."""
    return hidden.dtype if hidden.device.type == "cuda" else torch.float32


class ChunkPlan(NamedTuple):
    rows: int  # super-chunk rows (operand of the dh / dW GEMMs)
    stats_rows: int  # fp32 statistics sub-chunk rows
    direct: bool  # logits GEMM writes straight into the super-chunk (compute dtype fp32)
    scratch: int  # fp32 scratch blocks of [stats_rows, V] for the torch row routine
    compute_dtype: torch.dtype
    bytes: int  # workspace of the plan (buffers below; the fp32 dW accumulator is counted separately)


_GEMM_TILE_ROWS = 128  # cuBLAS's M tile at LLM shapes (bf16 / fp16 on sm_90)


def plan_chunks(n: int, V: int, D: int, hidden: torch.Tensor, opts: ChunkedOptions, *, with_dx: bool,
                gather: bool, extra_scratch: bool = False) -> ChunkPlan:
    """Rows per super-chunk / statistics sub-chunk for ``n`` active rows within the workspace budget."""
    budget = _budget(hidden.device, opts.workspace_bytes)
    cdt = _compute_dtype(hidden)
    csz = torch.finfo(cdt).bits // 8
    direct = cdt == torch.float32
    torch_rows = opts.row_impl == "torch"
    n_scr = (1 + int(extra_scratch)) if torch_rows else 0
    per_row_small = (2 * D * csz) if gather else 0  # gathered h rows + dh rows
    n = max(1, n)
    if direct:
        # super-chunk [rows, V] fp32 = the logits; the torch routine adds cache-sized fp32 scratch rows
        stats_rows = max(1, min(n, _CPU_SCRATCH_BYTES // (V * 4))) if torch_rows else 0
        scratch_bytes = n_scr * stats_rows * V * 4
        rows = max(1, (budget - scratch_bytes) // (V * 4 + per_row_small))
        rows = min(n, rows)
        if not torch_rows:
            stats_rows = rows  # the row kernel takes the whole super-chunk in one launch
        stats_rows = min(stats_rows, rows)
        total = rows * (V * 4 + per_row_small) + n_scr * stats_rows * V * 4
        return ChunkPlan(rows, stats_rows, True, n_scr, cdt, total)
    # fp32 statistics sub-chunk (+ scratch) gets a third of the budget, the half super-chunk the rest
    stats_per_row = V * 4 * (1 + n_scr)
    cap = max(1, (budget // 3 if with_dx else budget) // stats_per_row)
    stats_rows = min(n, cap)
    if n > cap > _GEMM_TILE_ROWS:  # whole 128-row GEMM tiles: a ragged last tile costs a full tile of FLOPs
        stats_rows = cap - cap % _GEMM_TILE_ROWS
        if not with_dx:  # equal chunks: a short last chunk's GEMM reads all of W for a few rows (memory-bound)
            per_chunk = -(-n // -(-n // stats_rows))
            stats_rows = min(stats_rows, -(-per_chunk // _GEMM_TILE_ROWS) * _GEMM_TILE_ROWS)
    if with_dx:
        rows = max(1, (budget - stats_rows * stats_per_row) // (V * csz + per_row_small))
        rows = max(stats_rows, (rows // stats_rows) * stats_rows)  # whole sub-chunks per super-chunk
        rows = min(n, rows)
    else:
        rows = stats_rows
    stats_rows = min(stats_rows, rows)
    total = stats_rows * stats_per_row + (rows * (V * csz + per_row_small) if with_dx else 0)
    return ChunkPlan(rows, stats_rows, False, n_scr, cdt, total)


# ----------------------------------------------------------------------------------------------------------------
# row routines: statistics and dlogits of a block of fp32 raw logits
# ----------------------------------------------------------------------------------------------------------------


def _rows_torch(z, scratch, y, bias, opts: ChunkedOptions, V: int, *, stats: bool, lse_in, ent_in,
                g: RowGrads | None, dx_out):
    """Torch row routine on ``z`` (fp32 ``[k, V]`` raw logits, overwritten; ``scratch``: fp32 blocks of its shape).

    One fused ``log_softmax`` gives ``log p = (z − m) − log Σe^{z−m}``, relative to the row max by construction,
    so ``nll = −log p_y`` and ``smooth = −Σ log p / V`` never cancel; ``p = exp(log p)``, then
    ``dx = [c_lse·p + c_tgt·[v = y] + c_sumz − c_ent·p·(log p + H)] / T · (1 − tanh²)``. The statistics are
    recomputed (not read from ``lse_in`` / ``ent_in``) so ``p`` is self-consistent with this chunk's logits.
    Returns :class:`Stats` when ``stats``; writes ``dx_out`` when ``g`` is given.
    """
    softcap, temp = opts.softcap, float(opts.temperature)
    logp = scratch[0]
    if bias is not None:
        z.add_(bias)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap / temp)
    elif temp != 1.0:
        z.mul_(1.0 / temp)
    torch._log_softmax(z, 1, False, out=logp)
    yi = y.reshape(-1, 1)
    want_h = (stats and opts.want_entropy) or (g is not None and g.g_ent is not None)
    need_lse = stats or (g is not None and g.g_lse2 is not None)
    nll = -logp.gather(1, yi).reshape(-1) if (stats or need_lse) else None
    lse = z.gather(1, yi).reshape(-1) + nll if need_lse else None
    # p goes to a buffer that may be overwritten: z itself unless its values are still needed (softcap derivative)
    p = scratch[1] if softcap is not None and g is not None else z
    acc = None
    if stats and opts.want_accuracy:  # before p may overwrite z: the target attains the row max (ties count)
        acc = (z.gather(1, yi).reshape(-1) >= z.amax(1)).float()
    if g is not None or want_h:
        torch.exp(logp, out=p)
    ent = -torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).reshape(-1).clamp_max(0) if want_h else None
    out = None
    if stats:
        smooth = -logp.sum(1) / V if opts.want_smooth else None
        out = Stats(lse, nll.clamp_min(0), smooth, ent if opts.want_entropy else None, accuracy=acc)
    if g is None:
        return out
    inv_t = 1.0 / temp  # dz / temperature: folded into the per-row coefficients
    c_lse = g.g_lse if g.g_lse2 is None else g.g_lse + 2.0 * g.g_lse2 * lse
    c_lse = c_lse * inv_t
    if g.g_ent is not None:  # z − Σ p z = log p + H
        logp.add_(ent[:, None]).mul_((-g.g_ent * inv_t)[:, None]).add_(c_lse[:, None])
        p.mul_(logp)
    else:
        p.mul_(c_lse[:, None])
    p.scatter_add_(1, yi, (g.g_tgt * inv_t).reshape(-1, 1))
    if g.g_sumz is not None:
        p.add_((g.g_sumz * inv_t)[:, None])
    if softcap is not None:  # · (1 − tanh²), tanh = z·T / softcap
        z.mul_(temp / softcap).square_().neg_().add_(1.0).mul_(p)
        p = z
    if p.data_ptr() != dx_out.data_ptr():
        dx_out.copy_(p)
    return out


def _rows_triton(z, y, bias, opts: ChunkedOptions, V: int, *, stats: bool, lse_in, ent_in, g: RowGrads | None,
                 dx_out, rel_in=None, stats_out=None):
    """``stats_out``: the ``[k]`` slices of the call's statistics outputs (:class:`Stats` order), written by the
    kernel in place: no per-chunk temporaries and no copy launches after it."""
    from . import kernels as K

    k = z.shape[0]
    f32 = dict(dtype=torch.float32, device=z.device)
    want_ent = opts.want_entropy or (g is not None and g.g_ent is not None)
    if stats:
        out = list(stats_out) if stats_out is not None else [None] * len(Stats._fields)
        wanted = (True, True, opts.want_smooth, want_ent, True, True, opts.want_accuracy)
        lse, nll, smooth, ent, rmax, logs, acc = (
            buf if buf is not None or not want else torch.empty(k, **f32) for buf, want in zip(out, wanted))
    else:
        acc = None
        lse, nll, smooth, ent = lse_in, None, None, ent_in
        rmax, logs = rel_in
    K.lce_chunk_rows(
        z, dx_out, bias, y, lse, ent, nll, smooth, rmax, logs, g, softcap=opts.softcap,
        temperature=opts.temperature, compute_stats=stats, want_smooth=opts.want_smooth, want_entropy=want_ent,
        acc=acc,
    )
    if not stats:
        return None
    return Stats(lse, nll, smooth, ent if opts.want_entropy else None, rmax, logs, acc)


# ----------------------------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------------------------


_ADD_BLOCK_BYTES = 16 * MiB  # fp32 product rows per block when a CPU fp32 GEMM adds into a half accumulator


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, the product summed in fp32 (``acc``: the fp32 output / accumulator, or a half-precision
    output accumulated in its own dtype)."""
    if a.dtype == acc.dtype:  # addmm.out (not addmm_): FlopCounterMode traces it
        torch.addmm(acc, a, b, out=acc)
    elif acc.dtype == torch.float32:  # CUDA half operands into an fp32 accumulator, no upcast copy (torch >= 2.8)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # CPU fp32 operands into a half output: fp32 products in bounded row blocks, rounded once when added
        step = max(1, _ADD_BLOCK_BYTES // (4 * acc.shape[1]))
        for r0 in range(0, acc.shape[0], step):
            acc[r0:r0 + step] += a[r0:r0 + step] @ b


def _logits_fp32(out: torch.Tensor, h_c: torch.Tensor, w_c: torch.Tensor) -> None:
    if h_c.dtype == torch.float32:
        torch.mm(h_c, w_c.t(), out=out)
    else:  # CUDA half operands, fp32 logits without an upcast copy
        torch.mm(h_c, w_c.t(), out_dtype=torch.float32, out=out)


def _sweep(hidden, weight, bias, y, idx, opts: ChunkedOptions, *, stats: bool, grads: RowGrads | None,
           lse_in=None, ent_in=None, rel_in=None, need_dh=False, need_dw=False, need_db=False):
    """One pass over the active rows (``idx``: compact index or ``None`` = all rows). ``stats``: compute the row
    statistics (else ``lse_in`` / ``ent_in`` and, for the Triton rows, ``rel_in = (row max, log s)``, compact,
    replace them); ``grads``: compact per-row coefficients of
    ``dlogits`` (``g_lse2`` uses the row's own LSE). Returns ``(Stats | None, dh, dw, db)``."""
    D = hidden.shape[-1]
    N = row_count(hidden)
    V = weight.shape[0]
    dev = hidden.device
    if hidden.dim() != 2 and idx is None:  # strided [..., D] rows (no [N, D] copy): gathered per chunk
        idx = torch.arange(N, device=dev)
    n = N if idx is None else idx.numel()
    with_dx = grads is not None
    plan = plan_chunks(n, V, D, hidden, opts, with_dx=with_dx, gather=idx is not None,
                       extra_scratch=with_dx and opts.softcap is not None)
    cdt = plan.compute_dtype
    f32 = dict(dtype=torch.float32, device=dev)

    dh = None
    if need_dh:
        dh = (torch.zeros if idx is not None else torch.empty)(N, D, dtype=hidden.dtype, device=dev)
    dw_acc = db_acc = None
    if need_dw:  # fp32 weights: the accumulator is the fp32 output; half weights: see the dW contract above
        acc_dtype = torch.float32 if opts.weight_grad_accumulation == "fp32" else weight.dtype
        dw_acc = torch.zeros(V, D, dtype=acc_dtype, device=dev)
    if need_db:
        db_acc = torch.zeros(V, **f32)
    st = None
    if stats:
        rel = opts.row_impl == "triton"
        st = [torch.empty(n, **f32), torch.empty(n, **f32),
              torch.empty(n, **f32) if opts.want_smooth else None, torch.empty(n, **f32) if opts.want_entropy else None,
              torch.empty(n, **f32) if rel else None, torch.empty(n, **f32) if rel else None,
              torch.empty(n, **f32) if opts.want_accuracy else None]
    if n == 0:
        return _finish(st, dh, dw_acc, db_acc, weight, bias, hidden.shape)

    # workspace, allocated once and reused by every chunk
    w_c = _gemm_weight(weight, hidden.dtype, cdt)
    b32 = bias.float() if bias is not None else None
    rows, srows = plan.rows, plan.stats_rows
    big = torch.empty(rows, V, dtype=cdt, device=dev) if (with_dx or plan.direct) else None
    zbuf = None if plan.direct else torch.empty(srows, V, **f32)
    scratch = [torch.empty(srows, V, **f32) for _ in range(plan.scratch)]
    hbuf = torch.empty(rows, D, dtype=hidden.dtype, device=dev) if idx is not None else None
    hcbuf = torch.empty(rows, D, dtype=cdt, device=dev) if hidden.dtype != cdt else None
    dh_direct = idx is None and cdt == hidden.dtype
    dhbuf = torch.empty(rows, D, dtype=cdt, device=dev) if need_dh and not dh_direct else None

    for s0 in range(0, n, rows):
        s1 = min(n, s0 + rows)
        k = s1 - s0
        if idx is not None:
            r_idx = idx[s0:s1]
            h_c = _gather_rows(hidden, r_idx, hbuf[:k])
            y_c = y.index_select(0, r_idx)
        else:
            h_c, y_c = hidden[s0:s1], y[s0:s1]
        if hcbuf is not None:
            h_c = hcbuf[:k].copy_(h_c)
        dx_big = big[:k] if big is not None else None
        if plan.direct:  # fp32 compute: the logits GEMM fills the super-chunk, M = rows
            _logits_fp32(dx_big, h_c, w_c)
        for j0 in range(0, k, srows):
            j1 = min(k, j0 + srows)
            sl = slice(s0 + j0, s0 + j1)
            if plan.direct:
                z = dx_big[j0:j1]
            else:
                z = zbuf[: j1 - j0]
                _logits_fp32(z, h_c[j0:j1], w_c)
            _rows(
                z, scratch, y_c[j0:j1], b32, opts, V, stats=stats,
                lse_in=lse_in[sl] if lse_in is not None else None, ent_in=ent_in[sl] if ent_in is not None else None,
                g=grads.take(sl) if with_dx else None, dx_out=dx_big[j0:j1] if with_dx else None,
                rel_in=None if rel_in is None else (rel_in[0][sl], rel_in[1][sl]),
                stats_out=[None if buf is None else buf[sl] for buf in st] if stats else None,
            )
        if not with_dx:
            continue
        if need_dh:
            if dh_direct:
                torch.mm(dx_big, w_c, out=dh[s0:s1])
            else:
                torch.mm(dx_big, w_c, out=dhbuf[:k])
                if idx is not None:
                    dh.index_copy_(0, r_idx, dhbuf[:k] if dhbuf.dtype == dh.dtype else dhbuf[:k].to(dh.dtype))
                else:
                    dh[s0:s1].copy_(dhbuf[:k])
        if need_dw:
            _addmm_fp32(dw_acc, dx_big.t(), h_c)
        if need_db:
            db_acc += dx_big.sum(0, dtype=torch.float32)
    # the chunk buffers go before the accumulator is cast, so the two never add up
    del big, zbuf, scratch, hbuf, hcbuf, dhbuf, w_c, h_c, dx_big
    return _finish(st, dh, dw_acc, db_acc, weight, bias, hidden.shape)


def row_count(hidden: torch.Tensor) -> int:
    """Rows of ``hidden [..., D]``."""
    return math.prod(hidden.shape[:-1])


def rows_view(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [..., D]`` as ``[N, D]`` when that is a view (contiguous leading dims, or one batch row of a
    slice); otherwise ``hidden`` itself, which the sweep reads row-gathered per chunk (``hidden[:, :-1]`` of a
    batch, ``hidden[:, :L]`` of the dLLM's ``[x_t ‖ x_0]``): never an ``[N, D]`` copy."""
    try:
        return hidden.view(-1, hidden.shape[-1])
    except RuntimeError:
        return hidden


def _gather_rows(hidden: torch.Tensor, r_idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rows ``r_idx`` (flat over the leading dims) of ``hidden [..., D]`` into ``out [k, D]``."""
    if hidden.dim() == 2:
        return torch.index_select(hidden, 0, r_idx, out=out)
    coords = []  # torch.unravel_index would build its divisors as a device tensor from host data: a copy per chunk
    for size in reversed(hidden.shape[:-1]):
        coords.append(r_idx % size)
        r_idx = r_idx // size
    return out.copy_(hidden[tuple(reversed(coords))])


def _gemm_weight(weight: torch.Tensor, compute: torch.dtype, gemm: torch.dtype) -> torch.Tensor:
    """The GEMM operand of the weight: rounded to the call's compute dtype (``hidden``'s: fp32 master weights under
    a bf16 / fp16 compute are read as the compute dtype sees them), in the device's GEMM dtype (fp32 on CPU)."""
    if weight.dtype == gemm and compute in (gemm, torch.float64):
        return weight
    return weight.to(compute).to(gemm)


def _rows(z, scratch, y, bias, opts, V, *, stats, lse_in, ent_in, g, dx_out, rel_in, stats_out):
    """The row routine on one statistics sub-chunk; the statistics land in ``stats_out`` (slices of the outputs)."""
    if opts.row_impl == "triton":
        _rows_triton(z, y, bias, opts, V, stats=stats, lse_in=lse_in, ent_in=ent_in, g=g, dx_out=dx_out,
                     rel_in=rel_in, stats_out=stats_out)
        return
    k = z.shape[0]  # views of the scratch rows: an out= of the wrong shape would be resized (reallocated)
    s_out = _rows_torch(z, [t[:k] for t in scratch], y, bias, opts, V, stats=stats, lse_in=lse_in, ent_in=ent_in,
                        g=g, dx_out=dx_out)
    if stats:
        for buf, val in zip(stats_out, s_out):
            if buf is not None:
                buf.copy_(val)


def _cast_rows(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc.to(dtype)`` without a full-size temporary: the output is written in row blocks."""
    if acc.dtype == dtype:
        return acc
    out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
    step = max(1, _ADD_BLOCK_BYTES // (4 * max(1, acc[0].numel()))) if acc.dim() > 1 else acc.shape[0]
    for r0 in range(0, acc.shape[0], step):
        out[r0:r0 + step].copy_(acc[r0:r0 + step])
    return out


def _finish(st, dh, dw_acc, db_acc, weight, bias, hidden_shape):
    stats = Stats(*st) if st is not None else None
    dh = dh.view(hidden_shape) if dh is not None else None
    dw = None
    if dw_acc is not None:
        dw = _cast_rows(dw_acc, weight.dtype)
    db = None
    if db_acc is not None:
        db = db_acc if db_acc.dtype == bias.dtype else db_acc.to(bias.dtype)
    return stats, dh, dw, db


# ----------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------


def _gather(t: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach().float()
    return t if idx is None else t.index_select(0, idx)


def scatter_rows(compact: torch.Tensor, idx: torch.Tensor | None, N: int) -> torch.Tensor:
    """``[n]`` values of the active rows -> ``[N]`` with exact zeros elsewhere."""
    if idx is None:
        return compact
    out = torch.zeros(N, dtype=compact.dtype, device=compact.device)
    return out.index_copy_(0, idx, compact)


def stats_only(hidden, weight, bias, y, idx, opts: ChunkedOptions) -> Stats:
    """Forward statistics of the active rows (compact); one logits GEMM pass, 2·n·D·V FLOPs, nothing stored."""
    st, _, _, _ = _sweep(hidden, weight, bias, y, idx, opts, stats=True, grads=None)
    return st


def stats_and_grads(hidden, weight, bias, y, idx, coef, opts: ChunkedOptions, *, need_dh, need_dw, need_db):
    """Cross-entropy statistics and the gradients of ``Σ coefᵢ·lossᵢ`` (``coef`` ``[N]`` fp32), in one sweep:
    ``loss = (1 − ε)·nll + ε·smooth + z_loss·lse²`` per active row. Returns ``(Stats, dh, dw, db)``."""
    c = _gather(coef, idx)
    eps, zl, V = float(opts.label_smoothing), float(opts.z_loss), weight.shape[0]
    grads = RowGrads(
        g_lse=c, g_tgt=-(1.0 - eps) * c, g_sumz=(-eps / V) * c if eps > 0 else None, g_ent=None,
        g_lse2=zl * c if zl > 0 else None,
    )
    return _sweep(hidden, weight, bias, y, idx, opts, stats=True, grads=grads,
                  need_dh=need_dh, need_dw=need_dw, need_db=need_db)


def sweep_gradients(hidden, weight, bias, y, idx, grads: RowGrads, opts: ChunkedOptions, *, need_dh, need_dw,
                    need_db):
    """``(dh, dw, db)`` for compact per-row ``dlogits`` coefficients ``grads``, statistics recomputed per chunk."""
    _, dh, dw, db = _sweep(hidden, weight, bias, y, idx, opts, stats=True, grads=grads,
                           need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    return dh, dw, db


def recompute_backward(hidden, weight, bias, y, idx, lse, ent, g_nll, g_lse, g_smooth, g_ent, opts: ChunkedOptions,
                       *, need_dh, need_dw, need_db, rel=None):
    """Backward of the per-token statistics ``(nll, lse, smooth, entropy)`` (``[N]`` upstream gradients, any may be
    ``None``) from the stored ``lse`` / ``ent`` (``[N]``) and, for the Triton rows, the forward's compact
    ``rel = (row max, log s)`` (``p`` relative to the max), recomputing the logits chunk by chunk: 8·n·D·V FLOPs in
    total with the forward. Returns ``(dh, dw, db)``."""
    V = weight.shape[0]
    zero = None
    parts = [_gather(g, idx) for g in (g_nll, g_lse, g_smooth, g_ent)]
    gn, gl, gs, ge = parts
    like = next(p for p in parts if p is not None)
    zero = torch.zeros_like(like)
    c_lse = zero
    for p in (gn, gl, gs):
        if p is not None:
            c_lse = c_lse + p
    grads = RowGrads(
        g_lse=c_lse, g_tgt=-gn if gn is not None else zero, g_sumz=(-1.0 / V) * gs if gs is not None else None,
        g_ent=ge,
    )
    _, dh, dw, db = _sweep(
        hidden, weight, bias, y, idx, opts, stats=False, grads=grads, lse_in=_gather(lse, idx),
        ent_in=_gather(ent, idx) if ge is not None else None, rel_in=rel, need_dh=need_dh, need_dw=need_dw,
        need_db=need_db,
    )
    return dh, dw, db
