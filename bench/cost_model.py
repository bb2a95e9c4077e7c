"""PREDICTED cost of every LM-head path on H100 / H200, traced from what the code really issues (no GPU needed).

For each path and shape the real public call (:func:`t3s_kernels.linear_cross_entropy` /
:func:`t3s_kernels.token_logprobs`, ``impl="auto"`` as on CUDA) runs on data-less tensors that report device
``cuda`` (:class:`bench._trace.CostTracer`): every aten op is counted (GEMM FLOPs with
:mod:`torch.utils.flop_counter`'s formulas, bytes read / written, live memory), every Triton launch is intercepted
and priced by the formula below for that kernel. The totals give

* ``gemm_flops`` (also as a multiple of ``N·D·V``: the three-GEMM floor of training is 6, of a forward 2);
* ``hbm_gb``: bytes moved to / from HBM (each aten op reads its inputs and writes its outputs once; Triton
  kernels per formula);
* ``workspace_mib``: the peak of live bytes the call allocated, leaving out the gradient outputs and the returned
  values: the temporaries (an fp32 ``[V, D]`` accumulator that is cast to the output counts);
* ``host_syncs``: host synchronisations on the path (``.item()``, ``nonzero``, boolean indexing, device-to-host
  copies, …: :mod:`bench._trace`);
* ``<gpu>_ms`` and ``<gpu>_x``: predicted time, and its ratio to the floor (``6·N·D·V`` training, ``2·N·D·V``
  forward) at the same achievable GEMM rate.

Each event costs ``max(FLOPs / rate, HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth)`` plus a launch
overhead, events in sequence (one stream). Every figure, with its source (``--gemm-eff`` / ``--triton-eff`` /
``--hbm-eff`` / ``--l2-tbs`` override the assumptions):

* Peaks (NVIDIA datasheets, dense, no sparsity: "NVIDIA H100 Tensor Core GPU" datasheet,
  https://www.nvidia.com/en-us/data-center/h100/, and "NVIDIA H200 Tensor Core GPU",
  https://www.nvidia.com/en-us/data-center/h200/): H100 SXM5 989.4 TFLOP/s bf16, 66.9 TFLOP/s fp32, 3.35 TB/s
  HBM3; H200 SXM the same compute, 4.8 TB/s HBM3e. 132 SMs and 50 MiB of L2 each ("NVIDIA H100 Tensor Core GPU
  Architecture" whitepaper).
* cuBLAS bf16 GEMMs: 0.80 of peak (790 TFLOP/s). ASSUMPTION, not measured by this project (no GPU run of it has
  timed a GEMM yet; ``bench/gpu_check.sh`` does): the order of what large bf16 GEMMs reach on Hopper in public
  benchmarks. Tile quantisation of M and N to 128 applied on top.
* Triton ``tl.dot`` kernels: 0.60 of peak. ASSUMPTION: 128×128 tiles fed by ``cp.async`` (no TMA, no warp
  specialisation) and a softmax epilogue not overlapped with the next tile's MMA; scaled by the fraction of the
  132 SMs the grid keeps busy.
* HBM streaming: 0.75 of the datasheet bandwidth. ASSUMPTION (issue 25's independent count): below the 0.85–0.90
  that a pure copy kernel reaches, since the traced ops mix several read and write streams.
* L2 → SM bandwidth: 7.0 TB/s. ASSUMPTION: NVIDIA publishes no H100 / H200 figure; the A100 whitepaper's
  5120 B/clk L2 read bandwidth at ~1.4 GHz. Every operand tile a kernel loads passes through L2: Triton kernels
  per their formula below; cuBLAS GEMMs with a 128×256 CTA tile in 2-CTA clusters that multicast the shared
  operand (ASSUMPTION: CUTLASS 3's default sm_90 bf16 configuration), ``s·K·(M·⌈N/256⌉ + N·⌈M/128⌉/2)`` bytes.
* Launch overhead: 4 µs per op that moves data or computes (an allocation launches nothing). ASSUMPTION (kernel
  launch plus the gap between dependent kernels on one stream).

These are PREDICTIONS: the GPU script (``bench/gpu_check.sh``) puts measurements beside them. The worst plausible
case is priced by ``--gemm-eff 0.70 --triton-eff 0.50 --hbm-eff 0.70 --l2-tbs 5.5`` (the README quotes both).

Chunk sizes the traced calls really use (``plan_chunks`` at this commit, N = 32768, D = 4096, V = 151936, bf16 on
CUDA, default 768 MiB budget): the trainer's call a 1536-row bf16 ``dlogits`` super-chunk filled by 384-row fp32
statistics sub-chunks; statistics-only sweeps (``reduction="none"`` forward, ``no_grad`` scoring through the
sweep) 1280-row fp32 sub-chunks. The tracer runs the real planner, so other shapes get theirs.

Triton kernel formulas (``BN, BV, BD`` the launch's tile sizes, ``s`` the input element size, ``n_act`` the
active-row count read from the kernel's device argument, ``nv = ⌈V/BV⌉``, ``rb = ⌈n_act/BN⌉``,
``waves(c) = ⌈c / 132⌉``; a tile shared by CTAs running at the same time is read from HBM once per wave, a tile
private to a CTA every time it is loaded):

* ``_lce_stats_fwd_kernel`` (grid over row blocks × ``S`` vocabulary splits, ``S = n_splits`` or 1; V tiles outer,
  D inner): dot ``2·rb·BN·nv·BV·D``; bytes: ``h`` once per row block ``rb·BN·D·s`` when the ``h`` blocks of the
  row blocks in flight (``⌊132/S⌋·BN·D·s``) fit in half of L2, else re-read per V tile ``rb·nv·BN·D·s``; ``W``
  once per wave ``waves(rb·S)·V·D·s``; the fp32 partials ``5·S·n_act·4``.
* ``_lce_bwd_dh_kernel`` (row blocks; recompute logits, ``dh += dx·W`` into an fp32 slab): dot ``2×`` the
  forward's; bytes: ``h`` block per V tile, ``W`` twice per wave, fp32 ``[BN, D]`` slab read + written per V tile
  ``rb·nv·BN·D·8``.
* ``_lce_bwd_dw_kernel`` (grid over V tiles, loop over active row blocks; ``dW += dxᵀ·h`` into an fp32 slab): dot
  ``2·2·nv·BV·rb·BN·D``; bytes: the CTA's ``W`` tile per row block ``nv·rb·BV·D·s``, ``h`` twice per wave
  ``waves(nv)·rb·BN·D·s·2``, slab ``nv·rb·BV·D·8``.
* ``_lce_chunk_row_kernel`` / ``_lce_chunk_bwd_row_kernel`` (one program per row of a stored logits chunk):
  ``COMPUTE_STATS`` one pass reading the row ``rows·V·s_x``; ``WRITE_DX`` one more read and a ``dx`` write
  ``rows·V·(s_x + s_dx)`` (a 600 KB fp32 row × 132 CTAs exceeds L2, so every pass streams from HBM); no
  tensor-core work. A statistics-only launch is one pass, not three.
* ``_scale_unless_one_kernel`` (``x *= scale`` unless the device scalar is 1, the backward's ``grad_output``):
  ``2·n·s`` (read + write) when the traced scale is not 1 or unknown; one scalar read per program when it is 1.
* L2 bytes of the fused kernels (every operand tile a CTA loads): forward ``rb·nv·(BN + BV)·D·s``; ``dh``
  ``rb·nv·(BN + 2·BV)·D·s`` (``h`` and ``W`` tiles for the logits, ``W`` again for ``dx·W``); ``dW``
  ``nv·rb·(BV + 2·BN)·D·s``.

Examples::

    python -m bench cost_model                          # every path × shape, H100 and H200, rows to results
    python -m bench cost_model --n 32768 --shapes 4096x151936 --paths trainer --ops 12
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from bench._trace import KERNEL_FORMULAS, CostTracer, KernelCost, Launch, TraceSummary, summarise
from bench.common import append_rows, base_parser, format_table, parse_shape, stamp

BENCH = "cost_model"
NS = (4096, 16384, 32768)
SHAPES = ((4096, 151936), (2048, 151936), (4096, 128256), (2304, 256000))
SMS = 132  # H100 SXM and H200 alike
L2_BYTES = 50 * 2**20
MiB = 2**20


# ------------------------------------------------------------------------------------------------------------------
# GPUs
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """Peak figures (datasheets) and the achievable fractions / bandwidths assumed (module docstring: sources)."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    hbm_tbs: float
    sms: int = SMS
    gemm_eff: float = 0.80  # assumption, see the module docstring
    triton_eff: float = 0.60  # assumption
    hbm_eff: float = 0.75  # assumption (issue 25's count)
    l2_tbs: float = 7.0  # assumption: no datasheet figure
    launch_us: float = 4.0  # assumption


GPUS = {
    "h100": GPU("H100 SXM5", bf16_tflops=989.4, fp32_tflops=66.9, hbm_tbs=3.35),
    "h200": GPU("H200 SXM", bf16_tflops=989.4, fp32_tflops=66.9, hbm_tbs=4.8),
}


def _tile_eff(x: int, tile: int = 128) -> float:
    return x / (math.ceil(x / tile) * tile) if x > 0 else 1.0


CUBLAS_TILE = (128, 256)  # assumed CTA tile of sm_90 cuBLAS bf16 GEMMs, 2-CTA clusters (module docstring)


def l2_bytes(rec) -> float:
    """Operand bytes an event loads through L2: the Triton formula's, or an aten GEMM's from its tiles."""
    if rec.kind == "triton" or rec.gemm_mnk is None:
        return rec.l2_bytes
    m, n, k = rec.gemm_mnk
    s = 2 if rec.dtype in ("bfloat16", "float16") else 4
    tm, tn = CUBLAS_TILE
    return float(s * k * (m * math.ceil(n / tn) + n * math.ceil(m / tm) / 2))


def event_ms(rec, gpu: GPU) -> float:
    """Predicted milliseconds of one traced event on ``gpu``."""
    if not (rec.gemm_flops or rec.hbm_bytes or rec.l2_bytes):  # an allocation (torch.empty): no kernel launched
        return 0.0
    half = rec.dtype in ("bfloat16", "float16")
    peak = (gpu.bf16_tflops if half else gpu.fp32_tflops) * 1e12
    mem_s = rec.hbm_bytes / (gpu.hbm_tbs * 1e12 * gpu.hbm_eff)
    l2_s = l2_bytes(rec) / (gpu.l2_tbs * 1e12)
    comp_s = 0.0
    if rec.gemm_flops:
        if rec.kind == "triton":
            waves = max(1, math.ceil(rec.ctas / gpu.sms))
            util = rec.ctas / (waves * gpu.sms) if rec.ctas else 1.0
            comp_s = rec.gemm_flops / (peak * gpu.triton_eff * util)
        else:
            eff = gpu.gemm_eff
            if rec.gemm_mnk is not None:
                m, n, _ = rec.gemm_mnk
                eff *= _tile_eff(m) * _tile_eff(n)
            comp_s = rec.gemm_flops / (peak * eff)
    return (max(mem_s, l2_s, comp_s) + gpu.launch_us * 1e-6) * 1e3


def floor_ms(flops: float, gpu: GPU) -> float:
    """The GEMM floor: ``flops`` at the achievable cuBLAS bf16 rate."""
    return flops / (gpu.bf16_tflops * 1e12 * gpu.gemm_eff) * 1e3


# ------------------------------------------------------------------------------------------------------------------
# Triton kernel formulas (documented in the module docstring)
# ------------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _waves(ctas: int) -> int:
    return max(1, _cdiv(ctas, SMS))


def _itemsize(t) -> int:
    return t.element_size()


def _tiles(L: Launch):
    """``(N, V, D, BN, BV, s, n_act, rb, nv, Dp)`` of a fused-kernel launch."""
    N, V, D = L.size("N", "V", "D")
    BN, BV, BD = L.size("BLOCK_N", "BLOCK_V", "BLOCK_D")
    n_act = L.value("n_active")
    return N, V, D, BN, BV, _itemsize(L.args["h"]), n_act, _cdiv(n_act, BN), _cdiv(V, BV), _cdiv(D, BD) * BD


def _fused_fwd(L: Launch) -> KernelCost:
    N, V, D, BN, BV, s, n_act, rb, nv, Dp = _tiles(L)
    S = int(L.args.get("n_splits", 1))  # vocabulary splits (2-D grid: row blocks × splits, grouped order)
    flops = 2.0 * rb * BN * nv * BV * Dp
    resident_h = max(1, SMS // S) * BN * D * s  # h blocks of the row blocks in flight at once
    h_reads = 1 if resident_h <= L2_BYTES // 2 else nv  # in L2: read once per row block; else per V tile
    part = 5 * S * n_act * 4 if "part" in L.args else N * 4 * 4
    hbm = rb * h_reads * BN * D * s + _waves(rb * S) * V * D * s + part
    how = "h once per row block" if h_reads == 1 else "h block per V tile"
    return KernelCost(flops, hbm, rb * S, f"{how} + W per wave ({S} splits)", l2_bytes=rb * nv * (BN + BV) * D * s)


def _fused_dh(L: Launch) -> KernelCost:
    N, V, D, BN, BV, s, _, rb, nv, Dp = _tiles(L)
    flops = 2 * 2.0 * rb * BN * nv * BV * Dp
    hbm = rb * nv * BN * D * s + 2 * _waves(rb) * V * D * s + rb * nv * BN * D * 8
    return KernelCost(flops, hbm, rb, "h block per V tile + 2 W per wave + fp32 dh slab RMW per V tile",
                      l2_bytes=rb * nv * (BN + 2 * BV) * D * s)


def _fused_dw(L: Launch) -> KernelCost:
    N, V, D, BN, BV, s, _, rb, nv, Dp = _tiles(L)
    flops = 2 * 2.0 * nv * BV * rb * BN * Dp
    hbm = nv * rb * BV * D * s + 2 * _waves(nv) * rb * BN * D * s + nv * rb * BV * D * 8
    return KernelCost(flops, hbm, nv, "W tile per row block + 2 h per wave + fp32 dW slab RMW per row block",
                      l2_bytes=nv * rb * (BV + 2 * BN) * D * s)


def _chunk_rows(L: Launch) -> KernelCost:
    V = int(L.args["V"])
    rows = L.grid[0]
    sx, sdx = _itemsize(L.args["x"]), _itemsize(L.args["dx"])
    stats, write_dx = bool(L.args.get("COMPUTE_STATS", True)), bool(L.args.get("WRITE_DX", True))
    y = L.args["y"]
    active = rows
    if L.name == "_lce_chunk_bwd_row_kernel" and getattr(y, "_shadow", None) is not None:
        active = int((y._shadow != int(L.args["ignore_index"])).sum())
    per_row = sx * int(stats) + (sx + sdx) * int(write_dx)  # one pass per sweep the launch makes
    hbm = active * V * per_row + (rows - active) * V * sdx * int(write_dx)
    how = " + ".join(w for w, on in (("1 read (statistics)", stats), ("1 read + 1 dx write", write_dx)) if on)
    return KernelCost(0.0, float(hbm), rows, how)


def _scale_unless_one(L: Launch) -> KernelCost:
    """``x *= scale`` unless the device scalar is 1: a pass over ``x`` (read + write) or one scalar read per
    program. An unknown scale is priced as the pass (the worse case)."""
    x, scale = L.args["x"], L.args["scale"]
    known = getattr(scale, "_shadow", None)
    is_one = known is not None and float(known.reshape(-1)[0]) == 1.0
    n = int(L.args["n"])
    hbm = 4.0 * L.grid[0] if is_one else 2.0 * n * _itemsize(x)
    return KernelCost(0.0, hbm, L.grid[0], "scalar read only (scale 1)" if is_one else "read + write of x")


KERNEL_FORMULAS.update({
    "_scale_unless_one_kernel": _scale_unless_one,
    "_lce_stats_fwd_kernel": _fused_fwd,
    "_lce_bwd_dh_kernel": _fused_dh,
    "_lce_bwd_dw_kernel": _fused_dw,
    "_lce_chunk_row_kernel": _chunk_rows,
    "_lce_chunk_bwd_row_kernel": _chunk_rows,
})


# ------------------------------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Path:
    name: str
    what: str
    training: bool
    floor_ndv: int  # the floor in units of N·D·V FLOPs
    run: Callable  # (tracer, h, w, y, N) -> tensors to exclude from the workspace (outputs, gradients)


def _lce(**kw):
    from t3s_kernels import linear_cross_entropy

    return lambda h, w, y, **more: linear_cross_entropy(h, w, y, **kw, **more)


def _trainer(tr, h, w, y, N, zero_frac=0.0, seed=0, **extra):
    g = torch.Generator().manual_seed(seed + 1)
    tw = (torch.rand(N, generator=g) >= zero_frac).float()
    token_weight = tr.real(tw)
    normalizer = tr.real(tw.sum().reshape(()))  # the step's token count, a device tensor (t3s/train.py)
    active_rows = tr.real(torch.nonzero(tw).reshape(-1))  # built on the host with the batch (t3s/train.py)
    loss = _lce(reduction="mean", **extra)(h, w, y, token_weight=token_weight, normalizer=normalizer,
                                          active_rows=active_rows)
    loss.backward()
    return loss, h.grad, w.grad


def _mean(tr, h, w, y, N):
    loss = _lce(reduction="mean")(h, w, y)
    loss.backward()
    return loss, h.grad, w.grad


def _none(tr, h, w, y, N):
    g = torch.Generator().manual_seed(7)
    loss = _lce(reduction="none")(h, w, y)
    loss.backward(tr.real(torch.randn(N, generator=g)))
    return loss, h.grad, w.grad


def _forward(tr, h, w, y, N, **extra):
    from t3s_kernels import token_logprobs

    # every row scored, indexed on the host as t3s/profile.py does (on a CPU device nothing is synced: not passed)
    active_rows = tr.real(torch.arange(N)) if tr.device.type != "cpu" else None
    with torch.no_grad():
        out = token_logprobs(h, w, y, return_entropy=True, active_rows=active_rows, **extra)
    return tuple(out)


PATHS = {
    p.name: p
    for p in (
        Path("trainer", "weighted mean + normalizer, fwd+bwd (t3s/train.py)", True, 6, _trainer),
        Path("mean", "unweighted mean, fwd+bwd", True, 6, _mean),
        Path("none", "reduction='none' + backward(random grad)", True, 6, _none),
        Path("w50", "trainer call, 50 % zero weight (floor: dense 6NDV)", True, 6,
             lambda tr, h, w, y, N: _trainer(tr, h, w, y, N, zero_frac=0.5)),
        Path("trainer_fp32acc", "trainer call, weight_grad_accumulation='fp32' (exact dW, opt-in)", True, 6,
             lambda tr, h, w, y, N: _trainer(tr, h, w, y, N, weight_grad_accumulation="fp32")),
        Path("forward", "token_logprobs + entropy, no_grad (profiler), strategy chosen by the library", False, 2,
             _forward),
        Path("forward_fused", "same, strategy='fused' (the fused Triton forward)", False, 2,
             lambda tr, h, w, y, N: _forward(tr, h, w, y, N, strategy="fused")),
        Path("forward_sweep", "same, strategy='chunked' (cuBLAS statistics sweep)", False, 2,
             lambda tr, h, w, y, N: _forward(tr, h, w, y, N, strategy="chunked")),
    )
}


def trace_path(path: str, N: int, D: int, V: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               device: str = "cuda") -> TraceSummary:
    """Run ``path`` at ``[N, D] × [V, D]`` on traced tensors and return its totals."""
    p = PATHS[path]
    tr = CostTracer(device)
    h = tr.tensor((N, D), dtype, requires_grad=p.training)
    w = tr.tensor((V, D), dtype, requires_grad=p.training)
    g = torch.Generator().manual_seed(seed)
    y = tr.real(torch.randint(0, V, (N,), generator=g))
    with tr, tr.triton_launches():
        outputs = p.run(tr, h, w, y, N)
        summary = summarise(tr, tuple(outputs))
    return summary


def predict(path: str, N: int, D: int, V: int, gpus: dict[str, GPU], summary: TraceSummary | None = None) -> dict:
    """One row: traced totals and the predicted time / ratio to the floor per GPU."""
    s = summary if summary is not None else trace_path(path, N, D, V)
    p = PATHS[path]
    ndv = float(N) * D * V
    row = {
        "bench": BENCH, "kind": "predicted", "path": path, "N": N, "D": D, "V": V, "dtype": "bf16",
        "gemm_flops": s.gemm_flops, "gemm_x_ndv": s.gemm_flops / ndv, "hbm_gb": s.hbm_bytes / 1e9,
        "workspace_mib": s.workspace_bytes / MiB, "host_syncs": s.host_syncs, "launches": s.launches,
        "workspace_at_peak": s.workspace_at_peak, "floor": f"{p.floor_ndv}NDV",
    }
    for key, gpu in gpus.items():
        t = sum(event_ms(r, gpu) for r in s.records)
        row[f"{key}_ms"] = t
        row[f"{key}_floor_ms"] = floor_ms(p.floor_ndv * ndv, gpu)
        row[f"{key}_x"] = t / row[f"{key}_floor_ms"]
    return row


def top_events(summary: TraceSummary, gpu: GPU, k: int) -> list[dict]:
    """The ``k`` costliest event kinds (same name and shapes), with their summed predicted time."""
    groups: dict[tuple, dict] = {}
    for r in summary.records:
        key = (r.kind, r.name, r.shapes if r.kind == "aten" else r.formula)
        g = groups.setdefault(key, {"kind": r.kind, "op": r.name, "count": 0, "ms": 0.0, "gflop": 0.0, "gb": 0.0,
                                    "shapes": str(key[2])[:70]})
        g["count"] += 1
        g["ms"] += event_ms(r, gpu)
        g["gflop"] += r.gemm_flops / 1e9
        g["gb"] += r.hbm_bytes / 1e9
    return sorted(groups.values(), key=lambda g: -g["ms"])[:k]


TABLE_COLS = ("path", "N", "D", "V", "gemm_x_ndv", "hbm_gb", "workspace_mib", "host_syncs", "h100_x", "h200_x",
              "h200_ms")


def parser() -> argparse.ArgumentParser:
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=list(NS), help="token counts N")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="DxV")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS))
    p.add_argument("--gemm-eff", type=float, default=None, help="achievable cuBLAS fraction of peak (0.80)")
    p.add_argument("--triton-eff", type=float, default=None, help="achievable Triton tl.dot fraction (0.60)")
    p.add_argument("--hbm-eff", type=float, default=None, help="achievable HBM fraction (0.75)")
    p.add_argument("--l2-tbs", type=float, default=None, help="L2 to SM bandwidth in TB/s (7.0)")
    p.add_argument("--ops", type=int, default=0, help="also print the K costliest events per row (H200)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    over = {k: v for k, v in (("gemm_eff", args.gemm_eff), ("triton_eff", args.triton_eff),
                              ("hbm_eff", args.hbm_eff), ("l2_tbs", args.l2_tbs)) if v is not None}
    gpus = {k: replace(GPUS[k], **over) for k in args.gpus}
    meta = stamp("cpu")
    meta["device"] = "predicted (traced on " + meta["device"] + ")"
    rows = []
    for D, V in args.shapes:
        for N in args.n:
            for path in args.paths:
                s = trace_path(path, N, D, V)
                row = predict(path, N, D, V, gpus, s)
                for key, gpu in gpus.items():
                    row[f"{key}_assumed"] = (f"{gpu.bf16_tflops:g} TF/s x {gpu.gemm_eff:g} gemm, x {gpu.triton_eff:g}"
                                             f" triton; {gpu.hbm_tbs:g} TB/s x {gpu.hbm_eff:g}; L2 {gpu.l2_tbs:g} TB/s")
                rows.append(dict(row, **meta))
                print(format_table([row], TABLE_COLS).splitlines()[-1 if rows[:-1] else 0], flush=True)
                if not rows[:-1]:
                    print(format_table([row], TABLE_COLS).splitlines()[-1], flush=True)
                if args.ops:
                    print(format_table(top_events(s, gpus.get("h200", next(iter(gpus.values()))), args.ops),
                                       ("kind", "op", "count", "ms", "gflop", "gb", "shapes")))
    print()
    print("PREDICTED (cost model, not measured):")
    print(format_table(rows, [c for c in TABLE_COLS if c in rows[0]]))
    if not args.no_save:
        print(f"\nappended {len(rows)} rows to {append_rows(BENCH, rows, args.results_dir)}")
    return 0
