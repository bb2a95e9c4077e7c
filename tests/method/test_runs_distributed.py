"""A rank SIGKILLed in the middle of a stage under a 2-process gloo group (issue 22): the other rank exits with one
line naming the lost rank instead of hanging; the re-run resumes and finishes with an undisturbed run's results."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import make_tiny, tiny_config

from t3s.config import to_yaml
from t3s.io import stage_done

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "_dist_run_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, kill_stage: str = "") -> list[subprocess.CompletedProcess]:
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(config), kill_stage],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    # a rank that hung instead of exiting would fail here; runtime.dist_timeout_s bounds a silent peer's wait
    outs = [p.communicate(timeout=900) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_a_rank_killed_mid_stage_stops_the_other_naming_it_and_the_rerun_resumes(tmp_path):
    root = tmp_path / "tiny"
    make_tiny(root)
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(tiny_config(root, run, "variants=[sft]", "runtime.dist_timeout_s=60")))

    first = _launch(config, kill_stage="train_sft")
    assert first[1].returncode == -9  # rank 1 killed itself at its second optimizer step of train_sft
    errors = [line for line in first[0].stderr.splitlines() if line.startswith("t3s run: error:")]
    assert first[0].returncode == 2 and len(errors) == 1, first[0].stderr[-3000:]
    assert "rank 0: lost rank 1 (process " in errors[0] and "it died or was killed" in errors[0], errors[0]
    assert stage_done(run, "select") and not stage_done(run, "train_sft")

    second = _launch(config)
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    log = second[0].stdout
    assert "select: done earlier, skipped" in log and "[t3s] train_sft ..." in log
    assert "sft_trajectory ..." not in log
    # The undisturbed reference, from the same run: the trajectory trains θ0 on the same data with the same
    # seed, so the SFT variant must end bit-identical to it, step by step.
    final = "final/model.safetensors"
    assert (run / "variants" / "sft" / final).read_bytes() == (run / "trajectory" / final).read_bytes()
    assert _losses(run / "variants" / "sft" / "metrics.jsonl") == _losses(run / "trajectory" / "metrics.jsonl")
