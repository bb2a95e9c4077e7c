"""dLLM T3S from `t3s run`: AR selector trajectory + Δc, targets at τ, block-diffusion SFT / T3S, diffusion-decoded
held-out evaluation, report."""

import json

import pytest
from _tiny import make_tiny, tiny_config

from t3s.pipeline import run_pipeline


@pytest.fixture(scope="module")
def dllm_run(tmp_path_factory):
    from t3s.demo.model import TinyModelSpec, build_model
    from t3s.train import load_tokenizer

    root = tmp_path_factory.mktemp("dllm")
    paths = make_tiny(root, n_train=8, n_heldout=2)
    tok = load_tokenizer(paths["model"])
    student = root / "student"  # the block-diffusion student: another tiny model with the same tokenizer
    build_model(TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=128), tok, seed=1).save_pretrained(student)
    tok.save_pretrained(student)
    run = root / "run"
    cfg = tiny_config(root, run, "train.mode=dllm", "variants=[sft,t3s]", f"model.selector={paths['model']}",
                      f"model.path={student}", "dllm.mask_token_id=3", "dllm.block_size=4", "train.steps=2",
                      "eval.max_new_tokens=5", "eval.num_prompts=2", "select.tau=0.01")
    report = run_pipeline(cfg, progress=False, log=lambda s: None)
    return run, report, paths, student


def test_dllm_run_end_to_end(dllm_run):
    run, report, paths, student = dllm_run
    bn = json.loads((run / "bottleneck.json").read_text())
    ev = json.loads((run / "trajectory" / "evaluation.json").read_text())
    assert ev["model"] == paths["model"]  # the trajectory and Δc ran on the AR selector
    assert bn["method"] == "argmin"
    sel = json.loads((run / "selections" / "dllm_targets" / "selection.json").read_text())
    assert sel["rule"] == "dllm_targets" and sel["params"]["tau"] == 0.01 and sel["stats"]["num_selected"] > 0
    for v in ("sft", "t3s"):
        s = json.loads((run / "variants" / v / "summary.json").read_text())
        assert s["mode"] == "dllm" and s["dllm"]["weight_mode"] == "uniform" and s["trust_remote_code"] is False
        assert (run / "variants" / v / "final" / "config.json").exists()
    rows = [json.loads(x) for x in (run / "variants" / "t3s" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["n_forced"] + r["n_target"] for r in rows) > 0  # the union mask forced the targets in
    rows = [json.loads(x) for x in (run / "variants" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["n_forced"] + r["n_target"] for r in rows) == 0
    for m in ("base", "sft", "t3s"):
        e = json.loads((run / "eval" / f"{m}.json").read_text())
        assert e["backend"] == "diffusion" and e["total"] == 2 and "block-diffusion" in e["decoding"]
    text = report.read_text()
    assert "block-diffusion decoding" in text and "dLLM target share" in text  # τ = 0.01 is far from 5 %
    assert "confirmed at" not in text


def test_diffusion_decoding_follows_the_block_layout(dllm_run):
    from t3s.dllm import diffusion_generate
    from t3s.train import load_model

    _, _, _, student = dllm_run
    model = load_model(str(student), attn_implementation="sdpa")
    from t3s.generate import stop_token_ids
    from t3s.train import load_tokenizer

    kw = dict(block_size=4, mask_token_id=3, eos_token_ids=stop_token_ids(model, load_tokenizer(str(student))))
    a, ra = diffusion_generate(model, [5, 6, 7, 8, 9], max_new_tokens=7, **kw)
    b, _ = diffusion_generate(model, [5, 6, 7, 8, 9], max_new_tokens=7, **kw)
    assert a == b and 3 not in a and (ra == "stop" or len(a) == 7)
    # The first 3 tokens fill the prompt's block (positions 5..7); a longer budget only adds later blocks.
    longer, _ = diffusion_generate(model, [5, 6, 7, 8, 9], max_new_tokens=11, **kw)
    assert longer[: len(a)] == a
    with pytest.raises(ValueError, match="max_new_tokens"):
        diffusion_generate(model, [5], max_new_tokens=0, **kw)
