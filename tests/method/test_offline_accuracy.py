"""generation.backend=vllm: the trajectory saves a checkpoint at every evaluation step and `trajectory_eval` starts
one engine per checkpoint (here a fake with vLLM's interface that decodes with the HF loop)."""

import json
import sys
import types

from _tiny import make_tiny, tiny_config

from t3s.pipeline import Pipeline


def _fake_vllm(engines):
    from t3s.generate import generate_tokens
    from t3s.train import load_model

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            engines.append(kw)
            self.model = load_model(kw["model"])

        def generate(self, prompts, sp, use_tqdm=True):
            outs = []
            eos = [int(self.model.generation_config.eos_token_id)]
            for p in prompts:
                ((toks, reason),) = generate_tokens(self.model, [p["prompt_token_ids"]], eos_token_ids=eos,
                                                    max_new_tokens=sp.kw["max_tokens"], pad_token_id=0)
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    text=" ".join(map(str, toks)), token_ids=toks, finish_reason=reason)]))
            return outs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_trajectory_eval_runs_one_engine_per_checkpoint_and_keeps_only_theta_b_and_theta_f(tmp_path, monkeypatch):
    engines = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(engines))
    make_tiny(tmp_path / "m")
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "m", run, "generation.backend=vllm", "generation.tensor_parallel_size=2",
                      "variants=[sft,t3s]")
    p = Pipeline(cfg, progress=False, log=lambda s: None)
    names = [st.name for st in p.stages()]
    assert names[:3] == ["sft_trajectory", "trajectory_eval", "bottleneck"]
    p.stage_trajectory()
    assert sorted(x.name for x in (run / "trajectory" / "checkpoints").iterdir()) == [
        "step_000000", "step_000002", "step_000004"]
    p.stage_trajectory_eval()
    assert [e["model"] for e in engines] == [str(run / "trajectory" / "checkpoints" / f"step_{s:06d}")
                                             for s in (0, 2, 4)]
    assert all(e["tensor_parallel_size"] == 2 for e in engines)
    p.stage_bottleneck()
    bn = json.loads((run / "bottleneck.json").read_text())
    assert bn["method"] == "argmin" and bn["evaluated_steps"] == [0, 2, 4] and bn["step"] in (2, 4)
    assert bn["generation"]["backend"] == "vllm"
    assert (run / "trajectory" / "bottleneck" / "config.json").exists()
    assert (run / "trajectory" / "final" / "config.json").exists()
    assert not (run / "trajectory" / "checkpoints").exists()  # removed once θb is copied out
    # a re-run of the stage reuses the per-checkpoint results instead of starting engines again
    rows = [json.loads(x) for x in (run / "trajectory" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_accuracy" in r] == [0, 2, 4]
