"""Traces whose answers lie beyond 1,024 tokens: the old default (max_new_tokens=1024) saw none of them and gave a
flat curve at 0 with a silent θb; now that is an error at θ0, and the derived default reaches every answer."""

import json

import pytest
from _successor import build_successor

from t3s.bottleneck import CurveError
from t3s.config import load_config
from t3s.pipeline import Pipeline

CHAIN = 1030  # the answer is response token 1030, after the old 1,024-token budget


@pytest.fixture(scope="module")
def succ(tmp_path_factory):
    return build_successor(tmp_path_factory.mktemp("succ"), chain=CHAIN)


def _cfg(succ, run, *overrides):
    return load_config(None, [
        f"run_dir={run}", f"model.path={succ['model']}", f"data.train={succ['train']}", "data.max_length=2048",
        "train.steps=1", "train.batch_size=2", "train.micro_batch_size=2", "optim.lr=1e-7", "accuracy.every=1",
        "accuracy.num_prompts=2", "accuracy.batch_size=2", "variants=[sft]", "diagnostics.delta_prob=false",
        *overrides])


def test_the_old_default_is_an_error_at_theta0_naming_the_budget(succ, tmp_path):
    p = Pipeline(_cfg(succ, tmp_path / "old", "accuracy.max_new_tokens=1024"), progress=False, log=lambda s: None)
    with pytest.raises(CurveError, match=r"100% of the training-accuracy completions hit the generation limit.*"
                                         r"max_new_tokens=1024 \(the longest training response is 1031 tokens\)"):
        p.stage_trajectory()
    metrics = (tmp_path / "old" / "trajectory" / "metrics.jsonl").read_text()
    assert '"step": 1' not in metrics  # stopped before the first optimizer step


def test_the_derived_default_reaches_every_answer_and_a_flat_curve_is_an_error(succ, tmp_path):
    p = Pipeline(_cfg(succ, tmp_path / "new"), progress=False, log=lambda s: None)
    p.stage_trajectory()
    settings = json.loads((tmp_path / "new" / "trajectory" / "evaluation.json").read_text())
    mnt = settings["max_new_tokens"]
    assert mnt["max_new_tokens"] == mnt["longest_response"] == CHAIN + 1  # + the end token
    assert mnt["derived_from"] == "longest training response" and mnt["context_length"] == 2 * CHAIN + 64
    assert settings["sampling"]["temperature"] == 0.0 and settings["num_prompts"] == 2
    rows = [json.loads(x) for x in (tmp_path / "new" / "trajectory" / "metrics.jsonl").read_text().splitlines()]
    acc = [r for r in rows if "train_accuracy" in r]
    assert [r["step"] for r in acc] == [0, 1]
    assert all(r["train_accuracy"] == 1.0 and r["train_truncated_fraction"] == 0.0 for r in acc)
    assert all(r["train_max_completion_tokens"] == CHAIN for r in acc)
    # The student already solves every prompt and the curve never moves: no minimum to take θb from.
    with pytest.raises(CurveError, match=r"training accuracy is 1\.000 at every one of the 2 evaluated steps.*"
                                         r"bottleneck\.method=fixed"):
        p.stage_bottleneck()
    assert not (tmp_path / "new" / "bottleneck.json").exists()


def test_the_context_caps_the_derived_budget(succ, tmp_path):
    from t3s.generate import derive_max_new_tokens

    assert derive_max_new_tokens([1031, 10], [5, 7], 2124)["max_new_tokens"] == 1031
    capped = derive_max_new_tokens([1031, 10], [5, 7], 1000)
    assert capped["max_new_tokens"] == 993 and "context" in capped["derived_from"]
    with pytest.raises(ValueError, match="fills the model's context"):
        derive_max_new_tokens([5], [100], 100)
