"""Smoke test of ``python -m bench plot``: every figure drawn from a few synthetic rows into a temp folder (no sweep).

The rows mimic what the benchmarks append: ``cpu_sweep.csv`` summaries (measured, CPU), ``linear_ce.csv`` rows
timed on an H200 (measured) and ``cost_model.csv`` predictions. The assertions are about what a reader relies on:
one PNG per question and machine, titles that name device, dtype, D, versions, commit and measured / predicted,
predictions on a measured GPU drawn under the provider they predict, and no half-written files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

pytest.importorskip("matplotlib")

from bench import plot  # noqa: E402
from bench.common import append_rows  # noqa: E402

CPU_STAMP = dict(device="cpu: Test CPU", torch="2.13.0+cpu", triton="3.9.0", t3s="0.1.0", commit="a" * 40,
                 date="2026-12-05T00:00:00Z")
GPU_STAMP = dict(CPU_STAMP, device="NVIDIA H200", torch="2.13.0+cu130", commit="b" * 40)
PRED_STAMP = dict(CPU_STAMP, device="predicted (traced on cpu: Test CPU)", commit="c" * 40)
QUESTIONS = ("memory_vs_n", "time_vs_n", "memory_vs_v", "time_vs_v")


def _cpu_rows() -> list[dict]:
    rows = []
    for N, V in ((512, 4096), (1024, 4096), (512, 8192)):
        for pass_ in ("fwd", "fwd+bwd"):
            for provider, peak, ratio in (("t3s", 5.0, 0.8), ("torch", N * V * 12 / 2**20, 1.0)):
                rows.append(dict(bench="cpu_sweep", run_id="r1", kind="summary", provider=provider, N=N, D=128,
                                 V=V, dtype="fp32", status="ok", peak_mb_max=peak, time_x_torch=ratio,
                                 cpu_x_torch=ratio,
                                 **{"pass": pass_}, **CPU_STAMP))
    rows.append(dict(rows[-1], N=2048, status="skipped: predicted 9000 MiB extra RSS (from 1 MiB at N=1024) is "
                                                "over this shared machine's 7424 MiB per-process cap",
                     peak_mb_max="", time_x_torch=""))
    return rows


def _gpu_rows() -> list[dict]:
    rows = []
    for N in (4096, 16384):
        for V in (128256, 151936):
            base = dict(bench="linear_ce", N=N, D=4096, V=V, dtype="bf16", variant="w1", status="ok", **GPU_STAMP)
            rows.append(dict(base, provider="gemm_floor", variant="-", fwd_x=1.0, full_x=1.0))
            rows.append(dict(base, provider="t3s", fwd_x=1.3, full_x=1.2, peak_mb=900.0))
            rows.append(dict(base, provider="torch", fwd_x=2.0, full_x=3.0, peak_mb=N * V * 6 / 2**20))
    return rows


def _predicted_rows() -> list[dict]:
    older = dict(PRED_STAMP, device="predicted (traced on cpu: Other)", commit="d" * 40, date="2026-12-01T00:00:00Z")
    stale = [dict(bench="cost_model", kind="predicted", path="trainer", N=4096, D=4096, V=151936, dtype="bf16",
                  workspace_mib=1.0, h100_x=9.0, h200_x=9.0, **older)]
    return stale + [dict(bench="cost_model", kind="predicted", path=path, N=N, D=4096, V=V, dtype="bf16",
                         workspace_mib=800.0, h100_x=1.4, h200_x=1.1, **PRED_STAMP)
            for path in ("trainer", "forward") for N in (4096, 16384) for V in (128256, 151936)]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    append_rows("cpu_sweep", _cpu_rows(), tmp_path)
    append_rows("linear_ce", _gpu_rows(), tmp_path)
    append_rows("cost_model", _predicted_rows(), tmp_path)
    return tmp_path


def test_every_figure_is_drawn_and_titled(results: Path, tmp_path: Path):
    out = tmp_path / "png"
    written = plot.plot_all(results, out, predicted_gpus=("h100",))
    expected = {f"{machine}_{q}.png" for machine in ("cpu", "h200", "h100_predicted") for q in QUESTIONS}
    assert {p.name for p in written} == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected), "a temp file was left behind"
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    cpu = written[out / "cpu_memory_vs_n.png"]
    for part in ("MEASURED", "cpu: Test CPU", "fp32", "D=128", "torch 2.13.0+cpu", "triton 3.9.0", "t3s 0.1.0",
                 "commit aaaaaaa"):
        assert part in cpu, (part, cpu)
    assert "PREDICTED" not in cpu
    assert "plain PyTorch F.cross_entropy(h @ W.T) (process CPU time)" in written[out / "cpu_time_vs_n.png"]
    both = written[out / "h200_time_vs_n.png"]
    assert "measured (solid, filled) and PREDICTED (dashed, hollow)" in both and "cuBLAS GEMM floor" in both
    assert "NVIDIA H200" in both and "bf16" in both and "D=4096" in both
    predicted_only = written[out / "h100_predicted_memory_vs_v.png"]
    assert "PREDICTED, not measured" in predicted_only and "commit ccccccc" in predicted_only


def test_predictions_beside_measurements_are_joined_and_distinguished(results: Path):
    measured = plot.gpu_points(results, "w1")
    assert {p.provider for p in measured} == {"t3s", "torch"}, "the GEMM floor is the reference, not a line"
    raw = plot.predicted_points(results, ["h200"])
    assert len(raw) == 8 and {p.stamp[3][0] for p in raw} == {"c"}, "only the newest commit's predictions, once"
    predicted = [plot._relabel(p, True, "w1") for p in raw]
    assert {p.provider for p in predicted} == {"t3s (predicted)", "t3s forward: log-prob + entropy, no grad "
                                                                  "(predicted)"}
    style_measured = plot._style("t3s", "measured", {})
    style_predicted = plot._style("t3s (predicted)", "predicted", {})
    assert style_measured["color"] == style_predicted["color"]
    assert style_measured["linestyle"] != style_predicted["linestyle"]
    assert style_predicted["markerfacecolor"] == "none" != style_measured["markerfacecolor"]


def test_skipped_points_are_named_in_the_caption(results: Path):
    (note,) = plot.skipped_notes(results)
    assert note.startswith("torch: not run") and "not the method's" in note and "N ≥ 2048 at V=8192" in note


def test_no_rows_and_bad_folder(tmp_path: Path, capsys):
    assert plot.plot_all(tmp_path) == {}
    assert plot.main(["--results-dir", str(tmp_path)]) == 0
    assert "no rows to plot" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--results-dir"):
        plot.main(["--results-dir", str(tmp_path / "missing")])


def test_cpu_sweep_cap_and_pass_checks():
    from bench import cpu_sweep

    history = {("torch", 4096, "fwd"): (1024, 3000.0)}
    assert cpu_sweep._over_cap(history, ("torch", 4096, "fwd"), 2048, 7424.0) is None
    assert "cap" in cpu_sweep._over_cap(history, ("torch", 4096, "fwd"), 4096, 7424.0)
    assert cpu_sweep._over_cap(history, ("t3s", 4096, "fwd"), 65536, 7424.0) is None
    with pytest.raises(ValueError, match="pass_"):
        cpu_sweep.case("torch", 8, 4, 16, "bwd")
