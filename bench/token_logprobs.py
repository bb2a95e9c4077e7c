"""Forward-only per-token log-prob + entropy (the Δc_t profiler / RL reference pass) vs the anchors and the GEMM floor.

GPU (default): bf16, under ``torch.no_grad``, N ∈ {8192, 32768} × (D, V) ∈ {(4096, 151936), (2048, 151936)}.
Providers:

* ``t3s``: :func:`t3s_kernels.token_logprobs` with ``return_entropy=True`` (one fused pass);
* ``t3s_logp``: the same without entropy;
* ``t3s_fused`` / ``t3s_sweep``: ``t3s`` with ``strategy="fused"`` (the fused Triton forward) | ``"chunked"`` (the
  cuBLAS statistics sweep): the two forward strategies the library chooses between;
* ``torch``: materialised logits, ``log_softmax`` in fp32, gather, entropy from the same log-probs;
* ``torch_chunked``: the same in a Python loop over 4096-row chunks (what most RL codebases do);
* ``liger_scaled``: Liger's ``LigerFusedLinearScaledCrossEntropyFunction`` (per-token NLL + entropy; CuTe DSL on
  SM90 when installed, its chunked PyTorch fallback elsewhere);
* ``liger_flce``: Liger's fused-linear CE with ``reduction="none"`` (NLL only, no entropy);
* ``gemm_floor``: the bare cuBLAS forward GEMM ``H·Wᵀ`` (2NDV) measured in the same run; rows carry
  ``fwd_x`` = p50 / floor p50.

CPU (``--cpu-memory``, runs in CI): peak resident memory at a small shape (default N=2048, D=64, V=32000, fp32),
t3s (reference path) vs materialised logits, each case in a fresh process.

Examples::

    python -m bench token_logprobs
    python -m bench token_logprobs --cpu-memory
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from bench.common import (
    DTYPES,
    Unavailable,
    add_cpu_memory_args,
    base_parser,
    cpu_memory_rows,
    cuda_peak_mb,
    format_table,
    guarded,
    parse_shape,
    run_main,
    stamp,
    time_ms,
)

BENCH = "token_logprobs"
NS = (8192, 32768)
SHAPES = ((4096, 151936), (2048, 151936))
PROVIDERS = ("t3s", "t3s_logp", "t3s_fused", "t3s_sweep", "torch", "torch_chunked", "liger_scaled", "liger_flce")
CPU_PROVIDERS = ("t3s", "torch", "torch_chunked")
TORCH_CHUNK = 4096


def _torch_logprobs(h, w, y, entropy: bool = True):
    logp = (h @ w.t()).float().log_softmax(-1)
    lp = logp.gather(-1, y[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1) if entropy else None
    return lp, ent


def make_fn(provider: str, h, w, y, chunk: int = TORCH_CHUNK) -> Callable[[], object]:
    """A zero-argument callable computing per-token log-probs (+ entropy) of ``y`` for ``h [N, D]``, ``w [V, D]``."""
    if provider in ("t3s", "t3s_logp"):
        from t3s_kernels import token_logprobs

        ent = provider == "t3s"
        return lambda: token_logprobs(h, w, y, return_entropy=ent)
    if provider in ("t3s_fused", "t3s_sweep"):
        from t3s_kernels import token_logprobs

        strategy = "fused" if provider == "t3s_fused" else "chunked"
        return lambda: token_logprobs(h, w, y, return_entropy=True, strategy=strategy)
    if provider == "torch":
        return lambda: _torch_logprobs(h, w, y)

    if provider == "torch_chunked":

        def chunked():
            lps, ents = [], []
            for s in range(0, h.shape[0], chunk):
                lp, ent = _torch_logprobs(h[s : s + chunk], w, y[s : s + chunk])
                lps.append(lp)
                ents.append(ent)
            return torch.cat(lps), torch.cat(ents)

        return chunked
    if provider == "liger_scaled":
        try:
            from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"liger_kernel: {exc}") from exc
        return lambda: LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, 1.0, -100, 1, True)
    if provider == "liger_flce":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"liger_kernel: {exc}") from exc
        return lambda: liger_fused_linear_cross_entropy(h, w, y, reduction="none")
    raise ValueError(f"unknown provider {provider!r}")


def _inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    return h, w, y


TABLE_COLS = ("N", "D", "V", "provider", "fwd_p20", "fwd_p50", "fwd_p80", "fwd_x", "peak_mb", "status")


def run_gpu(args) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    meta = stamp(device)
    rows: list[dict] = []
    for D, V in args.shapes:
        for N in args.n:
            base = {"bench": BENCH, "N": N, "D": D, "V": V, "dtype": args.dtype}
            with torch.no_grad():
                h, w, y = _inputs(N, D, V, dtype, device)
                floor, st = guarded(
                    lambda h=h, w=w: time_ms(lambda: h @ w.t(), device=device, budget_ms=args.budget_ms)
                )
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                frow = dict(base, provider="gemm_floor", status=st)
                if floor is not None:
                    frow.update(fwd_p20=floor.p20, fwd_p50=floor.p50, fwd_p80=floor.p80, fwd_x=1.0)
                rows.append(dict(frow, **meta))
                print(format_table([frow], TABLE_COLS), flush=True)
                for provider in args.providers:
                    row = dict(base, provider=provider)
                    try:
                        fn = make_fn(provider, h, w, y)
                    except Unavailable as exc:
                        row["status"] = f"skipped: {exc}"
                    else:
                        t, st = guarded(lambda fn=fn: time_ms(fn, device=device, budget_ms=args.budget_ms))
                        row["status"] = st
                        if t is not None:
                            row.update(fwd_p20=t.p20, fwd_p50=t.p50, fwd_p80=t.p80)
                            if floor is not None:
                                row["fwd_x"] = t.p50 / floor.p50
                            if cuda:
                                peak, st = guarded(lambda fn=fn: cuda_peak_mb(fn, device))
                                row["peak_mb"] = peak
                                row["status"] = st
                        del fn
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                    rows.append(dict(row, **meta))
                    print(format_table([row], TABLE_COLS).splitlines()[-1], flush=True)
                del h, w, y
    return rows


def cpu_case(provider: str, N: int, D: int, V: int, seed: int = 0) -> Callable[[], None]:
    """Set-up for :func:`bench.common.cpu_peak_mb`: fp32 inputs; the callable runs one no-grad pass."""
    h, w, y = _inputs(N, D, V, torch.float32, torch.device("cpu"), seed)
    fn = make_fn(provider, h, w, y, chunk=max(1, N // 8))

    def run():
        with torch.no_grad():
            fn()

    return run


def run_cpu_memory(args) -> list[dict]:
    return cpu_memory_rows(BENCH, "bench.token_logprobs:cpu_case", args)


def parser():
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=list(NS))
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="DxV")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--budget-ms", type=float, default=1500.0)
    p.add_argument("--device", default="cuda", help="'cpu' only smoke-tests the harness (no peak memory)")
    return add_cpu_memory_args(p, CPU_PROVIDERS)


def main(argv: list[str] | None = None) -> int:
    return run_main(parser().parse_args(argv), run_cpu_memory, run_gpu, TABLE_COLS, BENCH)
