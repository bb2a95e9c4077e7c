"""The same config gives bit-identical numbers while another CPU-heavy process competes (issue 13)."""

import hashlib
import json
import subprocess
import sys

from _tiny import tiny_config

from t3s.pipeline import run_pipeline

HOG = "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = a @ a\n    a /= a.max()\n"


def _numbers(run):
    rows = [json.loads(x) for x in (run / "trajectory" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("time", None)  # wall-clock seconds, the only field allowed to differ
    files = ["variants/sft/final/model.safetensors", "trajectory/bottleneck/model.safetensors",
             "delta/delta.parquet", "bottleneck.json", "eval/base.json", "eval/sft.json"]
    return rows, {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in files}


def test_identical_metrics_while_a_cpu_heavy_process_competes(tmp_path):
    overrides = ("variants=[sft]", "diagnostics.delta_prob=false", "runtime.threads=2")
    run_pipeline(tiny_config(tmp_path / "tiny", tmp_path / "quiet", *overrides), progress=False, log=lambda s: None)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    try:
        run_pipeline(tiny_config(tmp_path / "tiny", tmp_path / "busy", *overrides), progress=False,
                     log=lambda s: None)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    quiet, busy = _numbers(tmp_path / "quiet"), _numbers(tmp_path / "busy")
    assert quiet[0] == busy[0]
    assert quiet[1] == busy[1]
    prov = json.loads((tmp_path / "busy" / "provenance.json").read_text())
    assert prov["in_effect"]["torch_threads"] == 2 and prov["in_effect"]["env"]["MKL_DYNAMIC"] == "FALSE"
