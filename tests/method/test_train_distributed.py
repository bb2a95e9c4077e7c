"""Two CPU processes with gloo (FSDP2 and DDP) follow the single-process run exactly."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import make_tiny, tiny_config

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).parent / "_dist_worker.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from _dist_worker import hooks

    from t3s.pipeline import Pipeline
    from t3s.train import run_training

    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    run = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(root, run, "bottleneck.method=argmin")
    pipe = Pipeline(cfg, progress=False, log=lambda s: None)
    run_training(cfg, pipe.examples, run / "single", evaluate=hooks(pipe), track_bottleneck=True, progress=False)
    return root, run


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_process_gloo_run_matches_single_process(single, strategy):
    from safetensors.torch import load_file

    root, run = single
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), "2", str(port), str(root), str(run), strategy],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    for ckpt in ("final", "bottleneck"):
        a = load_file(str(run / "single" / ckpt / "model.safetensors"))
        b = load_file(str(run / strategy / ckpt / "model.safetensors"))
        assert set(a) == set(b)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    ma = [json.loads(x) for x in (run / "single" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (run / strategy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):  # losses, training accuracy, Δ-prob, gradient ratio and cosine
        for k in ra.keys() - {"time", "lr"}:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra, rb)
