"""CPU rows: fused linear cross-entropy fwd+bwd and long-trace scoring, resident memory and time side by side.

What a CPU user sees (issue 10): ``impl="auto"`` on CPU tensors, default glibc allocator (no ``MALLOC_*`` tuning),
one thread per process. Each case runs in a fresh Python process (:func:`bench.common.cpu_peak_mb` with
``default_allocator=True``) that allocates fp32 inputs, resets the resident high-water mark and runs the case once;
a row holds that process's extra peak RSS over its inputs and the case's wall time.

Cases (fwd + bwd of the mean loss at ``N × D`` hidden states, ``V × D`` weight, default N=4096, D=128, V=151936):

* ``t3s``: :func:`t3s_kernels.linear_cross_entropy` (``impl="auto"``);
* ``torch``: ``F.cross_entropy(h @ W.T, y)`` (materialised fp32 logits);
* ``torch_lce``: ``torch.nn.functional.linear_cross_entropy`` (torch ≥ 2.13, chunked);
* ``liger``: ``liger_kernel``'s fused linear cross-entropy when importable and runnable on this device;
* ``t3s_score``: :func:`t3s_kernels.token_logprobs` under ``no_grad`` over one ``--score-tokens`` trace (32,768).

The providers are run interleaved, ``--reps`` rounds of one fresh process each (so slow drift of a shared machine
hits them alike; ``--jobs`` processes at a time), and every row records the load average when its process started;
time ratios are taken between medians of the same run. Rows are appended as they are measured, so a run stopped
early keeps them; ``--summarise RUN_ID`` appends the summary of such a run. Rows go to ``bench/results/cpu_lce.csv``:
one per process (``kind=run``) and one summary per provider (``kind=summary``: max / median peak, median wall,
``time_x_torch`` and ``time_x_torch_lce``).

Examples::

    python -m bench cpu_lce                 # the issue-10 rows (tens of minutes on a loaded 2-core machine)
    python -m bench cpu_lce --smoke         # CI-sized: seconds
"""

from __future__ import annotations

import os
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from bench.common import Unavailable, append_rows, base_parser, cpu_peak_mb, format_table, stamp

BENCH = "cpu_lce"
PROVIDERS = ("t3s", "torch", "torch_lce", "liger")
SCORE = "t3s_score"
FULL = dict(n=4096, d=128, v=151936, score_tokens=32768, reps=5)
SMOKE = dict(n=256, d=16, v=8192, score_tokens=1024, reps=2)


def _inputs(N: int, D: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def loss_fn(provider: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The scalar mean loss of ``provider`` as a zero-argument callable (raises :class:`Unavailable`)."""
    if provider == "t3s":
        from t3s_kernels import linear_cross_entropy

        return lambda: linear_cross_entropy(h, w, y, impl="auto")
    if provider == "torch":
        return lambda: F.cross_entropy(h @ w.t(), y)
    if provider == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return lambda: F.linear_cross_entropy(h, w, y)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
            raise Unavailable(f"liger_kernel: {type(exc).__name__}: {exc}") from exc
        from t3s_kernels._triton import triton_runs_on

        if not triton_runs_on(h.device):
            raise Unavailable("liger_kernel runs Triton kernels: needs CUDA (the interpreter is a test tool)")
        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(w, h, y)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def case(provider: str, N: int, D: int, V: int, seed: int = 0) -> Callable[[], None]:
    """Set-up for :func:`bench.common.cpu_peak_mb`: fp32 inputs; the callable runs one fwd + bwd (or one scoring
    pass for ``t3s_score``)."""
    torch.manual_seed(seed)
    if provider == SCORE:
        from t3s_kernels import token_logprobs

        h, w, y = _inputs(N, D, V, seed)
        h, w = h.detach(), w.detach()

        def score() -> None:
            with torch.no_grad():
                token_logprobs(h, w, y, return_entropy=True, impl="auto")

        return score
    h, w, y = _inputs(N, D, V, seed)
    fn = loss_fn(provider, h, w, y)
    return lambda: fn().backward()


def _availability(provider: str) -> str | None:
    """``None`` when the provider can run here, else the ``skipped: …`` status (checked in this process)."""
    if provider == SCORE:
        return None
    h, w, y = _inputs(2, 4, 8)
    try:
        loss_fn(provider, h, w, y)
    except Unavailable as exc:
        return f"skipped: {exc}"
    return None


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(run_rows: list[dict]) -> list[dict]:
    """One summary row per provider: max / median peak MiB, median wall ms, time ratios to torch / torch_lce."""
    by: dict[str, list[dict]] = {}
    for r in run_rows:
        by.setdefault(r["provider"], []).append(r)
    med_wall = {p: _median([r["wall_ms"] for r in rs if r["status"] == "ok"]) for p, rs in by.items()}
    out = []
    for p, rs in by.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row = {k: rs[0][k] for k in ("bench", "N", "D", "V", "dtype", "allocator", "threads")}
        row.update(
            kind="summary", provider=p, reps=len(rs), ok=len(ok),
            status=next((r["status"] for r in rs if r["status"] != "ok"), "ok"),
            peak_mb_max=max((r["peak_mb"] for r in ok), default=float("nan")),
            peak_mb_median=_median([r["peak_mb"] for r in ok]),
            wall_ms_median=med_wall[p],
        )
        if p != SCORE:
            for ref in ("torch", "torch_lce"):
                if med_wall.get(ref) and ok:
                    row[f"time_x_{ref}"] = med_wall[p] / med_wall[ref]
        out.append(row)
    return out


def run(args, save: bool = True) -> list[dict]:
    meta = stamp("cpu")
    threads = int(os.environ.get("BENCH_CPU_THREADS", "1"))
    base = {"bench": BENCH, "run_id": meta["date"], "dtype": "fp32", "allocator": "glibc default",
            "threads": threads}
    providers = list(args.providers)
    skipped = {p: _availability(p) for p in providers}
    order = providers[:1] + ([SCORE] if args.score_tokens else []) + providers[1:]
    cases = [(rep, p) for rep in range(args.reps) for p in order]
    lock = threading.Lock()

    def measure(case_: tuple[int, str]) -> dict:
        rep, p = case_
        N = args.score_tokens if p == SCORE else args.n
        row = dict(base, kind="run", rep=rep, provider=p, N=N, D=args.d, V=args.v, loadavg=os.getloadavg()[0])
        if skipped.get(p):
            row.update(status=skipped[p], peak_mb=float("nan"), wall_ms=float("nan"))
        else:
            res = cpu_peak_mb(f"bench.{BENCH}:case", timeout=args.timeout, default_allocator=True,
                              provider=p, N=N, D=args.d, V=args.v)
            row.update(status=res["status"], peak_mb=res["peak_mb"], wall_ms=res["wall_ms"], method=res["method"])
        row["logits_mb"] = N * args.v * 4 / 2**20
        print(format_table([row], RUN_COLS).splitlines()[-1], flush=True)
        row = dict(row, **meta)
        if save:  # row by row: a long run stopped early keeps what it measured
            with lock:
                append_rows(BENCH, [row], args.results_dir)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each case is its own process
        rows = list(pool.map(measure, cases))
    summary = [dict(r, run_id=meta["date"], **meta) for r in summarise(rows)]
    print()
    print(format_table(summary, SUMMARY_COLS))
    if save:
        append_rows(BENCH, summary, args.results_dir)
    return rows + summary


def summarise_saved(run_id: str, results_dir: str) -> list[dict]:
    """Summary rows of the ``kind=run`` rows of ``run_id`` already in ``cpu_lce.csv`` (e.g. of a stopped run)."""
    import csv
    from pathlib import Path

    with (Path(results_dir) / f"{BENCH}.csv").open(newline="") as f:
        saved = [r for r in csv.DictReader(f) if r.get("run_id") == run_id and r.get("kind") == "run"]
    if not saved:
        raise ValueError(f"--summarise: no run rows with run_id {run_id!r} in {results_dir}/{BENCH}.csv")
    for r in saved:
        for k in ("peak_mb", "wall_ms"):
            r[k] = float(r[k]) if r[k] not in ("", "nan") else float("nan")
    meta = {k: saved[0][k] for k in ("device", "torch", "triton", "t3s", "commit", "date")}
    return [dict(r, run_id=run_id, **meta) for r in summarise(saved)]


RUN_COLS = ("rep", "provider", "N", "D", "V", "peak_mb", "logits_mb", "wall_ms", "loadavg", "status")
SUMMARY_COLS = ("provider", "N", "reps", "ok", "peak_mb_max", "peak_mb_median", "wall_ms_median", "time_x_torch",
                "time_x_torch_lce", "status")


def parser():
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=f"CI-sized shapes {SMOKE}")
    p.add_argument("--n", type=int, default=None, help=f"tokens of the fwd+bwd cases (default {FULL['n']})")
    p.add_argument("--d", type=int, default=None, help=f"hidden size (default {FULL['d']})")
    p.add_argument("--v", type=int, default=None, help=f"vocabulary (default {FULL['v']})")
    p.add_argument("--score-tokens", type=int, default=None,
                   help=f"tokens of the scored trace; 0 skips it (default {FULL['score_tokens']})")
    p.add_argument("--reps", type=int, default=None, help=f"fresh processes per provider (default {FULL['reps']})")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument("--summarise", metavar="RUN_ID", default=None,
                   help="only append the summary rows of an earlier (e.g. stopped) run from its saved rows")
    p.add_argument("--jobs", type=int, default=1, help="processes run at once, in the interleaved order (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.summarise:
        summary = summarise_saved(args.summarise, args.results_dir)
        print(format_table(summary, SUMMARY_COLS))
        if not args.no_save:
            append_rows(BENCH, summary, args.results_dir)
        return 0
    rows = run(args, save=not args.no_save)
    if not args.no_save:
        print(f"\nappended {len(rows)} rows to {args.results_dir}/{BENCH}.csv")
    return 0
