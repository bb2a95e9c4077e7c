"""dLLM training follows ``optim.schedule`` with the same schedule code as AR training."""

import json
import math

import pytest
from _tiny import tiny_config, tiny_examples

from t3s.schedule import lr_lambda


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_dllm_run_follows_the_configured_schedule(tmp_path, schedule):
    from t3s.train import run_dllm_training

    root = tmp_path / "tiny"
    _, _, examples = tiny_examples(root)
    steps, lr = 4, 1e-3
    cfg = tiny_config(root, tmp_path / "run", "train.mode=dllm", "dllm.mask_token_id=3", "dllm.block_size=4",
                      f"train.steps={steps}", f"optim.lr={lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=0.1",
                      f"optim.schedule={schedule}")
    run_dllm_training(cfg, examples[:4], tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # cosine from 1e-3 to 1e-4 over 4 steps: the rates steps 0..3 use (progress 0, 1/4, 1/2, 3/4)
    expected = [lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))) if schedule == "cosine" else lr
                for s in range(steps)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in rows] == pytest.approx(
        [lr * lr_lambda(s, total_steps=steps, warmup_steps=0, schedule=schedule, min_lr_ratio=0.1)
         for s in range(steps)], rel=1e-12)
