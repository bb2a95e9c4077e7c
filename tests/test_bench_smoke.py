"""CPU smoke test of the benchmark harness: both ``--cpu-memory`` modes, results written to a temp dir.

The assertion is a measured memory claim, not a timing. With ``L = N·V·4`` bytes (one fp32 ``[N, V]`` logits
buffer), the materialised path must hold at least two such buffers at its peak (training: logits and their
gradient; log-probs: logits and ``log_softmax``), which also shows the measurement sees them; the t3s path keeps
only bounded ``[chunk, V]`` blocks, so it must stay at least one whole logits buffer below the materialised peak.
The shape is chosen so ``L`` (250 MiB) is several times the reference path's chunk budget.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

N, D, V = 2048, 16, 32000
LOGITS_MB = N * V * 4 / 2**20

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["provider"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("bench_name", ["linear_ce", "token_logprobs"])
def test_cpu_memory_mode(bench_name, tmp_path):
    import importlib

    mod = importlib.import_module(f"bench.{bench_name}")
    argv = [
        "--cpu-memory", "--cpu-n", str(N), "--cpu-d", str(D), "--cpu-v", str(V),
        "--cpu-providers", "t3s", "torch", "--jobs", "2", "--results-dir", str(tmp_path),
    ]
    assert mod.main(argv) == 0
    rows = _rows(tmp_path / f"{bench_name}.csv")
    assert set(rows) == {"t3s", "torch"}
    for r in rows.values():
        assert r["status"] == "ok", r
        for col in ("device", "torch", "triton", "t3s", "commit", "date"):
            assert r[col], f"missing stamp column {col}"
    fused, materialised = float(rows["t3s"]["peak_mb"]), float(rows["torch"]["peak_mb"])
    assert materialised >= 2 * LOGITS_MB, f"materialised peak {materialised:.0f} MiB < 2 x logits ({LOGITS_MB:.0f})"
    assert fused <= materialised - LOGITS_MB, (
        f"t3s peak {fused:.0f} MiB is not one logits buffer ({LOGITS_MB:.0f} MiB) below the materialised "
        f"{materialised:.0f} MiB"
    )


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
