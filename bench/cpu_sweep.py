"""CPU sweep: resident peak memory and wall time of the fused loss against N and V, forward and forward + backward.

The issue-10 measurement of :mod:`bench.cpu_lce` (same providers, same row schema, same fresh-process RSS
measurement with the default glibc allocator, one thread per process) over a grid instead of one shape, for the
plots of ``python -m bench plot``:

* against N: ``--ns`` (512 … 32768) at each of ``--vs`` (32000 and 151936);
* against V: ``--v-sweep`` (65536, 256000, with 32000 and 151936) at the fixed ``--v-sweep-n`` (2048);
* ``--passes``: ``fwd`` (a training forward: inputs require grad, so what backward needs is kept) and ``fwd+bwd``.

Every point runs ``--reps`` fresh processes per provider, the providers interleaved so a shared machine's drift
hits them alike; rows (``kind=run``, then one ``kind=summary`` per provider and point with the wall-time ratio
``time_x_torch`` and the process-CPU-time ratio ``cpu_x_torch``, which a loaded machine does not distort) go to
``bench/results/cpu_sweep.csv`` as they are measured. ``--max-rss-mb`` is a cap of the machine the sweep runs on,
not of any method: before each N a provider's peak is extrapolated linearly in N from the previous point, and a
point predicted above the cap is written as ``skipped: …`` instead of run. Providers that cannot run here
(Liger-Kernel without CUDA) are written as ``skipped`` with the reason, once per V and pass.

Examples::

    python -m bench cpu_sweep                 # the committed rows (tens of minutes on a loaded 2-core machine)
    python -m bench cpu_sweep --smoke         # seconds
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable

import torch

from bench.common import append_rows, base_parser, cpu_peak_mb, format_table, stamp
from bench.cpu_lce import PROVIDERS, _availability, _inputs, loss_fn, summarise

BENCH = "cpu_sweep"
PASSES = ("fwd", "fwd+bwd")
FULL = dict(ns=[512, 1024, 2048, 4096, 8192, 16384, 32768], vs=[32000, 151936], d=128, reps=2,
            v_sweep=[65536, 256000], v_sweep_n=2048, max_n_t3s={151936: 16384})
SMOKE = dict(ns=[256, 512], vs=[4096], d=16, reps=1, v_sweep=[2048], v_sweep_n=256, max_n_t3s={})
RUN_COLS = ("rep", "pass", "provider", "N", "V", "peak_mb", "logits_mb", "wall_ms", "cpu_ms", "loadavg", "status")
SUMMARY_COLS = ("pass", "provider", "N", "V", "ok", "peak_mb_max", "wall_ms_median", "time_x_torch", "cpu_x_torch",
                "status")


def case(provider: str, N: int, D: int, V: int, pass_: str, seed: int = 0) -> Callable[[], None]:
    """Set-up for :func:`bench.common.cpu_peak_mb`: fp32 inputs; the callable runs one training forward of the
    mean loss (``pass_="fwd"``) or one forward + backward (``"fwd+bwd"``)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    torch.manual_seed(seed)
    # one tiny call first, so lazy imports and first-call dispatch are not timed (the resident-peak reset that
    # follows the set-up also leaves them out of the memory)
    loss_fn(provider, *_inputs(8, D, 64, seed))().backward()
    h, w, y = _inputs(N, D, V, seed)
    fn = loss_fn(provider, h, w, y)
    if pass_ == "fwd":
        return lambda: fn()
    return lambda: fn().backward()


def _points(args) -> list[tuple[int, int]]:
    """(N, V) points, smallest N·V first: a stopped run keeps every curve up to some size (the baselines' whole
    range comes before t3s's points beyond it)."""
    pts = [(n, v) for v in args.vs for n in args.ns]
    pts += [(args.v_sweep_n, v) for v in args.v_sweep if (args.v_sweep_n, v) not in pts]
    return sorted(pts, key=lambda p: (p[0] * p[1], p[1]))


def _over_cap(history: dict, key: tuple, N: int, cap_mb: float) -> str | None:
    """``skipped: …`` when the peak extrapolated linearly in N from this provider's last point exceeds the cap."""
    if key not in history:
        return None
    n_prev, peak_prev = history[key]
    predicted = peak_prev * N / n_prev
    if predicted <= cap_mb:
        return None
    return (f"skipped: predicted {predicted:.0f} MiB extra RSS (from {peak_prev:.0f} MiB at N={n_prev}) is over "
            f"this shared machine's {cap_mb:.0f} MiB per-process cap")


def _with_cpu_time(summary: list[dict], runs: list[dict]) -> list[dict]:
    """Add ``cpu_ms_median`` and ``cpu_x_torch`` / ``cpu_x_torch_lce`` (ratios of median process CPU times)."""
    med = {s["provider"]: statistics.median([r["cpu_ms"] for r in runs if r["provider"] == s["provider"]
                                             and r["status"] == "ok"] or [math.nan]) for s in summary}
    for s in summary:
        s["cpu_ms_median"] = med[s["provider"]]
        for ref in ("torch", "torch_lce"):
            if math.isfinite(med.get(ref, math.nan)):
                s[f"cpu_x_{ref}"] = med[s["provider"]] / med[ref]
    return summary


def run(args, save: bool = True) -> list[dict]:
    meta = stamp("cpu")
    threads = int(os.environ.get("BENCH_CPU_THREADS", "1"))
    base = {"bench": BENCH, "run_id": meta["date"], "dtype": "fp32", "allocator": "glibc default",
            "threads": threads, "D": args.d}
    unavailable = {p: _availability(p) for p in args.providers}
    history: dict[tuple, tuple[int, float]] = {}  # (provider, V, pass) -> (N, max peak MiB) of the last point
    rows: list[dict] = []

    def emit(new: list[dict], cols) -> None:
        print("\n".join(format_table(new, cols).splitlines()[2:]), flush=True)
        stamped = [dict(r, **meta) for r in new]
        rows.extend(stamped)
        if save:  # point by point: a long run stopped early keeps what it measured
            append_rows(BENCH, stamped, args.results_dir)

    for N, V in _points(args):
        for pass_ in args.passes:
            point = dict(base, N=N, V=V, **{"pass": pass_}, logits_mb=N * V * 4 / 2**20)
            runs = []
            for rep in range(args.reps):
                for p in args.providers:
                    row = dict(point, kind="run", rep=rep, provider=p, loadavg=os.getloadavg()[0])
                    skip = unavailable[p] or _over_cap(history, (p, V, pass_), N, args.max_rss_mb)
                    if p == "t3s" and N > args.max_n_t3s.get(V, max(args.ns)):
                        skip = f"skipped: N above this sweep's t3s limit at V={V} (time, not memory)"
                    if skip:
                        if rep == 0:
                            runs.append(dict(row, status=skip, peak_mb=float("nan"), wall_ms=float("nan")))
                        continue
                    res = cpu_peak_mb(f"bench.{BENCH}:case", timeout=args.timeout, default_allocator=True,
                                      provider=p, N=N, D=args.d, V=V, pass_=pass_)
                    runs.append(dict(row, status=res["status"], peak_mb=res["peak_mb"], wall_ms=res["wall_ms"],
                                     cpu_ms=res["cpu_ms"], method=res["method"]))
            emit(runs, RUN_COLS)
            for p in args.providers:
                peaks = [r["peak_mb"] for r in runs if r["provider"] == p and r["status"] == "ok"]
                if peaks:
                    history[(p, V, pass_)] = (N, max(peaks))
            summary = [dict(s, run_id=base["run_id"], **{"pass": pass_}, logits_mb=point["logits_mb"])
                       for s in _with_cpu_time(summarise(runs), runs)]
            emit(summary, SUMMARY_COLS)
    return rows


def parser():
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help=f"CI-sized grid {SMOKE}")
    p.add_argument("--ns", type=int, nargs="+", default=None, help=f"tokens (default {FULL['ns']})")
    p.add_argument("--vs", type=int, nargs="+", default=None, help=f"vocabularies of the N sweep ({FULL['vs']})")
    p.add_argument("--v-sweep", type=int, nargs="*", default=None,
                   help=f"extra vocabularies at --v-sweep-n ({FULL['v_sweep']})")
    p.add_argument("--v-sweep-n", type=int, default=None, help=f"N of the V sweep ({FULL['v_sweep_n']})")
    p.add_argument("--d", type=int, default=None, help=f"hidden size (default {FULL['d']})")
    p.add_argument("--reps", type=int, default=None, help=f"fresh processes per provider and point ({FULL['reps']})")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--max-rss-mb", type=float, default=7424.0,
                   help="extra-RSS cap per process of the machine running the sweep (default 7424: ~8 GiB in all)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for name in ("ns", "vs", "v_sweep"):
        if any(x <= 0 for x in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')}: sizes must be positive, got {getattr(args, name)}")
    rows = run(args, save=not args.no_save)
    ok = [r for r in rows if r["kind"] == "summary" and r["status"] == "ok"]
    print(f"\n{len(rows)} rows ({len(ok)} measured summaries)"
          + ("" if args.no_save else f" appended to {args.results_dir}/{BENCH}.csv"))
    return 0
