"""`t3s demo --seeds K` end to end at toy size: one run directory per seed, per-family results, the tables."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_demo_seeds_cli(tmp_path, capsys):
    import yaml

    from t3s.cli import demo_config, main

    run = tmp_path / "demo"
    overrides = [
        f"run_dir={run}", "demo.pretrain_steps=2", "demo.n_train=8", "demo.n_heldout=3",
        "demo.model={arch: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}",
        "demo.pretrain_spec={batch_size: 4, warmup_steps: 1}", "demo.eval_max_new_tokens=4",
        "train.steps=2", "train.batch_size=4", "train.micro_batch_size=4", "accuracy.every=1",
        "accuracy.num_prompts=4", "accuracy.max_new_tokens=6", "eval.max_new_tokens=6", "variants=[sft,t3s,rrt]",
        "diagnostics.num_examples=4", "bottleneck.on_bad_curve=warn",  # a 2-step θ0 never ends its answers
        "bottleneck.on_no_shock=proceed",  # so its flat curve has no Imitation Shock
    ]
    base = demo_config(overrides)
    # --first-seed picks the seeds (here 3 and 4); the training seed moves with the data seed
    assert main(["demo", "--seeds", "2", "--first-seed", "3", "--no-progress", *overrides]) == 0
    out = capsys.readouterr().out
    for seed in (3, 4):
        fam = json.loads((run / f"seed{seed}" / "demo" / "families.json").read_text())
        assert fam["families"] == ["old", "new"] and fam["models"] == ["base", "sft", "t3s", "rrt"]
        assert set(fam["accuracy"]["t3s"]) == {"old", "new"} and 0.0 <= fam["anchor_fraction"] <= 1.0
        assert (run / f"seed{seed}" / "report" / "report.md").exists()
        cfg = yaml.safe_load((run / f"seed{seed}" / "config.yaml").read_text())
        assert cfg["demo"]["seed"] - cfg["train"]["seed"] == base.demo["seed"] - base.train.seed
        assert cfg["demo"]["seed"] == seed
        assert set(fam["regime"]) >= {"content_nonpos", "jaccard_low_conf", "loss0_kept", "curves"}
    # different pretraining seeds give different training data
    a, b = ((run / f"seed{s}" / "demo" / "train_teacher_b.jsonl").read_text() for s in (3, 4))
    assert a != b
    table = (run / "seeds.md").read_text()
    assert table.strip() in out and "Over 2 seeds (3, 4)" in table and "| T3S |" in table
    assert "Pre-registered claim" in table and "Regime per seed" in table
    assert set(json.loads((run / "seeds.json").read_text())) == {"3", "4"}
    assert main(["demo", "--seeds", "0", f"run_dir={run}"]) == 2  # a clear error, not a crash
