"""Packed variable-length sequences (documents concatenated, position ids restarting per document, no padding):
the Δc_t profiler's packed path gives the same c_t and entropy as one sequence per row, on CPU with sdpa / eager
(block-diagonal mask) and, on a GPU with flash-attn, with flash_attention_2 (varlen from position ids)."""

import importlib.util

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _tiny import tiny_examples

from t3s.data import pack_examples
from t3s.packing import packed_model_inputs, resolve_attn_implementation, score_packed
from t3s.profile import profile_confidence, score_batch
from t3s.train import load_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_examples(root)


def _one_per_row(model, examples):
    out = []
    for e in examples:
        lp, en = score_batch(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]), return_entropy=True)
        out.append((lp[0].numpy(), en[0].numpy()))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scores_equal_one_sequence_per_row(assets, attn):
    paths, _, examples = assets
    model = load_model(paths["model"], attn_implementation=attn).eval()
    ex = examples[:10]
    budget = 3 * max(len(e) for e in ex)
    rows = pack_examples(ex, max_tokens=budget)
    assert len(rows) < len(ex) and max(len(r.example_ids) for r in rows) >= 2  # really packed
    packed = score_packed(model, ex, batch_tokens=budget, return_entropy=True)
    ref = _one_per_row(model, ex)
    for (lp, en), (rlp, ren), e in zip(packed, ref, ex, strict=True):
        assert lp.shape == (len(e),)
        np.testing.assert_allclose(lp, rlp, rtol=0, atol=2e-5)
        np.testing.assert_allclose(en, ren, rtol=0, atol=2e-5)


def test_packed_row_without_document_mask_differs(assets):
    """Control: a plain causal mask over the packed row (same position ids) lets documents attend across
    boundaries and changes c_t, so the equality above is not vacuous."""
    paths, _, examples = assets
    model = load_model(paths["model"], attn_implementation="sdpa").eval()
    row = pack_examples(examples[:4], max_tokens=4 * max(len(e) for e in examples[:4]))[0]
    assert len(row.example_ids) >= 2
    kw = packed_model_inputs(row, "sdpa")
    good, _ = score_batch(model, row.input_ids, row.labels, kw["attention_mask"], position_ids=row.position_ids)
    T = row.num_tokens
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]  # same position ids, no document boundaries
    leaky, _ = score_batch(model, row.input_ids, row.labels, causal, position_ids=row.position_ids)
    second = slice(int(row.cu_seqlens[1]), int(row.cu_seqlens[2]))
    assert (good[0, second] - leaky[0, second]).abs().max() > 1e-3


def test_profile_store_with_packing_matches_padded(assets, tmp_path):
    paths, tok, examples = assets
    a = profile_confidence(paths["model"], tok, examples, tmp_path / "padded", batch_tokens=256, progress=False,
                           return_entropy=True, attn_implementation="auto")
    b = profile_confidence(paths["model"], tok, examples, tmp_path / "packed", batch_tokens=256, progress=False,
                           return_entropy=True, packing=True, attn_implementation="auto")
    ta, tb = pq.read_table(a / "scores.parquet"), pq.read_table(b / "scores.parquet")
    assert ta.column("id").to_pylist() == tb.column("id").to_pylist()
    assert ta.column("positions").to_pylist() == tb.column("positions").to_pylist()
    for col in ("logprob", "entropy"):
        x = np.concatenate([np.asarray(v) for v in ta.column(col).to_pylist()])
        y = np.concatenate([np.asarray(v) for v in tb.column(col).to_pylist()])
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-5)


def test_attn_implementation_auto():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation(None, "cpu") is None
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        resolve_attn_implementation("flash", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_2_packed_matches_sdpa_rows(assets):
    """On CUDA: packed rows through flash_attention_2 (varlen from position ids, no mask) equal sdpa rows (bf16)."""
    paths, _, examples = assets
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    flash = load_model(paths["model"], dtype="bf16", attn_implementation="flash_attention_2", device="cuda").eval()
    sdpa = load_model(paths["model"], dtype="bf16", attn_implementation="sdpa", device="cuda").eval()
    ex = examples[:10]
    budget = 3 * max(len(e) for e in ex)
    packed = score_packed(flash, ex, batch_tokens=budget, return_entropy=True)
    for (lp, en), e in zip(packed, ex, strict=True):
        rlp, ren = score_batch(sdpa, torch.tensor([e.input_ids], device="cuda"),
                               torch.tensor([e.labels], device="cuda"), return_entropy=True)
        # bf16 activations: a few bf16 ulps of the log-prob scale
        np.testing.assert_allclose(lp, rlp[0].cpu().numpy(), rtol=0, atol=5e-2)
        np.testing.assert_allclose(en, ren[0].cpu().numpy(), rtol=0, atol=5e-2)
