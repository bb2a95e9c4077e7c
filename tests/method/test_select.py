"""Token selection rules, their statistics, the selection store, and attaching weights to training examples."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from profile_fixtures import perturbed, tiny_model, tiny_records, tiny_tokenizer

from t3s.data import collate, pack_examples, tokenize_records
from t3s.profile import Store, profile_confidence
from t3s.select import (
    RULES,
    apply_selection,
    format_stats,
    load_selection,
    save_selection,
    select_main,
    select_tokens,
)

EOS = 99


def make_delta(deltas: list[list[float]], bases: list[list[float]] | None = None, eos_at=()) -> Store:
    """A Δc store built by hand: example i has tokens at positions 1..n (position 0 is the prompt)."""
    bases = bases or [[-1.0 - 0.1 * j for j in range(len(d))] for d in deltas]
    rows = []
    for i, (d, b) in enumerate(zip(deltas, bases, strict=True)):
        n = len(d)
        token_ids = [EOS if (i, j) in eos_at else 10 + j for j in range(n)]
        rows.append({
            "index": i, "id": f"e{i}", "input_ids": [1, *token_ids], "response_start": 1,
            "positions": list(range(1, n + 1)), "token_ids": token_ids, "logprob_base": b,
            "logprob_bottleneck": [x + y for x, y in zip(b, d, strict=True)], "delta_c": d,
        })
    return Store(path=None, table=pa.Table.from_pylist(rows), provenance={"eos_token_ids": [EOS]})


DELTAS = [[0.5, -0.1, -0.3, 0.0, 0.2], [-0.25, 0.1, -0.05, 1.0]]
FLAT = np.array([x for d in DELTAS for x in d])


def _flat_weights(selection):
    return np.concatenate(selection.weights)


def test_t3s_masks_anchors_and_neg_t3s_the_rest():
    store = make_delta(DELTAS)
    t3s = select_tokens(store, rule="t3s")
    assert _flat_weights(t3s).tolist() == (FLAT <= 0).astype(float).tolist()  # anchors Δc > 0 get weight 0
    neg = select_tokens(store, rule="neg_t3s")
    assert (_flat_weights(neg) == 1 - _flat_weights(t3s)).all()
    assert t3s.meaning == "loss_weight" and t3s.stats["selected_fraction"] == pytest.approx(4 / 9)
    assert t3s.stats["weight_fraction"] == pytest.approx(5 / 9)
    assert t3s.stats["per_example"] == {"e0": pytest.approx(2 / 5), "e1": pytest.approx(2 / 4)}


def test_dllm_targets_are_tokens_below_minus_tau():
    targets = select_tokens(make_delta(DELTAS), rule="dllm_targets", tau=0.2)
    assert targets.meaning == "target"
    assert _flat_weights(targets).tolist() == (FLAT < -0.2).astype(float).tolist()
    assert targets.stats["num_selected"] == 2


@pytest.mark.parametrize("rule", ["static_high_conf", "static_low_conf", "random"])
def test_matched_baselines_mask_the_t3s_fraction(rule):
    bases = [[-0.1, -2.0, -0.5, -3.0, -0.2], [-1.0, -0.05, -4.0, -0.3]]
    store = make_delta(DELTAS, bases)
    selection = select_tokens(store, rule=rule, seed=3)
    masked = _flat_weights(selection) == 0
    assert masked.sum() == 4  # same count as the 4 T3S anchors
    flat_base = np.array([x for b in bases for x in b])
    if rule == "static_high_conf":
        assert sorted(flat_base[masked]) == sorted(flat_base)[-4:]
    elif rule == "static_low_conf":
        assert sorted(flat_base[masked]) == sorted(flat_base)[:4]
    else:
        again = select_tokens(store, rule=rule, seed=3)
        other = select_tokens(store, rule=rule, seed=4)
        assert (_flat_weights(again) == _flat_weights(selection)).all()
        assert _flat_weights(other).sum() == _flat_weights(selection).sum()
    assert select_tokens(store, rule=rule, fraction=1 / 9).stats["num_selected"] == 1


@pytest.mark.parametrize("ranking", ["global", "per_sequence"])
def test_baselines_mask_as_many_tokens_as_t3s_after_the_end_token_exemption(ranking):
    # the end tokens are anchors (Δc > 0) and the most confident tokens: exempting them after choosing would
    # leave T3S with 3 masked tokens and static_high_conf with fewer
    deltas = [[0.5, -0.1, 0.3, 0.0, 0.2], [0.4, 0.1, -0.05, -1.0]]
    bases = [[-0.01, -2.0, -0.5, -3.0, -0.2], [-0.02, -0.05, -4.0, -0.3]]
    store = make_delta(deltas, bases, eos_at={(0, 0), (1, 0)})
    t3s = select_tokens(store, always_train_eos=True)
    assert t3s.stats["num_selected"] == 3 and t3s.stats["end_selected"] == 0
    for rule in ("static_high_conf", "static_low_conf", "random"):
        for seed in range(5):
            sel = select_tokens(store, rule=rule, seed=seed, always_train_eos=True, ranking=ranking)
            assert sel.stats["num_selected"] == 3 and sel.stats["end_selected"] == 0, (rule, seed)
            assert sel.params["matched_count"] == 3 and sel.params["ranking"] == ranking
            if ranking == "per_sequence":  # each sequence masks as many as T3S masks in it
                assert [int((w == 0).sum()) for w in sel.weights] == [int((w == 0).sum()) for w in t3s.weights]
    high = select_tokens(store, rule="static_high_conf", always_train_eos=True, ranking=ranking)
    expected = [[1, 1, 1, 1, 0], [1, 0, 1, 0]] if ranking == "global" else [[1, 1, 0, 1, 0], [1, 0, 1, 1]]
    assert [w.tolist() for w in high.weights] == expected  # the most confident non-end tokens
    explicit = select_tokens(store, rule="random", fraction=0.5, always_train_eos=True, ranking=ranking)
    assert explicit.stats["num_selected"] == 5 and explicit.stats["end_selected"] == 0  # 0.5 x 9 rounds half up
    with pytest.raises(ValueError, match="ranking"):
        select_tokens(store, rule="random", ranking="per_batch")


def test_threshold_quantile_and_always_train_eos():
    store = make_delta(DELTAS, eos_at={(0, 0)})
    assert select_tokens(store, threshold=0.15).stats["num_selected"] == 3  # 0.5, 0.2, 1.0
    assert select_tokens(store, quantile=0.8).stats["num_selected"] == 2  # top 20 % of 9 tokens
    keep_eos = select_tokens(store, always_train_eos=True)
    assert keep_eos.weights[0][0] == 1.0  # Δc = 0.5 but it is the end token
    assert keep_eos.stats["num_selected"] == 3
    with pytest.raises(ValueError, match="always_train_eos"):
        select_tokens(store, rule="dllm_targets", always_train_eos=True)
    with pytest.raises(ValueError, match="rule must be one of"):
        select_tokens(store, rule="nope")


def test_selection_round_trips_through_its_store(tmp_path):
    selection = select_tokens(make_delta(DELTAS), rule="t3s")
    save_selection(selection, tmp_path / "sel")
    loaded = load_selection(tmp_path / "sel")
    assert loaded.ids == selection.ids and loaded.rule == "t3s" and loaded.stats == selection.stats
    for a, b in zip(loaded.weights, selection.weights, strict=True):
        assert (a == b).all()
    assert "4/9 tokens masked" in format_stats(loaded)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Profile θ0 and a perturbed θb over tiny traces; returns (tokenizer, examples, base store, neck store)."""
    root = tmp_path_factory.mktemp("pipeline")
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    examples = tokenize_records(tiny_records(4), tok, max_tokens=1000)
    base = profile_confidence(model, tok, examples, root / "base", progress=False)
    neck = profile_confidence(perturbed(model, scale=0.2), tok, examples, root / "neck", progress=False)
    return tok, examples, base, neck


def test_weights_attach_to_training_examples_aligned_with_labels(pipeline):
    tok, examples, base, neck = pipeline
    selection = select_tokens((base, neck), rule="t3s")
    weighted = apply_selection(examples, selection)
    for ex, positions, weight in zip(weighted, selection.positions, selection.weights, strict=True):
        dense = np.asarray(ex.token_weight)
        assert (dense[positions] == weight).all()
        assert (dense[np.asarray(ex.labels) == -100] == 0).all()
    batch = collate(weighted, tok.pad_token_id)
    kept = batch["token_weight"][batch["labels"] != -100]
    assert kept.mean().item() == pytest.approx(selection.stats["weight_fraction"], abs=1e-6)
    packed = pack_examples(weighted, 4096)
    assert packed[0].token_weight.sum().item() == pytest.approx(batch["token_weight"].sum().item())
    targets = apply_selection(examples, select_tokens((base, neck), rule="dllm_targets", tau=0.0))
    assert all(ex.target_mask is not None and ex.token_weight is None for ex in targets)
    assert collate(targets, tok.pad_token_id)["target_mask"].dtype == torch.bool


def test_differently_tokenized_examples_are_refused(pipeline):
    tok, examples, base, neck = pipeline
    selection = select_tokens((base, neck))
    short = tokenize_records(tiny_records(4), tok, max_tokens=60, truncation="right")
    with pytest.raises(ValueError, match="tokenized differently"):
        apply_selection(short, selection)
    stranger = tokenize_records(tiny_records(5)[4:], tok, max_tokens=1000)
    with pytest.raises(ValueError, match="not in the selection"):
        apply_selection(stranger, selection)
    assert apply_selection(stranger, selection, strict=False)[0].token_weight is None


def test_select_main_writes_one_selection_per_rule(pipeline, tmp_path, capsys):
    _, _, base, neck = pipeline
    out = tmp_path / "sel"
    assert select_main(["--base", str(base), "--bottleneck", str(neck), "--out", str(out), "--rule", *RULES]) == 0
    for rule in RULES:
        assert load_selection(out / rule).rule == rule
    assert (out / "delta" / "delta.parquet").exists()
    assert select_main(["--delta", str(out / "delta"), "--out", str(tmp_path / "one"), "--rule", "t3s",
                        "--always-train-eos"]) == 0
    assert load_selection(tmp_path / "one").params["always_train_eos"] is True
    assert "t3s:" in capsys.readouterr().out
