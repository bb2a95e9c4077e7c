"""Fused linear cross-entropy: fwd / bwd / fwd+bwd time and peak memory vs the anchors and the cuBLAS GEMM floor.

GPU (default): bf16, N ∈ {4096, 16384, 32768} × (D, V) ∈ {(4096, 151936), (2048, 151936), (4096, 128256),
(2304, 256000)}, variants ``all`` (every token scored), ``w1`` (every token through ``token_weight = 1``: the
trainer's call) and ``w50`` (50 % of tokens at zero weight: ``token_weight`` for t3s, ``-100`` targets for the
others; ratios stay against the dense floor). Providers:

* ``t3s``: :func:`t3s_kernels.linear_cross_entropy` as a caller gets it (no strategy named);
* ``t3s_chunked`` / ``t3s_fused``: the same with ``strategy="chunked" | "fused"``;
* ``t3s_dw_fp32`` / ``t3s_dw_wdtype``: the same with ``weight_grad_accumulation="fp32" | "weight_dtype"`` (the
  two dW accumulation modes);
* ``t3s_hf``: the HF Trainer / TRL loss call (``T3SCausalLM.compute_loss`` with the collator's ``active_rows``);
* ``torch``: materialised bf16 logits + ``F.cross_entropy(logits.float(), y)`` (the Hugging Face path);
* ``torch_lce``: ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` (chunked);
* ``liger``: ``liger_kernel`` ``LigerFusedLinearCrossEntropyLoss``;
* ``cce`` / ``cce_exact``: ``cut_cross_entropy.linear_cross_entropy`` (``impl="cce"``, gradient filtering, and
  ``impl="cce_exact"``);
* ``gemm_floor``: the bare cuBLAS GEMMs of the same shapes: forward ``H·Wᵀ`` (2NDV) and backward ``G·W`` + ``Gᵀ·H``
  (4NDV), measured in the same run. Every other row carries ``*_x`` = its p50 / the floor's p50.

A provider that is not installed is reported as ``skipped``; an out-of-memory case as ``OOM``. ``fwd`` is a
training forward (inputs require grad): the grad-in-forward designs (``t3s_chunked``, ``liger``, ``torch_lce``)
do their gradient GEMMs there and have a near-free ``bwd``, so compare providers on ``full`` (fwd+bwd). ``bwd`` is
timed by replaying ``loss.backward(retain_graph=True)``; where a provider cannot replay it, ``bwd`` is
``full − fwd`` and the row says so. ``peak_mb`` is the CUDA peak of one fwd+bwd above the inputs (gradients
included). ``full_tflops`` counts 6·N·D·V whatever the provider actually computes.

A full run takes roughly 20–30 minutes on an H100; split it by ``--shapes`` (or ``--n``) to fit shorter jobs.

CPU (``--cpu-memory``, runs in CI): peak resident memory of forward + backward at a small shape (default
N=2048, D=64, V=32000, fp32), t3s (reference path on CPU) vs materialised logits, each case in a fresh process.

Examples::

    python -m bench linear_ce                                  # the full GPU matrix
    python -m bench linear_ce --n 32768 --shapes 4096x151936   # one shape
    python -m bench linear_ce --cpu-memory                     # CPU smoke mode
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F

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

BENCH = "linear_ce"
NS = (4096, 16384, 32768)
SHAPES = ((4096, 151936), (2048, 151936), (4096, 128256), (2304, 256000))
DW_MODES = {"t3s_dw_fp32": "fp32", "t3s_dw_wdtype": "weight_dtype"}  # provider -> weight_grad_accumulation
PROVIDERS = ("t3s", "t3s_chunked", "t3s_fused", *DW_MODES, "t3s_hf", "torch", "torch_lce", "liger", "cce",
             "cce_exact")
VARIANTS = ("all", "w1", "w50")
CPU_PROVIDERS = ("t3s", "torch", "torch_lce")


# ------------------------------------------------------------------------------------------------------------------
# providers: each returns a zero-argument callable computing the scalar training loss
# ------------------------------------------------------------------------------------------------------------------


def make_loss_fn(provider: str, h, w, y, tw) -> Callable[[], torch.Tensor]:
    """``h [N, D]`` and ``w [V, D]`` (leaf tensors), targets ``y [N]``, ``tw [N]`` 0/1 weight or ``None``."""
    y_masked = y if tw is None else y.masked_fill(tw == 0, -100)
    if provider.startswith("t3s"):
        from t3s_kernels import linear_cross_entropy

        if provider == "t3s":  # what a caller gets: no strategy named
            return lambda: linear_cross_entropy(h, w, y, token_weight=tw)
        if provider in DW_MODES:
            mode = DW_MODES[provider]
            return lambda: linear_cross_entropy(h, w, y, token_weight=tw, weight_grad_accumulation=mode)
        if provider == "t3s_hf":
            return _hf_trainer_loss(h, w, y, tw)
        strategy = provider.split("_", 1)[1]
        return lambda: linear_cross_entropy(h, w, y, token_weight=tw, strategy=strategy)
    if provider == "torch":
        return lambda: F.cross_entropy((h @ w.t()).float(), y_masked)
    if provider == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(h, w, y_masked, options=opts)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"liger_kernel: {exc}") from exc
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(w, h, y_masked)
    if provider in ("cce", "cce_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"cut_cross_entropy: {exc}") from exc
        return lambda: cce_lce(h, w, y_masked, impl=provider)
    raise ValueError(f"unknown provider {provider!r}")


def _hf_trainer_loss(h, w, y, tw) -> Callable[[], torch.Tensor]:
    """The HF Trainer's loss call: ``T3SCausalLM.compute_loss`` on ``[1, N, D]`` hidden states, with the labels,
    weights and ``active_rows`` a :class:`~t3s.integrations.hf_trainer.SelectionCollator` builds on the host and
    the Trainer's device ``num_items_in_batch``. The trunk is not run (the head's cost only)."""
    from types import SimpleNamespace

    from t3s.integrations.hf_trainer import T3SCausalLM, T3SCausalLMOutput, scored_rows

    labels = y.masked_fill(tw == 0, -100) if tw is not None else y
    labels = labels.reshape(1, -1)
    weight = (labels != -100).float()
    active = scored_rows(labels.cpu()).to(h.device)  # the collator's, built before the step (not timed)
    n_items = (labels[:, 1:] != -100).sum()
    model = SimpleNamespace(_head_tensors=lambda hidden: (hidden, w, None), ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0, softcap=None, temperature=1.0, impl="auto", strategy="auto")
    out = T3SCausalLMOutput(hidden_states=h.view(1, *h.shape), token_weight=weight, active_rows=active)
    return lambda: T3SCausalLM.compute_loss(model, out, labels, num_items_in_batch=n_items)


def _inputs(N: int, D: int, V: int, dtype, device, variant: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 1.0).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    tw = None
    if variant == "w50":
        tw = (torch.rand(N, generator=g) < 0.5).float().to(device)
    elif variant == "w1":  # the trainer's call: every token through token_weight
        tw = torch.ones(N, device=device)
    return h, w, y, tw


# ------------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------------


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _floor_bwd(h, w, dtype, device, budget_ms) -> tuple[float, float, float]:
    """The two backward GEMMs ``G·W`` ([N, D]) and ``Gᵀ·H`` ([V, D]) for a dense ``G [N, V]``: summed p20/p50/p80."""
    grad = torch.randn(h.shape[0], w.shape[0], device=device, dtype=dtype)
    t_de = time_ms(lambda: grad @ w, device=device, budget_ms=budget_ms)
    t_dw = time_ms(lambda: grad.t() @ h, device=device, budget_ms=budget_ms)
    return tuple(a + b for a, b in zip(t_de[:3], t_dw[:3], strict=True))


def _floor(N, D, V, dtype, device, budget_ms) -> dict:
    """p20/p50/p80 of the cuBLAS GEMMs: fwd ``H·Wᵀ``, bwd ``G·W`` + ``Gᵀ·H``."""
    with torch.no_grad():
        h = torch.randn(N, D, device=device, dtype=dtype)
        w = torch.randn(V, D, device=device, dtype=dtype)
        t_fwd, status = guarded(lambda: time_ms(lambda: h @ w.t(), device=device, budget_ms=budget_ms))
        _free_cuda()
        if t_fwd is None:
            return {"status": status}
        t_bwd, status = guarded(lambda: _floor_bwd(h, w, dtype, device, budget_ms))
    _free_cuda()
    out = {"status": status, "fwd": t_fwd}
    if t_bwd is not None:
        out["bwd"] = t_bwd
    return out


def _measure(provider, N, D, V, dtype, device, variant, budget_ms) -> dict:
    row: dict = {}
    h, w, y, tw = _inputs(N, D, V, dtype, device, variant)
    try:
        fn = make_loss_fn(provider, h, w, y, tw)
    except Unavailable as exc:
        return {"status": f"skipped: {exc}"}

    def clear():
        h.grad = None
        w.grad = None

    def fwd_bwd():
        fn().backward()

    t_fwd, st = guarded(lambda: time_ms(fn, setup=clear, device=device, budget_ms=budget_ms))
    if t_fwd is None:
        return {"status": st}
    t_full, st = guarded(lambda: time_ms(fwd_bwd, setup=clear, device=device, budget_ms=budget_ms))
    if t_full is None:
        return {"status": st, "fwd": t_fwd}

    def time_bwd():
        clear()
        loss = fn()
        return time_ms(lambda: loss.backward(retain_graph=True), setup=clear, device=device, budget_ms=budget_ms)

    t_bwd, st_bwd = guarded(time_bwd)
    if t_bwd is None:  # backward cannot be replayed: report fwd+bwd − fwd
        t_bwd = tuple(max(0.0, a - b) for a, b in zip(t_full[:3], t_fwd[:3], strict=True))
        row["note"] = "bwd = fwd+bwd - fwd (backward not replayable)"
    clear()
    gc.collect()
    peak, st = guarded(lambda: cuda_peak_mb(fwd_bwd, device)) if device.type == "cuda" else (None, "ok")
    row.update(status="ok" if peak is not None else st, fwd=t_fwd, bwd=t_bwd, full=t_full, peak_mb=peak)
    return row  # the inputs are freed when this frame goes; the caller empties the CUDA cache


def _flatten(res: dict, floor: dict) -> dict:
    row = {}
    for k in ("fwd", "bwd", "full"):
        t = res.get(k)
        if t is not None:
            row[f"{k}_p20"], row[f"{k}_p50"], row[f"{k}_p80"] = t[0], t[1], t[2]
    ffwd, fbwd = floor.get("fwd"), floor.get("bwd")
    floors = {"fwd": ffwd[1] if ffwd else None, "bwd": fbwd[1] if fbwd else None}
    floors["full"] = floors["fwd"] + floors["bwd"] if floors["fwd"] and floors["bwd"] else None
    for k in ("fwd", "bwd", "full"):
        if row.get(f"{k}_p50") is not None and floors[k]:
            row[f"{k}_x"] = row[f"{k}_p50"] / floors[k]
    return row


def run_gpu(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    meta = stamp(device)
    rows: list[dict] = []
    for D, V in args.shapes:
        for N in args.n:
            floor = _floor(N, D, V, dtype, device, args.budget_ms)
            base = {"bench": BENCH, "N": N, "D": D, "V": V, "dtype": args.dtype}
            frow = dict(base, variant="-", provider="gemm_floor", status=floor.get("status", "ok"))
            frow.update(_flatten({"fwd": floor.get("fwd"), "bwd": floor.get("bwd")}, floor))
            if floor.get("fwd") and floor.get("bwd"):
                full = tuple(a + b for a, b in zip(floor["fwd"][:3], floor["bwd"][:3], strict=True))
                frow.update(full_p20=full[0], full_p50=full[1], full_p80=full[2], full_x=1.0)
                frow["full_tflops"] = 6 * N * D * V / (full[1] * 1e-3) / 1e12
            rows.append(dict(frow, **meta))
            print(format_table([frow], TABLE_COLS), flush=True)
            for variant in args.variants:
                for provider in args.providers:
                    res = _measure(provider, N, D, V, dtype, device, variant, args.budget_ms)
                    _free_cuda()
                    row = dict(base, variant=variant, provider=provider, status=res.get("status"))
                    row.update(_flatten(res, floor))
                    if res.get("peak_mb") is not None:
                        row["peak_mb"] = res["peak_mb"]
                    if row.get("full_p50"):
                        row["full_tflops"] = 6 * N * D * V / (row["full_p50"] * 1e-3) / 1e12
                    if res.get("note"):
                        row["note"] = res["note"]
                    rows.append(dict(row, **meta))
                    print(format_table([row], TABLE_COLS).splitlines()[-1], flush=True)
    return rows


TABLE_COLS = (
    "N", "D", "V", "variant", "provider", "fwd_p50", "bwd_p50", "full_p50", "fwd_x", "bwd_x", "full_x", "peak_mb",
    "status",
)


# ------------------------------------------------------------------------------------------------------------------
# CPU peak memory (runs in CI)
# ------------------------------------------------------------------------------------------------------------------


def cpu_case(provider: str, N: int, D: int, V: int, seed: int = 0) -> Callable[[], None]:
    """Set-up for :func:`bench.common.cpu_peak_mb`: fp32 inputs; the returned callable runs forward + backward."""
    h, w, y, _ = _inputs(N, D, V, torch.float32, torch.device("cpu"), "all", seed)
    if provider == "t3s":
        from t3s_kernels import linear_cross_entropy

        return lambda: linear_cross_entropy(h, w, y, impl="auto").backward()
    fn = make_loss_fn(provider, h, w, y, None)
    return lambda: fn().backward()


def run_cpu_memory(args) -> list[dict]:
    return cpu_memory_rows(BENCH, "bench.linear_ce:cpu_case", args, variant="all")


# ------------------------------------------------------------------------------------------------------------------


def parser():
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=list(NS), help="token counts N")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="DxV", help="(D, V) pairs")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--budget-ms", type=float, default=1500.0, help="timing budget per measurement")
    p.add_argument("--device", default="cuda", help="'cpu' only smoke-tests the harness (no peak memory)")
    return add_cpu_memory_args(p, CPU_PROVIDERS)


def main(argv: list[str] | None = None) -> int:
    return run_main(parser().parse_args(argv), run_cpu_memory, run_gpu, TABLE_COLS, BENCH)
