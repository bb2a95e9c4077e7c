"""``runtime.portable``: a demo-shaped run writes the same bytes under AVX-512 and AVX2 dispatch, and without the
pins it does not (so the test can fail).

Each run is a child process, because every library reads its dispatch level once, when it first dispatches.
The "AVX2 machine" child caps this CPU's own dispatch the way an AVX2-only CPU would, in torch, MKL, oneDNN and
NumPy (``MKL_ENABLE_INSTRUCTIONS`` caps MKL's choice of code path; ``MKL_CBWR``, the pin, also fixes its blocking).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from t3s.runtime import PORTABLE_ENV  # noqa: E402

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="needs a CPU with AVX-512 to compare two native dispatch levels")

REPO = Path(__file__).resolve().parents[2]
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
TINY_DEMO = [
    "run_dir=run", "demo.pretrain_steps=6", "demo.n_train=12", "demo.n_heldout=3",
    "demo.model={arch: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}",
    "demo.pretrain_spec={batch_size: 8, warmup_steps: 1}", "demo.eval_max_new_tokens=6",
    "train.steps=3", "train.batch_size=6", "train.micro_batch_size=6", "accuracy.every=1",
    "accuracy.num_prompts=3", "accuracy.max_new_tokens=6", "eval.max_new_tokens=6", "variants=[sft,t3s]",
    "diagnostics.num_examples=3", "bottleneck.on_bad_curve=warn",  # a 6-step θ0 never ends its answers
    "bottleneck.on_no_shock=proceed",  # its flat curve has no shock (θb = θ0 by Eq. 1); the bytes still compare
]


def _start(workdir: Path, machine: dict[str, str], portable: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV and k not in AVX2_MACHINE}
    env.update(machine, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    workdir.mkdir()
    # the same relative run_dir in every child, so files that record paths compare too
    return subprocess.Popen([sys.executable, "-m", "t3s.cli", "demo", "--no-progress", *TINY_DEMO,
                             f"runtime.portable={str(portable).lower()}"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _fingerprint(run: Path) -> dict[str, object]:
    """Every weight, score store and plot by hash; the per-family results; the training losses."""
    out: dict[str, object] = {}
    for pattern in ("*.safetensors", "*.parquet", "*.png"):
        for f in run.rglob(pattern):
            out[str(f.relative_to(run))] = hashlib.sha256(f.read_bytes()).hexdigest()
    out["families"] = json.loads((run / "demo" / "families.json").read_text())
    for f in run.rglob("metrics.jsonl"):
        out[str(f.relative_to(run))] = [{k: v for k, v in json.loads(line).items() if k != "time"}
                                        for line in f.read_text().splitlines() if line.strip()]
    return out


def test_portable_run_is_identical_under_avx512_and_avx2_dispatch(tmp_path):
    runs = {(machine, portable): _start(tmp_path / f"{machine}-{portable}", env, portable)
            for machine, env in (("native", {}), ("avx2", AVX2_MACHINE)) for portable in (True, False)}
    for key, proc in runs.items():
        output, _ = proc.communicate(timeout=1800)  # generous: a shared machine may be slow
        assert proc.returncode == 0, f"{key}: {output[-3000:]}"
    prints = {key: _fingerprint(tmp_path / f"{key[0]}-{key[1]}" / "run") for key in runs}
    assert len(prints["native", True]) > 8  # θ0, trajectory, variants, stores, plots, families, losses

    assert prints["native", True] == prints["avx2", True]
    differing = [k for k, v in prints["native", False].items() if prints["avx2", False].get(k) != v]
    assert "demo/base_model/model.safetensors" in differing  # the pins are what makes them equal

    for (machine, portable) in runs:
        prov = json.loads((tmp_path / f"{machine}-{portable}" / "run" / "provenance.json").read_text())
        assert prov["runtime"]["portable"] is portable and prov["portable"]["pinned"] is portable
        if portable:
            assert prov["portable"]["env"] == PORTABLE_ENV and prov["portable"]["aten_cpu_capability"] == "AVX2"
            assert "any x86-64 CPU with AVX2" in prov["reproducible_when"]
