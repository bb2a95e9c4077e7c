"""CI smoke mode of the pytest-benchmark micro-benchmarks (``bench/test_micro.py``): every benchmark body runs
once with ``--benchmark-disable`` in a subprocess; nothing about time is asserted. ``T3S_NO_CPP=1`` skips
building the C++ union-mask op here (its own tests cover it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_micro_benchmarks_run_in_smoke_mode(tmp_path):
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "T3S_NO_CPP": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench" / "test_micro.py"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", "-W", "ignore::RuntimeWarning"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
