"""Plots of the benchmark rows: memory and time against N and V, one line per provider, measured and predicted.

Reads ``<results-dir>/*.csv`` (the rows the benchmarks append; nothing is measured here) and draws one figure per
question and machine into ``--out`` (default: the results folder):

* ``<machine>_memory_vs_n.png``: extra peak memory against N (log axes), one panel per (D, V) and pass (``fwd``,
  ``fwd+bwd``), one line per provider, with one full ``[N, V]`` logits buffer of the row dtype for reference;
* ``<machine>_time_vs_n.png``: time against N as a ratio to a reference timed in the same run: plain PyTorch
  ``F.cross_entropy(h @ W.T)`` on CPU (process CPU time, ``cpu_x_torch``), the cuBLAS GEMM floor on GPU
  (``fwd_x`` / ``full_x``);
* ``<machine>_memory_vs_v.png`` / ``<machine>_time_vs_v.png``: the same against V at a fixed N.

Sources, newest run (or commit) per machine:

* CPU, measured: ``cpu_sweep.csv`` summary rows (``python -m bench cpu_sweep``) of the newest commit;
* GPU, measured: ``linear_ce.csv`` rows timed on a GPU (``--gpu-variant``, default ``w1``: every token through
  ``token_weight``, the trainer's call); ``peak_mb`` there is of fwd+bwd, so the forward memory panel is empty;
* GPU, predicted: ``cost_model.csv`` (``kind=predicted``): the predicted time ratio to the GEMM floor
  (``h100_x`` / ``h200_x``) and the traced workspace, per t3s path. On a GPU that has measured rows the
  predictions are drawn on the same axes (dashed, hollow markers) beside the measured t3s lines (solid, filled);
  otherwise the figure holds predictions only and says so in its title.

Every figure's title names the device, dtype, D, the torch / triton / t3s versions and commit of its rows, and
whether its points are measured or predicted. PNGs are written atomically (temp file + rename).

Examples::

    python -m bench plot                               # bench/results/*.csv -> bench/results/*.png
    python -m bench plot --out "$OUT"                  # e.g. at the end of bench/gpu_check.sh
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import textwrap
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from bench.common import base_parser
from bench.compare import MEASURED

BENCH = "plot"
QUESTIONS = ("memory_vs_n", "time_vs_n", "memory_vs_v", "time_vs_v")
PASSES = ("fwd", "fwd+bwd")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CPU_REFERENCE = "plain PyTorch F.cross_entropy(h @ W.T)"
GPU_REFERENCE = "cuBLAS GEMM floor"
# path of the cost model -> the measured linear_ce row it predicts (bench.compare's join); the pass it times
PREDICTED_PASS = {"trainer": "fwd+bwd", "mean": "fwd+bwd", "none": "fwd+bwd", "w50": "fwd+bwd", "forward": "fwd"}


@dataclass(frozen=True)
class Point:
    """One plotted point: a measured or predicted (peak MiB, time ratio) of one provider at one shape and pass."""

    machine: str  # file-name prefix and the figure's device, e.g. "cpu", "h200"
    device: str
    source: str  # "measured" | "predicted"
    provider: str
    pass_: str
    N: int
    D: int
    V: int
    dtype: str
    peak_mb: float
    time_x: float
    reference: str
    stamp: tuple[str, str, str, str]  # torch, triton, t3s, commit


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _stamp(row: dict) -> tuple[str, str, str, str]:
    return tuple(row.get(k, "") or "?" for k in ("torch", "triton", "t3s", "commit"))


def _gpu_machine(device: str) -> str:
    d = device.upper()
    return "h200" if "H200" in d else "h100" if "H100" in d else "gpu"


def _newest(rows: list[dict], key: str, identity: tuple[str, ...]) -> list[dict]:
    """Per device, the rows sharing ``key`` (run id or commit) with its latest-dated row, one per ``identity``
    (the latest): one run or commit per machine in a figure, no point drawn twice."""
    latest: dict[str, dict] = {}
    for r in rows:
        device = r.get("device", "")
        if device not in latest or r.get("date", "") > latest[device].get("date", ""):
            latest[device] = r
    kept: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("date", "")):
        if r.get(key, "") == latest[r.get("device", "")].get(key, ""):
            kept[(r.get("device", ""), *(r.get(k, "") for k in identity))] = r
    return list(kept.values())


def cpu_points(results_dir: Path) -> list[Point]:
    """Measured CPU points: ``cpu_sweep.csv`` summary rows of the newest commit (several runs at it may split the
    grid; the newest row of each point), status ``ok``. The time ratio is of process CPU time (``cpu_x_torch``)
    where the rows have it, else of wall time (``time_x_torch``)."""
    rows = [r for r in _read(results_dir / "cpu_sweep.csv") if r.get("kind") == "summary"]
    points = []
    for r in _newest(rows, "commit", ("provider", "pass", "N", "D", "V")):
        if r.get("status") != "ok":
            continue
        cpu_time = bool(r.get("cpu_x_torch"))
        points.append(Point(
            "cpu", r["device"], "measured", r["provider"], r["pass"], int(r["N"]), int(r["D"]), int(r["V"]),
            r["dtype"], _num(r.get("peak_mb_max")), _num(r.get("cpu_x_torch" if cpu_time else "time_x_torch")),
            f"{CPU_REFERENCE} ({'process CPU time' if cpu_time else 'wall time'})", _stamp(r)))
    return points


def gpu_points(results_dir: Path, variant: str) -> list[Point]:
    """Measured GPU points of ``linear_ce.csv`` (``variant``; ``gemm_floor`` is the reference, not a line)."""
    rows = [r for r in _read(results_dir / "linear_ce.csv")
            if r.get("mode") != "cpu-memory" and not r.get("device", "cpu").startswith("cpu")
            and r.get("status") == "ok" and r.get("variant") == variant]
    points = []
    for r in _newest(rows, "commit", ("provider", "N", "D", "V", "dtype")):
        for pass_, col in (("fwd", "fwd_x"), ("fwd+bwd", "full_x")):
            peak = _num(r.get("peak_mb")) if pass_ == "fwd+bwd" else math.nan
            points.append(Point(_gpu_machine(r["device"]), r["device"], "measured", r["provider"], pass_,
                                int(r["N"]), int(r["D"]), int(r["V"]), r.get("dtype", "bf16"), peak,
                                _num(r.get(col)), GPU_REFERENCE, _stamp(r)))
    return points


def predicted_points(results_dir: Path, gpus: list[str]) -> list[Point]:
    """Predicted GPU points of ``cost_model.csv`` (newest commit): ``<gpu>_x`` and the traced workspace."""
    rows = [r for r in _read(results_dir / "cost_model.csv") if r.get("kind") == "predicted"]
    # one set of predictions whatever machine traced them (their device column names it)
    rows = _newest([dict(r, device="predicted") for r in rows], "commit", ("path", "N", "D", "V", "dtype"))
    points = []
    for r in rows:
        for gpu in gpus:
            if not r.get(f"{gpu}_x") or r.get("path") not in PREDICTED_PASS:
                continue
            points.append(Point(gpu, f"{gpu.upper()} (cost model: {r.get(f'{gpu}_assumed', 'assumed rates')})",
                                "predicted", f"t3s {r['path']}", PREDICTED_PASS[r["path"]], int(r["N"]),
                                int(r["D"]), int(r["V"]), r.get("dtype", "bf16"), _num(r.get("workspace_mib")),
                                _num(r[f"{gpu}_x"]), GPU_REFERENCE, _stamp(r)))
    return points


def _predicted_name(path: str) -> str:
    return "t3s forward: log-prob + entropy, no grad" if path == "forward" else f"t3s {path}"


def _predicted_label(path: str, variant: str) -> str:
    """``t3s <path>`` of the cost model, relabelled as the measured provider it predicts when one is joined."""
    file, provider, measured_variant, _ = MEASURED.get(path, (None, None, None, None))
    if file == "linear_ce" and measured_variant == variant:
        return f"{provider} (predicted)"
    return f"{_predicted_name(path)} (predicted)"


def _values(points: list[Point], get) -> str:
    return "/".join(sorted({str(get(p)) for p in points}))


def _title(question: str, points: list[Point]) -> str:
    sources = sorted({p.source for p in points})
    kind = ("MEASURED" if sources == ["measured"] else "PREDICTED, not measured" if sources == ["predicted"]
            else "measured (solid, filled) and PREDICTED (dashed, hollow)")
    ref = points[0].reference
    what = {"memory_vs_n": "extra peak memory vs N", "time_vs_n": f"time / {ref} vs N",
            "memory_vs_v": "extra peak memory vs V", "time_vs_v": f"time / {ref} vs V"}[question]
    commit = _values(points, lambda p: p.stamp[3][:7] + ("-dirty" if p.stamp[3].endswith("-dirty") else ""))
    return (f"{what} — {kind}\n{_values(points, lambda p: p.device)} · {_values(points, lambda p: p.dtype)} · "
            f"D={_values(points, lambda p: p.D)}\ntorch {_values(points, lambda p: p.stamp[0])} · "
            f"triton {_values(points, lambda p: p.stamp[1])} · t3s {_values(points, lambda p: p.stamp[2])} · "
            f"commit {commit}")


def _panels(question: str, points: list[Point]) -> dict[tuple, list[Point]]:
    """Points per panel: (D, fixed dim, pass) with ≥ 2 distinct x values and a finite y."""
    x_is_n = question.endswith("_n")
    y_of = (lambda p: p.peak_mb) if question.startswith("memory") else (lambda p: p.time_x)
    panels: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        if math.isfinite(y_of(p)) and y_of(p) > 0:
            panels[(p.D, p.V if x_is_n else p.N, p.pass_)].append(p)
    width = {k: len({p.N if x_is_n else p.V for p in v}) for k, v in panels.items()}
    if not x_is_n:  # "at a fixed N": the N with the most vocabularies (the largest on a tie), per D and pass
        best = {}
        for D, N, pass_ in panels:
            if (width[(D, N, pass_)], N) > best.get((D, pass_), (0, 0)):
                best[(D, pass_)] = (width[(D, N, pass_)], N)
        panels = {k: v for k, v in panels.items() if best[(k[0], k[2])][1] == k[1]}
    return {k: v for k, v in sorted(panels.items(), key=lambda kv: (kv[0][0], kv[0][1], PASSES.index(kv[0][2])))
            if width[k] >= 2}


def skipped_notes(results_dir: Path) -> list[str]:
    """What the newest commit's CPU sweep did not measure, per provider: the reason and from which N (per V) on."""
    rows = [r for r in _read(results_dir / "cpu_sweep.csv") if r.get("kind") == "summary"]
    first_n: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for r in _newest(rows, "commit", ("provider", "pass", "N", "D", "V")):
        status = r.get("status", "ok")
        if status == "ok":
            continue
        reason = ("over this shared machine's per-process RSS cap (not the method's)" if "cap" in status
                  else "beyond this sweep's time budget" if "time, not memory" in status
                  else status.removeprefix("skipped: "))
        V, N = int(r["V"]), int(r["N"])
        first_n[(r["provider"], reason)][V] = min(N, first_n[(r["provider"], reason)].get(V, N))
    notes = []
    for (provider, reason), by_v in sorted(first_n.items()):
        where = ", ".join(f"N ≥ {n} at V={v}" for v, n in sorted(by_v.items()))
        notes.append(f"{provider}: not run — {reason}" + ("" if "Triton" in reason else f" ({where})"))
    return notes


def _size(x: int) -> str:
    """Tick label: 512, 4K, 64K for powers of two; other sizes in full (32000, 151936)."""
    return f"{x // 1024}K" if x >= 1024 and x & (x - 1) == 0 else str(x)


def _style(provider: str, source: str, colors: dict[str, str]) -> dict:
    base = provider.removesuffix(" (predicted)")
    if base not in colors:
        colors[base] = f"C{len(colors) % 10}"
    predicted = source == "predicted"
    return dict(color=colors[base], linestyle="--" if predicted else "-", marker="o", markersize=5,
                markerfacecolor="none" if predicted else colors[base], linewidth=1.5)


def _draw_panel(ax, question: str, key: tuple, points: list[Point], colors: dict[str, str]) -> None:
    x_is_n = question.endswith("_n")
    memory = question.startswith("memory")
    D, fixed, pass_ = key
    lines: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for p in points:
        lines[(p.provider, p.source)].append(p)
    for k, ((provider, source), pts) in enumerate(sorted(lines.items())):
        pts.sort(key=lambda p: p.N if x_is_n else p.V)
        style = _style(provider, source, colors)
        style["linewidth"] = max(1.2, 3.6 - 0.8 * k)  # earlier lines wider: coinciding providers stay visible
        ax.plot([p.N if x_is_n else p.V for p in pts], [p.peak_mb if memory else p.time_x for p in pts],
                label=provider + ("" if source == "measured" or provider.endswith("(predicted)") else " (predicted)"),
                **style)
    xs = sorted({p.N if x_is_n else p.V for p in points})
    if memory:
        logits = [x * fixed * BYTES.get(points[0].dtype, 4) / 2**20 for x in xs]
        ax.plot(xs, logits, color="0.5", linestyle=":", linewidth=1.5,
                label=f"one [N, V] {points[0].dtype} logits buffer")
        ax.set_yscale("log")
        ax.set_ylabel("extra peak memory (MiB)")
    else:
        ax.axhline(1.0, color="0.5", linestyle=":", linewidth=1.5, label=f"1 = {points[0].reference}")
        ys = [p.time_x for p in points]
        if max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("time ratio")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [_size(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("N (tokens)" if x_is_n else "V (vocabulary)")
    ax.set_title(f"D={D}, {'V' if x_is_n else 'N'}={fixed}, {pass_}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def draw(question: str, points: list[Point], path: Path, caption: str = "") -> str | None:
    """Draw ``question`` for ``points`` (one machine) into ``path`` (PNG, atomically); return its title, or
    ``None`` when no panel has two x values to join."""
    from matplotlib.figure import Figure

    panels = _panels(question, points)
    if not panels:
        return None
    rows = sorted({k[:2] for k in panels})
    cols = [p for p in PASSES if any(k[2] == p for k in panels)]
    fig = Figure(figsize=(5.2 * len(cols), 3.8 * len(rows) + 1.6), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    colors: dict[str, str] = {}
    for i, row in enumerate(rows):
        for j, pass_ in enumerate(cols):
            key = (*row, pass_)
            if key in panels:
                _draw_panel(axes[i][j], question, key, panels[key], colors)
            else:
                axes[i][j].set_axis_off()
                axes[i][j].text(0.5, 0.5, f"no rows for {pass_}", ha="center", va="center")
    title = _title(question, [p for pts in panels.values() for p in pts])
    fig.suptitle(title, fontsize=10)
    if caption:  # below the axes; bbox_inches="tight" grows the canvas to hold it
        width = int(17 * fig.get_figwidth())
        lines = [w for para in caption.splitlines() for w in textwrap.wrap(para, width)]
        fig.text(0.01, -0.01, "\n".join(lines), fontsize=7, va="top", ha="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return title


CAPTIONS = {
    "cpu": ("Measured: bench/cpu_sweep.py. Each point: the largest extra resident peak (VmHWM over the process's "
            "RSS after its inputs were allocated) and the median wall time of ≥ 2 fresh processes per provider, "
            "1 thread, fp32, default glibc allocator. Time ratio: median process CPU time over plain PyTorch's, "
            "measured in the same run (CPU time, because other processes on the shared machine inflate wall time; "
            "both are in the CSV)."),
    "measured": ("Measured: bench/linear_ce.py, CUDA peak above the inputs of one fwd+bwd; time ratio = p50 / the "
                 "cuBLAS GEMMs of the same shape timed in the same run."),
    "predicted": ("Predicted, not measured: bench/cost_model.py, traced workspace beyond inputs and gradients, and "
                  "the predicted time over the same GEMMs at assumed rates (see bench/results/README.md); 'fwd' is "
                  "the no-grad scoring forward (floor 2NDV), fwd+bwd paths have floor 6NDV, w50 (half the tokens at "
                  "zero weight) against the dense floor."),
}


def _caption(machine: str, points: list[Point], results_dir: Path) -> str:
    if machine == "cpu":
        return "\n".join([CAPTIONS["cpu"], *skipped_notes(results_dir)])
    return " ".join(CAPTIONS[s] for s in ("measured", "predicted") if any(p.source == s for p in points))


def _relabel(point: Point, beside_measured: bool, variant: str) -> Point:
    """A predicted point named as the measured provider it predicts (when drawn beside measured rows)."""
    path = point.provider.removeprefix("t3s ")
    return replace(point, provider=_predicted_label(path, variant) if beside_measured else _predicted_name(path))


def plot_all(results_dir: str | Path, out: str | Path | None = None, variant: str = "w1",
             predicted_gpus: tuple[str, ...] = ("h200",)) -> dict[Path, str]:
    """Every figure the rows in ``results_dir`` support, into ``out`` (default ``results_dir``): path → title."""
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir
    measured = cpu_points(results_dir) + gpu_points(results_dir, variant)
    predicted = predicted_points(results_dir, list(predicted_gpus) + sorted(
        {p.machine for p in measured if p.machine in ("h100", "h200")} - set(predicted_gpus)))
    measured_machines = {p.machine for p in measured}
    relabelled = [_relabel(p, p.machine in measured_machines, variant) for p in predicted]
    by_machine: dict[str, list[Point]] = defaultdict(list)
    for p in measured + relabelled:
        by_machine[p.machine].append(p)
    written: dict[Path, str] = {}
    for machine, points in sorted(by_machine.items()):
        suffix = "" if machine in measured_machines else "_predicted"
        caption = _caption(machine, points, results_dir)
        for question in QUESTIONS:
            path = out / f"{machine}{suffix}_{question}.png"
            title = draw(question, points, path, caption)
            if title is not None:
                written[path] = title
    return written


def main(argv: list[str] | None = None) -> int:
    p = base_parser(BENCH, __doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the results folder)")
    p.add_argument("--gpu-variant", default="w1", choices=("w1", "all", "w50"),
                   help="linear_ce variant drawn for measured GPU rows (default w1: the trainer's call)")
    p.add_argument("--predicted-gpus", nargs="+", default=["h200"], choices=("h100", "h200"),
                   help="GPUs whose cost-model predictions are drawn when none of their rows are measured")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401 - checked here so a machine without it gets a sentence, not a traceback
    except ImportError:
        print("matplotlib is not installed here: `pip install matplotlib`, or copy the CSV rows to a machine that "
              "has it and run `python -m bench plot` there")
        return 2
    if not Path(args.results_dir).is_dir():
        raise ValueError(f"--results-dir: {args.results_dir!r} is not a folder")
    written = plot_all(args.results_dir, args.out, args.gpu_variant, tuple(args.predicted_gpus))
    for path, title in written.items():
        print(f"{path}\n    {title.splitlines()[0]}")
    if not written:
        print(f"no rows to plot in {args.results_dir} (run a benchmark first, e.g. python -m bench cpu_sweep)")
    return 0
