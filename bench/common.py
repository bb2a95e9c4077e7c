"""Shared benchmark harness: timing, peak memory, OOM handling, machine stamps, CSV results, tables.

The API is small on purpose; every benchmark module uses only these names:

* :func:`time_ms` (``fn``, ``setup=``) → :class:`Timing` ``(p20, p50, p80, n)`` in milliseconds. On CUDA: CUDA
  events around each call, L2 flushed between calls, repetitions chosen from a time budget. On CPU: wall clock.
* :func:`cuda_peak_mb` (``fn``) → peak CUDA memory allocated while ``fn`` ran, above what was allocated before.
* :func:`cpu_peak_mb` (``"module:function"``, ``**kwargs``) → peak resident memory of one case run in a fresh
  Python subprocess (see its docstring for the measurement).
* :func:`guarded` (``fn``) → ``(result, status)`` where ``status`` is ``"ok"``, ``"OOM"`` or ``"error: …"``:
  a benchmark reports an out-of-memory case instead of crashing.
* :func:`stamp` → ``{device, torch, triton, t3s, commit, date}`` for every row.
* :func:`append_rows` (``bench``, ``rows``, ``results_dir``) → appends to ``<results_dir>/<bench>.csv`` (default
  ``bench/results``), widening the header when new columns appear.
* :func:`format_table` (``rows``, ``columns``) → a plain-text table for the terminal.
* :func:`base_parser` (``name``, ``description``) → an ``argparse`` parser with the shared ``--results-dir`` and
  ``--no-save`` options.

The two LM-head benchmarks (``linear_ce``, ``token_logprobs``) share one more layer: :data:`DTYPES`,
:func:`parse_shape` (``"DxV"``), :class:`Unavailable` (a provider reported as ``skipped``), the ``--cpu-memory``
options (:func:`add_cpu_memory_args`), the CPU peak-memory rows (:func:`cpu_memory_rows`) and the ``main`` driver
(:func:`run_main`).

A benchmark module ``bench/<name>.py`` defines ``main(argv: list[str] | None) -> int`` and is run as
``python -m bench <name> [args]`` (``python -m bench --list`` lists them).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = [
    "DTYPES",
    "RESULTS_DIR",
    "Timing",
    "Unavailable",
    "add_cpu_memory_args",
    "append_rows",
    "base_parser",
    "cpu_memory_rows",
    "cpu_peak_mb",
    "cuda_peak_mb",
    "format_table",
    "guarded",
    "is_oom",
    "parse_shape",
    "run_main",
    "stamp",
    "time_ms",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MB = 2**20


# ------------------------------------------------------------------------------------------------------------------
# machine stamp
# ------------------------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stamp(device: torch.device | str | None = None) -> dict[str, str]:
    """Columns identifying where and on what code a row was measured."""
    device = _default_device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        import t3s_kernels

        t3s_version = t3s_kernels.__version__
    except Exception:  # noqa: BLE001 - a broken package must not stop the stamp
        t3s_version = "unknown"
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "t3s": t3s_version,
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------


class Timing(NamedTuple):
    """Milliseconds per call at the 20th, 50th and 80th percentile of ``n`` timed calls."""

    p20: float
    p50: float
    p80: float
    n: int


def _quantiles(xs: Sequence[float]) -> Timing:
    t = torch.tensor(list(xs), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], len(xs))


def time_ms(
    fn: Callable[[], Any],
    *,
    setup: Callable[[], Any] | None = None,
    device: torch.device | str | None = None,
    warmup: int = 2,
    min_rep: int = 5,
    max_rep: int = 50,
    budget_ms: float = 1500.0,
) -> Timing:
    """Time ``fn()``; ``setup()`` (untimed) runs before every call, e.g. to clear ``.grad``.

    The number of timed calls is ``budget_ms`` divided by the warm-up estimate, clipped to ``[min_rep, max_rep]``.
    On CUDA each call is bracketed by CUDA events, and a 256 MB buffer is zeroed before it so the L2 cache is cold
    (as ``triton.testing.do_bench`` does).
    """
    device = _default_device(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        if setup is not None:
            setup()
        fn()
    sync()
    est_ms = (time.perf_counter() - t0) * 1e3 / max(1, warmup)
    rep = int(min(max_rep, max(min_rep, budget_ms / max(est_ms, 1e-3))))
    times: list[float] = []
    if cuda:
        flush = torch.empty(256 * MB, dtype=torch.int8, device=device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            if setup is not None:
                setup()
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        del flush
    else:
        for _ in range(rep):
            if setup is not None:
                setup()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return _quantiles(times)


# ------------------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------------------


def cuda_peak_mb(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Peak CUDA memory allocated by PyTorch while ``fn()`` ran, minus what was allocated before it (MiB).

    What ``fn`` returns is dropped before the next measurement; outputs it creates (gradients) count.
    """
    device = torch.device(device) if device is not None else torch.device("cuda")
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MB


def _read_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _run_peak_case(target: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Child side of :func:`cpu_peak_mb`: set up, reset the high-water mark, run, read it."""
    import importlib

    torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))
    mod_name, fn_name = target.split(":")
    run = getattr(importlib.import_module(mod_name), fn_name)(**kwargs)  # set-up: allocate inputs
    gc.collect()
    method = "VmHWM reset"
    rss_before = _read_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux ≥ 4.0: "5" resets VmHWM to the current RSS
            f.write("5")
        reset_ok = _read_status_kb("VmHWM") is not None and rss_before is not None
    except OSError:
        reset_ok = False
    if not reset_ok:
        method = "ru_maxrss"
        before = _maxrss_bytes()
    t, cpu = time.perf_counter(), time.process_time()
    run()
    wall_ms = (time.perf_counter() - t) * 1e3
    cpu_ms = (time.process_time() - cpu) * 1e3  # all threads; unlike wall time, not inflated by other processes
    peak = (_read_status_kb("VmHWM") - rss_before) * 1024 if reset_ok else _maxrss_bytes() - before
    return {"peak_bytes": peak, "wall_ms": wall_ms, "cpu_ms": cpu_ms, "method": method}


def cpu_peak_mb(
    target: str, timeout: float = 600.0, *, default_allocator: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """Peak resident memory (MiB) of one CPU case, measured in a fresh Python process.

    ``target`` is ``"package.module:function"``; ``function(**kwargs)`` allocates the inputs and returns a
    zero-argument callable that runs the case (e.g. forward + backward). The child process imports everything,
    runs the set-up, then on Linux resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``,
    which sets ``VmHWM`` to the current ``VmRSS``) and reports ``VmHWM − VmRSS_before`` after the case: memory the
    case itself touched at its peak, independent of import and set-up costs. Where that reset is unavailable it
    falls back to the growth of ``getrusage().ru_maxrss`` (correct when set-up did not peak above the case). A fresh
    process per case means one case's freed-but-cached pages cannot hide another's. PyTorch's CPU allocator returns
    large blocks to the OS on free and the child runs with a fixed glibc ``MALLOC_MMAP_THRESHOLD_`` (64 KiB), so RSS
    follows live tensors. ``default_allocator=True`` leaves glibc's defaults alone (no ``MALLOC_*`` variable is
    passed on): what a user sees, fragmentation included. ``kwargs`` must be JSON-serialisable. The child uses
    ``BENCH_CPU_THREADS`` threads (1).

    Returns ``{"peak_mb", "wall_ms", "cpu_ms", "method", "status"}`` (``cpu_ms``: the case's process CPU time,
    which other processes on a loaded machine do not inflate as they do ``wall_ms``); ``status`` is ``"ok"``,
    ``"OOM"`` (killed) or an error.
    """
    cmd = [sys.executable, "-m", "bench.common", "--peak-case", target, json.dumps(kwargs)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # A fixed glibc mmap threshold: every block >= 64 KiB is mmap'ed and unmapped on free, so RSS follows live
    # memory (the default threshold adapts upward and keeps freed blocks of up to 32 MiB resident in the heap).
    if default_allocator:
        for key in [k for k in env if k.startswith("MALLOC_")]:
            del env[key]
    else:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_mb": float("nan"), "wall_ms": float("nan"), "cpu_ms": float("nan"), "method": "",
                "status": "error: timeout"}
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        status = "OOM" if killed or "out of memory" in proc.stderr.lower() else "error: " + _last_line(proc.stderr)
        return {"peak_mb": float("nan"), "wall_ms": float("nan"), "cpu_ms": float("nan"), "method": "",
                "status": status}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_mb": res["peak_bytes"] / MB, "wall_ms": res["wall_ms"], "cpu_ms": res["cpu_ms"],
            "method": res["method"], "status": "ok"}


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unknown"


# ------------------------------------------------------------------------------------------------------------------
# OOM / errors
# ------------------------------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def guarded(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Run ``fn``; return ``(result, "ok")``, ``(None, "OOM")`` or ``(None, "error: <message>")``.

    After a failure, cached CUDA memory is released so the next case starts clean.
    """
    try:
        return fn(), "ok"
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures as rows
        status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, status


# ------------------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------------------


def append_rows(bench: str, rows: Iterable[dict[str, Any]], results_dir: str | Path | None = None) -> Path:
    """Append ``rows`` to ``<results_dir>/<bench>.csv`` (created with a header; widened when columns are new).

    The file is replaced atomically (temp file + rename) when its header has to grow.
    """
    rows = [dict(r) for r in rows]
    path = Path(results_dir or RESULTS_DIR) / f"{bench}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    old_rows: list[dict[str, str]] = []
    old_cols: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_cols = list(reader.fieldnames or [])
            if any(c not in old_cols for c in columns):
                old_rows = list(reader)
    if old_cols and all(c in old_cols for c in columns):
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=old_cols)
            w.writerows(_fmt_row(r) for r in rows)
        return path
    header = old_cols + [c for c in columns if c not in old_cols]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{bench}.", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(_fmt_row(r) for r in rows)
    os.replace(tmp, path)
    return path


def _fmt_row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Fixed-width text table of ``columns`` (missing values blank, floats with 4 significant digits)."""

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench {name}", description=description)
    p.add_argument(
        "--results-dir", default=str(RESULTS_DIR), help="where <bench>.csv is appended (default: %(default)s)"
    )
    p.add_argument("--no-save", action="store_true", help="print the table only; write no CSV")
    return p


# ------------------------------------------------------------------------------------------------------------------
# LM-head benchmarks (linear_ce, token_logprobs): shared options, CPU peak-memory mode, driver
# ------------------------------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """The provider is not installed (or cannot run here): reported as ``skipped``."""


def parse_shape(s: str) -> tuple[int, int]:
    """``"DxV"`` → ``(D, V)`` (an ``argparse`` type)."""
    d, v = s.lower().split("x")
    return int(d), int(v)


def add_cpu_memory_args(p: argparse.ArgumentParser, cpu_providers: Sequence[str]) -> argparse.ArgumentParser:
    """``--cpu-memory`` and its options: the shape ``--cpu-n/-d/-v``, ``--cpu-providers``, ``--jobs``."""
    p.add_argument("--cpu-memory", action="store_true", help="CPU peak-memory smoke mode (no GPU needed)")
    p.add_argument("--cpu-n", type=int, default=2048)
    p.add_argument("--cpu-d", type=int, default=64)
    p.add_argument("--cpu-v", type=int, default=32000)
    p.add_argument("--cpu-providers", nargs="+", default=list(cpu_providers), choices=cpu_providers)
    p.add_argument("--jobs", type=int, default=1, help="CPU cases measured concurrently (memory is per process)")
    return p


def cpu_memory_rows(bench: str, target: str, args: argparse.Namespace, **fixed: Any) -> list[dict]:
    """Peak CPU memory of ``target(provider=…, N=…, D=…, V=…)`` for each of ``args.cpu_providers`` (fp32).

    Each case runs in a fresh process (:func:`cpu_peak_mb`), ``args.jobs`` at a time; rows carry ``logits_mb``
    (one fp32 ``[N, V]`` buffer) and ``peak_over_logits``. ``fixed`` columns go after ``dtype``. The table is
    printed.
    """
    N, D, V = args.cpu_n, args.cpu_d, args.cpu_v
    meta = stamp("cpu")
    logits_mb = N * V * 4 / 2**20
    rows = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # one fresh process per case
        results = list(pool.map(lambda p: cpu_peak_mb(target, provider=p, N=N, D=D, V=V), args.cpu_providers))
    for provider, res in zip(args.cpu_providers, results, strict=True):
        row = {
            "bench": bench, "mode": "cpu-memory", "N": N, "D": D, "V": V, "dtype": "fp32", **fixed,
            "provider": provider,
            "status": res["status"], "peak_mb": res["peak_mb"], "logits_mb": logits_mb,
            "peak_over_logits": res["peak_mb"] / logits_mb, "wall_ms": res["wall_ms"], "method": res["method"],
        }
        rows.append(dict(row, **meta))
    print(format_table(rows, ("N", "D", "V", "provider", "peak_mb", "logits_mb", "peak_over_logits", "wall_ms",
                              "status")))
    return rows


def run_main(
    args: argparse.Namespace,
    run_cpu_memory: Callable[[argparse.Namespace], list[dict]],
    run_gpu: Callable[[argparse.Namespace], list[dict]],
    table_cols: Sequence[str],
    bench: str,
) -> int:
    """``main`` of a benchmark with a ``--cpu-memory`` mode and a ``--device`` timing mode: run, print, save."""
    if args.cpu_memory:
        rows = run_cpu_memory(args)
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the timing benchmark needs a GPU; `--cpu-memory` runs the CPU smoke mode")
        return 2
    else:
        if args.device == "cpu":
            torch.set_num_threads(1)
        rows = run_gpu(args)
        print()
        print(format_table(rows, table_cols))
    if not args.no_save:
        print(f"\nappended {len(rows)} rows to {append_rows(bench, rows, args.results_dir)}")
    return 0


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.common")
    p.add_argument("--peak-case", required=True)
    p.add_argument("kwargs", nargs="?", default="{}")
    a = p.parse_args(argv)
    print(json.dumps(_run_peak_case(a.peak_case, json.loads(a.kwargs))))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
