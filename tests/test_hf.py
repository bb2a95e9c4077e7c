"""The generic Hugging Face adapter against each model's own ``model(input_ids, labels=...).loss`` path.

Tiny random-initialised models are built from ``transformers`` config classes (nothing is downloaded). Every check
compares the loss and EVERY parameter gradient with a float64 oracle (the same model in fp64 through Hugging Face's
own loss) and allows the adapter at most twice the error of Hugging Face's own fp32 path plus an fp32 floor
(:func:`t3s_kernels.testing.assert_close_to_oracle`).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from t3s_kernels._triton import interpreting  # noqa: E402
from t3s_kernels.hf import FusedLossCausalLM, head_transform_from_config  # noqa: E402
from t3s_kernels.testing import assert_close_to_oracle  # noqa: E402

V = 97  # not a multiple of any tile
_COMMON = {
    "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}


def _make(name: str, **overrides):
    torch.manual_seed(0)
    if name == "qwen3":  # untied head
        cfg = transformers.Qwen3Config(**_COMMON, head_dim=8, tie_word_embeddings=False, **overrides)
        return transformers.Qwen3ForCausalLM(cfg)
    if name == "llama":  # tied head
        cfg = transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True, **overrides)
        return transformers.LlamaForCausalLM(cfg)
    if name == "gemma2":  # final_logit_softcapping
        cfg = transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=2.0, **overrides)
        return transformers.Gemma2ForCausalLM(cfg)
    if name == "cohere":  # logits * logit_scale
        cfg = transformers.CohereConfig(**_COMMON, logit_scale=0.5, **overrides)
        return transformers.CohereForCausalLM(cfg)
    if name == "granite":  # logits / logits_scaling
        cfg = transformers.GraniteConfig(**_COMMON, logits_scaling=3.0, **overrides)
        return transformers.GraniteForCausalLM(cfg)
    raise KeyError(name)


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0  # right padding
    labels = ids.masked_fill(am == 0, -100)
    labels[0, :4] = -100  # a "prompt"
    labels[1, 2] = -100
    return ids, am, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_run(model, ids, am, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=am, labels=labels, use_cache=False, **kw).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _ours_run(model, ids, am, labels, *, adapter_kw=None, **kw):
    model.zero_grad(set_to_none=True)
    lm = FusedLossCausalLM(model, **(adapter_kw or {}))
    loss = lm(ids, labels=labels, attention_mask=am, **kw).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _check_against_hf(name, ours_kw, hf_labels, hf_kw=None, *, model_name="qwen3", adapter_kw=None):
    """Adapter (fp32) vs HF (fp64 oracle, fp32 baseline): loss and every parameter gradient."""
    ids, am, labels = _batch()
    model = _make(model_name).eval()
    oracle_model = copy.deepcopy(model).double()
    hf_kw = hf_kw or {}
    base_loss, base_grads = _hf_run(model, ids, am, hf_labels, **hf_kw)
    oracle_kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in hf_kw.items()}
    ora_loss, ora_grads = _hf_run(oracle_model, ids, am, hf_labels, **oracle_kw)
    our_kw = dict(ours_kw)
    labels_ours = our_kw.pop("labels", labels)
    loss, grads = _ours_run(model, ids, am, labels_ours, adapter_kw=adapter_kw, **our_kw)
    assert_close_to_oracle(f"{name}: loss", loss, ora_loss, base_loss, dtype=torch.float32)
    assert set(grads) == set(base_grads) == set(ora_grads), "the adapter must produce a gradient for every parameter"
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    for pname in grads:
        assert_close_to_oracle(
            f"{name}: grad {pname}", grads[pname], ora_grads[pname], base_grads[pname], dtype=torch.float32
        )


@pytest.mark.parametrize("model_name", ["qwen3", "llama"])
def test_loss_and_every_grad_match_hf(model_name):
    ids, am, labels = _batch()
    _check_against_hf(model_name, {}, labels, model_name=model_name)


@pytest.mark.parametrize("model_name", ["gemma2", "cohere", "granite"])
def test_config_head_quirks_match_hf(model_name):
    ids, am, labels = _batch()
    _check_against_hf(model_name, {}, labels, model_name=model_name)


def test_token_weight_all_ones_equals_unweighted():
    ids, am, labels = _batch()
    model = _make("qwen3").eval()
    loss0, g0 = _ours_run(model, ids, am, labels)
    loss1, g1 = _ours_run(model, ids, am, labels, token_weight=torch.ones(ids.shape))
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=4 * torch.finfo(torch.float32).eps * max(1.0, loss0.item()))
    for n in g0:
        scale = max(1.0, g0[n].abs().max().item())
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale, msg=n)


def test_binary_token_weight_equals_hf_with_masked_labels():
    ids, am, labels = _batch()
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(ids.shape, generator=g) < 0.6).float()  # aligned with labels
    hf_labels = labels.masked_fill(w == 0, -100)
    _check_against_hf("0/1 token_weight", {"token_weight": w}, hf_labels)


def test_normalizer_matches_num_items_in_batch():
    ids, am, labels = _batch()
    n = torch.tensor(23.0)  # e.g. scored tokens of the whole optimizer step
    _check_against_hf("normalizer", {"normalizer": n}, labels, {"num_items_in_batch": n})
    _check_against_hf("num_items_in_batch", {"num_items_in_batch": n}, labels, {"num_items_in_batch": n})


def test_position_ids_are_passed_to_the_trunk():
    ids, am, labels = _batch()
    pos = torch.cat([torch.arange(5), torch.arange(6)]).expand(2, -1)  # two packed documents per row
    _check_against_hf("position_ids", {"position_ids": pos}, labels, {"position_ids": pos})


def test_reductions_and_per_token():
    ids, am, labels = _batch()
    model = _make("llama").eval()
    lm = FusedLossCausalLM(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=am, use_cache=False).logits.float()
        ref_tok = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none")
        ref_tok = ref_tok.view(2, -1)
        out = lm(ids, labels=labels, attention_mask=am, return_per_token=True)
        none = lm(ids, labels=labels, attention_mask=am, reduction="none").loss
        total = lm(ids, labels=labels, attention_mask=am, reduction="sum").loss
    tol = {"rtol": 0, "atol": 8 * torch.finfo(torch.float32).eps * ref_tok.abs().max().item()}
    torch.testing.assert_close(out.per_token_loss, ref_tok, **tol)
    torch.testing.assert_close(none, ref_tok, **tol)
    torch.testing.assert_close(total, ref_tok.sum(), rtol=1e-6, atol=0)
    n_scored = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss, ref_tok.sum() / n_scored, rtol=1e-6, atol=0)
    # with a token weight, return_per_token reduces exactly like the functional's weighted mean
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) * (torch.arange(11) % 3 != 0)
    with torch.no_grad():
        weighted = lm(ids, labels=labels, attention_mask=am, token_weight=w)
        weighted_pt = lm(ids, labels=labels, attention_mask=am, token_weight=w, return_per_token=True)
    torch.testing.assert_close(weighted_pt.per_token_loss, ref_tok * w[:, 1:], **tol)
    torch.testing.assert_close(weighted_pt.loss, weighted.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("return_per_token", [False, True])
def test_mean_argument_rules_hold_with_and_without_per_token(return_per_token):
    """The functional's rules for reduction='mean' (weights >= 0 without a normaliser; a normaliser finite, >= 0,
    and 0 only for an empty batch) also hold where the adapter reduces the per-token losses itself."""
    ids, am, labels = _batch()
    lm = FusedLossCausalLM(_make("llama").eval())
    kw = dict(labels=labels, attention_mask=am, return_per_token=return_per_token)
    with torch.no_grad():
        with pytest.raises(ValueError, match="token_weight must be >= 0"):
            lm(ids, token_weight=-torch.ones(ids.shape), **kw)
        with pytest.raises(ValueError, match="normalizer must be finite and >= 0"):
            lm(ids, normalizer=-4.0, **kw)
        with pytest.raises(ValueError, match="normalizer is 0"):
            lm(ids, normalizer=torch.tensor(0.0), **kw)
        empty = lm(ids, token_weight=torch.zeros(ids.shape), normalizer=0.0, **kw).loss
    assert empty.item() == 0.0


def test_labels_default_to_input_ids_masked_by_attention():
    ids, am, _ = _batch()
    model = _make("qwen3").eval()
    lm = FusedLossCausalLM(model)
    with torch.no_grad():
        a = lm(ids, attention_mask=am).loss
        b = model(ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100)).loss
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("model_name", ["qwen3", "gemma2"])
def test_token_logprobs_aligned_with_labels(model_name):
    ids, am, labels = _batch()
    model = _make(model_name).eval()
    lm = FusedLossCausalLM(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=am, use_cache=False).logits.double()
        out = lm.token_logprobs(ids, labels, am, return_entropy=True, return_lse=True)
    logp = logits.log_softmax(-1)
    valid = labels[:, 1:] != -100
    ref_lp = logp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1) * valid
    ref_ent = -(logp.exp() * logp).sum(-1)[:, :-1] * valid
    ref_lse = logits.logsumexp(-1)[:, :-1] * valid
    assert out.logprob.shape == ids.shape and out.logprob.dtype == torch.float32
    checks = ((out.logprob, ref_lp, "logprob"), (out.entropy, ref_ent, "entropy"), (out.lse, ref_lse, "lse"))
    for got, ref, nm in checks:
        assert (got[:, 0] == 0).all(), f"{nm}: column 0 has no prefix and must be 0"
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got[:, 1:].double(), ref, rtol=0, atol=16 * torch.finfo(torch.float32).eps * scale)
    assert (out.logprob <= 0).all()


def test_verify_head_catches_a_wrong_transform():
    model = _make("qwen3").eval()
    assert FusedLossCausalLM(model).verify_head() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        FusedLossCausalLM(model, temperature=2.0).verify_head()


def test_head_transform_folds_premultiplier_and_cap():
    # c·tanh(m·x / c) · s  ==  cap_{c/m}(x) / temperature  with temperature = 1 / (s·m)
    cfg = transformers.PretrainedConfig()
    cfg.output_multiplier, cfg.final_logit_softcapping, cfg.logit_scale = 0.25, 30.0, 2.0
    cap, temp = head_transform_from_config(cfg)
    x = torch.linspace(-500, 500, 101, dtype=torch.float64)
    expected = 2.0 * 30.0 * torch.tanh(0.25 * x / 30.0)
    torch.testing.assert_close(cap * torch.tanh(x / cap) / temp, expected)


def test_rejects_a_bare_trunk():
    model = _make("qwen3")
    with pytest.raises(TypeError, match="base_model"):
        FusedLossCausalLM(model.model)


@pytest.mark.triton
@pytest.mark.skipif(not interpreting(), reason="runs the Triton kernels on the tiny CPU model under TRITON_INTERPRET=1")
def test_triton_impl_matches_hf():
    ids, am, labels = _batch()
    w = torch.ones(ids.shape)
    w[0, 6] = 0.0
    _check_against_hf(
        "triton", {"token_weight": w}, labels.masked_fill(w == 0, -100), adapter_kw={"impl": "triton"}
    )
