"""CPU smoke test of the benchmark harness: both ``--cpu-memory`` modes, results written to a temp dir.

The assertion is a measured memory claim, not a timing, and an absolute one: at N = 8192, V = 32000 one fp32
``[N, V]`` logits buffer is 1000 MiB, about four of the chunked path's default CPU workspaces (256 MiB), so a path
that held the logits (or any ``[N, V]`` block) would peak near or above 1000 MiB. The t3s path must peak within
its workspace plus a fixed allowance (the GEMM library's buffers, the O(N) per-token vectors, the input
gradients: N·D + V·D floats, 2.5 MiB here), and at least near the workspace, which shows the measurement sees
the allocations it bounds (checked once with ``T3S_WORKSPACE_BYTES`` at 4 GiB: the peak then is the logits).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

N, D, V = 8192, 16, 32000
LOGITS_MB = N * V * 4 / 2**20
WORKSPACE_MB = 256  # t3s_kernels.linear_ce.chunked.DEFAULT_WORKSPACE_BYTES["cpu"]
ALLOWANCE_MB = 128  # measured 2026-12-05: about 50 MiB above the workspace for both benchmarks

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["provider"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("bench_name", ["linear_ce", "token_logprobs"])
def test_cpu_memory_mode(bench_name, tmp_path):
    import importlib

    assert LOGITS_MB >= 3 * WORKSPACE_MB  # the logits are several chunks
    mod = importlib.import_module(f"bench.{bench_name}")
    argv = [
        "--cpu-memory", "--cpu-n", str(N), "--cpu-d", str(D), "--cpu-v", str(V),
        "--cpu-providers", "t3s", "--jobs", "1", "--results-dir", str(tmp_path),
    ]
    assert mod.main(argv) == 0
    rows = _rows(tmp_path / f"{bench_name}.csv")
    assert set(rows) == {"t3s"}
    r = rows["t3s"]
    assert r["status"] == "ok", r
    for col in ("device", "torch", "triton", "t3s", "commit", "date"):
        assert r[col], f"missing stamp column {col}"
    peak = float(r["peak_mb"])
    assert peak <= WORKSPACE_MB + ALLOWANCE_MB, (
        f"t3s peak {peak:.0f} MiB exceeds its {WORKSPACE_MB} MiB workspace + {ALLOWANCE_MB} MiB "
        f"(logits: {LOGITS_MB:.0f} MiB)"
    )
    assert peak >= 0.75 * WORKSPACE_MB, f"t3s peak {peak:.0f} MiB: the measurement misses the workspace"


@pytest.mark.parametrize(
    "bench_name, providers",
    [("linear_ce", ["t3s_fused", "torch", "cce"]), ("token_logprobs", ["t3s", "torch_chunked", "liger_scaled"])],
)
def test_timing_harness_runs_on_cpu(bench_name, providers, tmp_path):
    """The GPU timing loop, exercised on CPU at a toy shape: rows, floor ratios, skipped providers, no crash."""
    import importlib

    mod = importlib.import_module(f"bench.{bench_name}")
    argv = ["--device", "cpu", "--dtype", "fp32", "--n", "16", "--shapes", "8x100", "--budget-ms", "1",
            "--providers", *providers, "--results-dir", str(tmp_path)]
    if bench_name == "linear_ce":
        argv += ["--variants", "w50"]
    assert mod.main(argv) == 0
    rows = _rows(tmp_path / f"{bench_name}.csv")
    assert set(rows) == {"gemm_floor", *providers}
    assert rows["gemm_floor"]["status"] == "ok" and float(rows["gemm_floor"]["fwd_x"]) == 1.0
    for p in providers:
        status = rows[p]["status"]
        assert status == "ok" or status.startswith(("skipped", "error")), status
    assert rows[providers[0]]["status"] == "ok" and float(rows[providers[0]]["fwd_x"]) > 0


def test_bench_cli_lists_benchmarks(capsys):
    from bench.__main__ import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "linear_ce" in out and "token_logprobs" in out


def test_append_rows_widens_header(tmp_path):
    from bench.common import append_rows

    append_rows("x", [{"a": 1, "b": 2.5}], tmp_path)
    append_rows("x", [{"a": 3, "c": "z"}], tmp_path)
    with (tmp_path / "x.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["a"] for r in rows] == ["1", "3"]
    assert rows[0]["c"] == "" and rows[1]["c"] == "z" and rows[1]["b"] == ""


def test_cpu_lce_rows_smoke(tmp_path):
    """The issue-10 CPU rows at CI size: fresh processes, default allocator, per-run and summary rows with ratios."""
    from bench import cpu_lce

    argv = ["--smoke", "--reps", "1", "--providers", "t3s", "torch", "--score-tokens", "512",
            "--results-dir", str(tmp_path)]
    assert cpu_lce.main(argv) == 0
    with (tmp_path / "cpu_lce.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    runs = {r["provider"]: r for r in rows if r["kind"] == "run"}
    summary = {r["provider"]: r for r in rows if r["kind"] == "summary"}
    assert set(runs) == set(summary) == {"t3s", "torch", "t3s_score"}
    for r in runs.values():
        assert r["status"] == "ok", r
        assert r["allocator"] == "glibc default" and float(r["peak_mb"]) >= 0 and float(r["wall_ms"]) > 0
        for col in ("device", "torch", "t3s", "commit", "date", "run_id"):
            assert r[col], f"missing stamp column {col}"
    ratio = float(summary["t3s"]["time_x_torch"])
    assert ratio == pytest.approx(float(runs["t3s"]["wall_ms"]) / float(runs["torch"]["wall_ms"]), rel=1e-4)
    assert float(summary["torch"]["time_x_torch"]) == 1.0
    # a stopped run can be summarised from its saved rows
    assert cpu_lce.main(["--summarise", runs["t3s"]["run_id"], "--results-dir", str(tmp_path), "--no-save"]) == 0


def test_compare_joins_predicted_and_measured(tmp_path):
    from bench.common import append_rows
    from bench.compare import compare

    shape = {"N": 16384, "D": 4096, "V": 151936}
    append_rows("cost_model", [dict(shape, kind="predicted", path="trainer", h100_x=1.1, h200_x=1.05, commit="c")],
                tmp_path)
    append_rows("linear_ce", [dict(shape, provider="t3s", variant="w1", status="ok", full_x=1.3,
                                   device="NVIDIA H200", commit="c"),
                              dict(shape, provider="torch", variant="w1", status="ok", full_x=3.0,
                                   device="NVIDIA H200", commit="c")], tmp_path)
    (row,) = compare(tmp_path)
    assert row["path"] == "trainer" and row["measured_x"] == 1.3 and row["predicted_x"] == 1.05
    assert row["measured_over_predicted"] == pytest.approx(1.3 / 1.05)
