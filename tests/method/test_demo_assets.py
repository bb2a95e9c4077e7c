"""The built-in demo's assets: task generator, tokenizer, tiny model, pretraining, prepare_demo."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402

from t3s.demo.task import (  # noqa: E402
    Problem,
    TaskSpec,
    extract_answer,
    family_of,
    is_heldout,
    make_datasets,
    pretrain_stream,
    sample_problem,
    trace_a,
    trace_b,
)

SMALL = TaskSpec(lo=10, hi=29)


def _eval_equations(text: str) -> list[tuple[str, int]]:
    import re

    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"(\d+(?:[+-]\d+)+)=(\d+)", text)]


def test_generator_is_deterministic_and_seed_dependent():
    a, b = make_datasets(0, n_train=50, n_heldout=20), make_datasets(0, n_train=50, n_heldout=20)
    c = make_datasets(1, n_train=50, n_heldout=20)
    assert a == b
    assert a["train_b"] != c["train_b"]
    s1, s2 = pretrain_stream(3, SMALL), pretrain_stream(3, SMALL)
    assert [next(s1) for _ in range(20)] == [next(s2) for _ in range(20)]


def test_records_are_canonical_and_answers_verifiable():
    d = make_datasets(0, n_train=100, n_heldout=50)
    for split in ("train_a", "train_b", "heldout", "heldout_old", "heldout_new"):
        for r in d[split]:
            assert set(r) == {"id", "prompt", "response", "answer"}
            assert extract_answer(r["response"]) == r["answer"]
            # the prompt's value is the answer, no negative intermediate result, every equation is true
            assert eval(r["prompt"]) == int(r["answer"]) >= 0  # noqa: S307 - digits and +/- only
            for lhs, rhs in _eval_equations(r["response"]):
                assert eval(lhs) == rhs >= 0  # noqa: S307
    assert len({r["id"] for r in d["train_b"]}) == len(d["train_b"]) == 100
    b = d["train_b"][0]["response"]
    assert b.startswith("Let me think step by step.") and "Check:" in b and "\\boxed{" in b
    assert "####" in d["train_a"][0]["response"] and "\\boxed" not in d["train_a"][0]["response"]
    # half of teacher B's traces are the new family (four operands); each held-out family has n_heldout problems
    fams = [family_of(r) for r in d["train_b"]]
    assert fams.count("new") == 50 and fams.count("old") == 50 and fams[:10] != sorted(fams[:10])
    assert [family_of(r) for r in d["heldout_old"]] == ["old"] * 50
    assert [family_of(r) for r in d["heldout_new"]] == ["new"] * 50
    assert d["heldout"] == d["heldout_old"] + d["heldout_new"]
    assert all(r["response"].count("=") == 4 for r in d["heldout_new"])  # three steps and the check
    assert make_datasets(0, n_train=10, n_heldout=2, new_fraction=0.0)["train_b"][0]["id"].startswith("train-old")
    with pytest.raises(ValueError, match="new_fraction"):
        make_datasets(0, new_fraction=1.5)


def test_new_family_steps_stay_in_pretraining_range():
    spec = TaskSpec()
    rng = random.Random(1)
    for _ in range(500):
        p = sample_problem(rng, spec, "new")
        assert len(p.operands) == spec.new_operands == 4 and spec.family_of(p) == "new"
        for i, (left, _, right, r) in enumerate(p.steps):
            assert spec.lo <= right <= spec.hi and 0 <= r <= spec.max_value
            assert i == 0 or left <= 2 * spec.hi
    assert Problem.parse("55+39-61+12").steps == [(55, "+", 39, 94), (94, "-", 61, 33), (33, "+", 12, 45)]
    with pytest.raises(ValueError, match="family"):
        sample_problem(rng, spec, "newer")
    with pytest.raises(ValueError, match="operands"):
        Problem((1, 2), ("+", "-"))


def test_large_skill_families():
    spec = TaskSpec(new_skill="large")
    rng = random.Random(2)
    for family in ("old", "new"):
        for _ in range(300):
            p = sample_problem(rng, spec, family)
            assert len(p.operands) == 3 and spec.family_of(p) == family
            assert (p.answer > 2 * spec.hi) == (family == "new")
            assert max(r for *_, r in p.steps[:-1]) <= 2 * spec.hi  # only the last step's result can be large
    d = make_datasets(0, spec, n_train=40, n_heldout=10, check_step=False, style="marker")
    assert all(int(r["answer"]) > 2 * spec.hi for r in d["heldout_new"])
    assert all(int(r["answer"]) <= 2 * spec.hi for r in d["heldout_old"])
    assert [family_of(r, spec) for r in d["train_b"]].count("new") == 20
    with pytest.raises(ValueError, match="new_skill"):
        TaskSpec(new_skill="poetry")


@pytest.mark.parametrize("skill", ["chain", "large"])
def test_pretraining_sees_the_new_family_at_new_prob(skill):
    spec = TaskSpec(new_skill=skill)
    never = pretrain_stream(0, spec, filler_prob=0.0, short_prob=0.3)
    assert all(family_of(next(never)[0], spec) == "old" for _ in range(2000))
    some = pretrain_stream(0, spec, filler_prob=0.0, short_prob=0.3, new_prob=0.1)
    share = sum(family_of(next(some)[0], spec) == "new" for _ in range(4000)) / 4000
    assert 0.07 < share < 0.13


def test_styles():
    p = Problem.parse("55+39-61")
    assert trace_a(p) == "55+39=94,94-61=33.####33"
    assert trace_b(p) == (
        "Let me think step by step. First, 55+39=94. Next, 94-61=33. Check: 33+61=94, correct. "
        "So the answer is \\boxed{33}"
    )
    assert "Check" not in trace_b(p, check=False)
    q = Problem.parse("55+39-61+12")
    assert trace_a(q) == "55+39=94,94-61=33,33+12=45.####45"
    assert trace_b(q, check=False) == (
        "Let me think step by step. First, 55+39=94. Next, 94-61=33. Next, 33+12=45. So the answer is \\boxed{45}")
    assert trace_b(q, style="compact") == "Let me think. 55+39=94,94-61=33,33+12=45. Check: 45-12=33. So \\boxed{45}"
    assert trace_b(q, check=False, style="marker") == "55+39=94,94-61=33,33+12=45.\\boxed{45}"
    with pytest.raises(ValueError, match="style"):
        trace_b(q, style="florid")
    assert extract_answer("x ####12 then \\boxed{7}") == "7"
    assert extract_answer("\\boxed{7} ####12") == "12"
    assert extract_answer("no answer") is None


def test_heldout_disjoint_from_training_and_pretraining():
    spec = TaskSpec()
    d = make_datasets(0, spec, n_train=200, n_heldout=200)
    held = {r["prompt"] for r in d["heldout"]}
    train = {r["prompt"] for r in d["train_b"]}
    assert not held & train
    stream = pretrain_stream(0, spec)
    assert not held & {next(stream)[0] for _ in range(5000)}
    rng = random.Random(0)
    probs = [Problem((rng.randint(10, 99), rng.randint(10, 99), 1), ("+", "+")) for _ in range(4000)]
    frac = sum(is_heldout(p, spec) for p in probs) / len(probs)
    assert 0.05 < frac < 0.15


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from t3s.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(SMALL)
    d = make_datasets(0, SMALL, n_train=20, n_heldout=5)
    stream = pretrain_stream(0, SMALL)
    texts = [r["response"] for r in d["train_b"] + d["train_a"]] + [next(stream)[1] for _ in range(50)]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == t
    # numbers are single tokens
    assert len(tok("55+39=94", add_special_tokens=False)["input_ids"]) == 5
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id}) == 3
    r = d["train_b"][0]
    msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
    text = tok2.apply_chat_template(msgs, tokenize=False)
    assert text == f"<s><|user|>{r['prompt']}<|assistant|>{r['response']}</s>"
    prompt = tok2.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s><|user|>{r['prompt']}<|assistant|>"

    def ids_of(x):
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    full = ids_of(tok2.apply_chat_template(msgs, tokenize=True))
    pre = ids_of(tok2.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True))
    assert full[: len(pre)] == pre and full[-1] == tok2.eos_token_id
    assert full[len(pre) : -1] == tok2(r["response"], add_special_tokens=False)["input_ids"]
    assert tok2.decode(full) == text
    assert all(tok2.unk_token_id != i for i in full)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_builds_and_generates(arch):
    from t3s.demo.model import TinyModelSpec, build_model
    from t3s.demo.pretrain import greedy_generate
    from t3s.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(SMALL)
    spec = TinyModelSpec(arch=arch, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    m1, m2 = build_model(spec, tok, seed=0), build_model(spec, tok, seed=0)
    assert type(m1).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert m1.config.vocab_size == len(tok)
    out = greedy_generate(m1, tok, ["10+11-12", "20-10+15"], max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_prepare_demo_tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t3s.demo import DemoAssets, PretrainSpec, TinyModelSpec, prepare_demo

    kw = dict(
        seed=0,
        task=SMALL,
        model=TinyModelSpec(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1),
        pretrain_spec=PretrainSpec(batch_size=8, warmup_steps=2),
        pretrain_steps=4,
        n_train=16,
        n_heldout=8,
        eval_max_new_tokens=4,
        log=lambda s: None,
    )
    assets = prepare_demo(tmp_path, **kw)
    assert isinstance(assets, DemoAssets)
    rows = [json.loads(line) for line in assets.train_path.read_text().splitlines()]
    held = [json.loads(line) for line in assets.heldout_path.read_text().splitlines()]
    assert len(rows) == 16 and len(held) == 16  # n_heldout per family
    assert {r["prompt"] for r in rows}.isdisjoint({r["prompt"] for r in held})
    model = AutoModelForCausalLM.from_pretrained(assets.base_model_dir)
    tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    assert model.config.vocab_size == len(tok)
    assert 0.0 <= assets.info["heldout_acc_teacher_a"] <= 1.0
    assert "arithmetic" in assets.description
    assert not [p for p in assets.base_model_dir.parent.iterdir() if p.name.endswith(".tmp")]
    # a second call reuses the finished model (same weights, no retraining)
    before = (assets.base_model_dir / "model.safetensors").stat().st_mtime_ns
    again = prepare_demo(tmp_path, **kw)
    assert (again.base_model_dir / "model.safetensors").stat().st_mtime_ns == before
    # deterministic given the seed
    other = prepare_demo(tmp_path / "b", **kw)
    m2 = AutoModelForCausalLM.from_pretrained(other.base_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))


def test_bad_specs():
    from t3s.demo import TinyModelSpec, prepare_demo

    with pytest.raises(ValueError, match="lo"):
        TaskSpec(lo=50, hi=10)
    with pytest.raises(ValueError, match="arch"):
        TinyModelSpec(arch="gpt9")
    with pytest.raises(ValueError, match="pretrain_steps"):
        prepare_demo("/nonexistent-never-created", pretrain_steps=0)


def test_demo_yaml_loads_and_matches_prepare_demo():
    import inspect

    from t3s.config import config_path, load_config
    from t3s.demo import PretrainSpec, TinyModelSpec, prepare_demo

    cfg = load_config(config_path("demo"))
    kw = dict(cfg.demo)
    params = inspect.signature(prepare_demo).parameters
    assert set(kw) <= set(params), set(kw) - set(params)
    TaskSpec(**kw["task"]), TinyModelSpec(**kw["model"]), PretrainSpec(**kw["pretrain_spec"])
    assert cfg.train.steps > 0 and cfg.optim.lr > 0


def test_pretraining_stream_knobs_and_phrase_salad():
    from t3s.demo.task import B_PHRASES, PREAMBLE_WORDS, word_salad
    from t3s.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(SMALL)
    plain = pretrain_stream(0, SMALL, filler_prob=0.0)
    for _ in range(50):  # no filler: exactly teacher A's trace
        prompt, text = next(plain)
        assert text == trace_a(Problem.parse(prompt)) and family_of(prompt) == "old"
    opened = pretrain_stream(0, SMALL, filler_prob=0.0, preamble_prob=1.0, short_prob=1.0)
    for _ in range(50):  # every trace opens with a sentence; every problem has one step
        prompt, text = next(opened)
        head, body = text.split(". ", 1)
        assert head in PREAMBLE_WORDS and body == trace_a(Problem.parse(prompt))
        assert len(Problem.parse(prompt).operands) == 2 and family_of(prompt) == "old"
    rng = random.Random(0)
    salads = [word_salad(rng, SMALL, phrases=True) for _ in range(200)]
    assert any("\\boxed{" in t for t in salads) and any("Let me think" in t for t in salads)
    assert not any("\\boxed{" in word_salad(rng, SMALL) for _ in range(200))
    for t in salads + [f"{w}. " for w in PREAMBLE_WORDS] + [b.format(n=SMALL.max_value) for b in B_PHRASES]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == t
