"""Δc_t profiling: fused log-probs vs the logits oracle, store format, provenance, resume, Δc and its checks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from profile_fixtures import logits_reference, perturbed, tiny_model, tiny_records, tiny_tokenizer

import t3s.profile as profile_mod
from t3s.data import collate, tokenize_records
from t3s.profile import (
    PROVENANCE_FILE,
    SCORE_COLUMNS,
    SCORES_FILE,
    delta_confidence,
    lm_head,
    load_delta,
    load_scores,
    profile_confidence,
    profile_main,
    score_batch,
)

PROVENANCE_KEYS = {
    "format", "model", "model_class", "model_hash", "tokenizer", "tokenizer_hash", "chat_template_hash",
    "examples_hash", "eos_token_ids", "dtype", "num_examples", "num_scored_tokens", "settings", "world_size",
    "device",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize_records(tiny_records(6), tok, max_tokens=1000)


def test_score_batch_matches_the_logits_oracle_on_a_padded_batch(model, tok, examples):
    batch = collate(examples, tok.pad_token_id)
    logprob, entropy = score_batch(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                   return_entropy=True)
    expected = logits_reference(model, batch["input_ids"], batch["labels"])
    torch.testing.assert_close(logprob, expected, atol=1e-5, rtol=1e-5)
    scored = batch["labels"] != -100
    assert logprob[~scored].eq(0).all() and logprob[scored].lt(0).all()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy[:, 1:][scored[:, 1:]], ent[scored[:, 1:]], atol=1e-4, rtol=1e-4)


def test_lm_head_folds_in_config_logit_transforms(model):
    head = lm_head(model)
    assert head.weight is model.lm_head.weight and head.softcap is None and head.temperature == 1.0
    fake = SimpleNamespace(
        get_output_embeddings=lambda: model.lm_head,
        config=SimpleNamespace(final_logit_softcapping=30.0, logits_scaling=4.0),
    )
    head = lm_head(fake)
    assert head.softcap == 30.0 and head.temperature == 4.0


def test_store_format_and_provenance(model, tok, examples, tmp_path):
    store = profile_confidence(model, tok, examples, tmp_path / "base", progress=False, return_entropy=True)
    assert sorted(p.name for p in store.iterdir()) == [PROVENANCE_FILE, SCORES_FILE]  # parts merged and removed
    table = pq.read_table(store / SCORES_FILE)
    assert tuple(table.column_names) == (*SCORE_COLUMNS, "entropy")
    assert table.column("id").to_pylist() == [e.id for e in examples]
    scores = load_scores(store)
    batch = collate(examples, tok.pad_token_id)
    expected = logits_reference(model, batch["input_ids"], batch["labels"])
    for row, ex in enumerate(examples):
        positions = scores.column("positions", row)
        assert positions.tolist() == [j for j, label in enumerate(ex.labels) if label != -100]
        assert scores.column("token_ids", row).tolist() == [ex.input_ids[j] for j in positions]
        assert scores.column("input_ids", row).tolist() == ex.input_ids
        np.testing.assert_allclose(scores.column("logprob", row), expected[row, positions].numpy(), atol=1e-5)
    prov = scores.provenance
    assert set(prov) >= PROVENANCE_KEYS
    assert prov["dtype"] == "float32" and prov["num_examples"] == len(examples)
    assert prov["chat_template_hash"] is not None and prov["eos_token_ids"] == [tok.eos_token_id]
    assert prov["num_scored_tokens"] == sum(e.num_response_tokens for e in examples)


def test_profile_store_bytes_are_reproducible(model, tok, examples, tmp_path):
    """A re-profiled checkpoint gives the same files byte for byte, so the stages after it are not re-run."""
    a = profile_confidence(model, tok, examples, tmp_path / "a", progress=False)
    b = profile_confidence(model, tok, examples, tmp_path / "b", progress=False)
    for name in ("provenance.json", "scores.parquet"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_batching_does_not_change_scores(model, tok, examples, tmp_path):
    one = load_scores(profile_confidence(model, tok, examples, tmp_path / "a", batch_tokens=1, progress=False))
    many = load_scores(profile_confidence(model, tok, examples, tmp_path / "b", batch_tokens=4096, progress=False))
    np.testing.assert_allclose(one.flat("logprob"), many.flat("logprob"), atol=1e-5)


def test_resume_skips_finished_parts_and_finished_stores(model, tok, examples, tmp_path, monkeypatch):
    out = tmp_path / "store"
    real = profile_mod._score_part
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(profile_mod, "_score_part", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        profile_confidence(model, tok, examples, out, batch_tokens=100, part_tokens=100, progress=False)
    assert not (out / PROVENANCE_FILE).exists()  # nothing looks complete
    assert len(list((out / "parts").glob("part-*.parquet"))) == 2
    calls.clear()
    monkeypatch.setattr(profile_mod, "_score_part", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    profile_confidence(model, tok, examples, out, batch_tokens=100, part_tokens=100, progress=False)
    assert len(calls) == len(examples) - 2  # one example per part here; two were done before the crash
    clean = load_scores(profile_confidence(model, tok, examples, tmp_path / "clean", progress=False))
    np.testing.assert_allclose(load_scores(out).flat("logprob"), clean.flat("logprob"), atol=1e-6)

    calls.clear()
    profile_confidence(model, tok, examples, out, batch_tokens=100, part_tokens=100, progress=False)
    assert calls == []  # a finished store from the same run is reused
    profile_confidence(perturbed(model), tok, examples, out, progress=False)
    assert calls  # another model: recomputed
    profile_confidence(perturbed(model), tok, examples, out, progress=False, resume=False)


def test_delta_confidence_subtracts_base_from_bottleneck(model, tok, examples, tmp_path):
    base = profile_confidence(model, tok, examples, tmp_path / "base", progress=False)
    neck = profile_confidence(perturbed(model), tok, list(reversed(examples)), tmp_path / "neck", progress=False)
    delta = delta_confidence(base, neck, out=tmp_path / "delta")
    b, n = load_scores(base), load_scores(neck)
    for row, example_id in enumerate(delta.ids):
        q = n.ids.index(example_id)
        np.testing.assert_allclose(delta.column("delta_c", row), n.column("logprob", q) - b.column("logprob", row),
                                   atol=1e-6)
    reloaded = load_delta(tmp_path / "delta")
    assert reloaded.table.equals(delta.table)
    assert reloaded.provenance["base"]["model_hash"] != reloaded.provenance["bottleneck"]["model_hash"]
    assert 0 < reloaded.provenance["anchor_fraction"] < 1


def test_mismatched_tokenization_is_an_error(model, tok, tmp_path):
    records = tiny_records(3)
    base = profile_confidence(model, tok, records, tmp_path / "base", progress=False)
    plain = tiny_tokenizer(chat_template=False)
    other = profile_confidence(model, plain, records, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match=r"tokenization differs .* example 'q0'"), pytest.warns(UserWarning):
        delta_confidence(base, other)
    fewer = profile_confidence(model, tok, records[:2], tmp_path / "fewer", progress=False)
    with pytest.raises(ValueError, match=r"different examples \(only in base: \['q2'\]"):
        delta_confidence(base, fewer)


def test_bad_inputs_are_errors(model, tok, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        profile_confidence(model, tok, [], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        profile_confidence(model, tok, tiny_records(1), tmp_path / "x", dtype="bf16", progress=False)
    with pytest.raises(FileNotFoundError, match="provenance.json is missing"):
        load_scores(tmp_path / "nowhere")


def test_profile_main_from_local_folders_and_delta(model, tok, tmp_path):
    model.save_pretrained(tmp_path / "theta0")
    tok.save_pretrained(tmp_path / "theta0")
    perturbed(model).save_pretrained(tmp_path / "thetab")
    tok.save_pretrained(tmp_path / "thetab")
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(
        json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response, "answer": r.answer}) + "\n"
        for r in tiny_records(3)
    ))
    common = ["--data", str(data), "--max-tokens", "512", "--no-progress"]
    assert profile_main(["--model", str(tmp_path / "theta0"), "--out", str(tmp_path / "p0"), *common]) == 0
    assert profile_main(["--model", str(tmp_path / "thetab"), "--out", str(tmp_path / "pb"), *common,
                         "--delta-from", str(tmp_path / "p0"), "--delta-out", str(tmp_path / "d")]) == 0
    in_memory = load_scores(profile_confidence(model, tok, tiny_records(3), tmp_path / "mem", progress=False))
    from_disk = load_scores(tmp_path / "p0")
    np.testing.assert_allclose(from_disk.flat("logprob"), in_memory.flat("logprob"), atol=1e-5)
    assert from_disk.provenance["model_hash"] == in_memory.provenance["model_hash"]
    assert from_disk.provenance["model"].endswith("theta0")
    assert load_delta(tmp_path / "d").provenance["num_examples"] == 3
