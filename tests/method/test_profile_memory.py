"""Smoke run of ``bench/profile_memory.py``: the fused profiling path must not hold ``[tokens x vocab]`` logits.

At the smoke size (1024 tokens, V = 151936, so one fp32 logits tensor ``L`` is ~594 MiB) the Hugging Face path
holds the logits and their log-softmax at its peak; the fused path holds only the trunk's activations and the
kernel's bounded workspace. Asserted: the logits path peaks at >= 1.5 L (the measurement sees the logits), and the
fused path stays at least one whole L below it and below half an L on its own. That fused and logits paths give
the same numbers is checked in ``test_profile.py``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")


def test_fused_profiling_peak_is_far_below_the_logits_path(tmp_path):
    from bench.profile_memory import logits_bytes, main

    assert main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    with (tmp_path / "profile_memory.csv").open(newline="") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"fused", "logits"}
    assert all(row["status"] == "ok" and row["commit"] and row["torch"] for row in rows.values()), rows
    logits_mb = logits_bytes(int(rows["fused"]["tokens"]), int(rows["fused"]["vocab"])) / 2**20
    fused, hf = float(rows["fused"]["peak_mb"]), float(rows["logits"]["peak_mb"])
    assert hf >= 1.5 * logits_mb, (hf, logits_mb)
    assert fused <= hf - logits_mb, (fused, hf, logits_mb)
    assert fused < 0.5 * logits_mb, (fused, logits_mb)
