"""t3s.dllm: block-diffusion training step on tiny Hugging Face models built from a config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t3s.dllm import (
    DLLMConfig,
    dllm_loss,
    dllm_train_step,
    prepare_dllm_batch,
    step_normalizer,
    train_dllm,
    x_t_hidden_states,
)
from t3s_kernels.block_diffusion import FORCED, RANDOM, RANDOM_TARGET, block_diffusion_attention_mask

transformers = pytest.importorskip("transformers")

V, MASK_ID = 61, 60


def tiny_llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def tiny_qwen3(attn="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, attn_implementation=attn,
    )  # fmt: skip
    return transformers.Qwen3ForCausalLM(cfg)


def make_batch(B=2, L=14, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK_ID, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attn = torch.ones(B, L, dtype=torch.long)
    attn[-1, L - 3 :] = 0
    labels[attn == 0] = -100
    target_mask = (torch.rand(B, L, generator=g) < 0.3) & (labels != -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": attn, "target_mask": target_mask}


CFG = DLLMConfig(mask_token_id=MASK_ID, block_size=4, eps_min=0.2, eps_max=0.8, seed=1)


class NoLogits:
    """Forward hook on the LM head: fails the test if logits are ever materialised."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        self.handle.remove()


def materialised_loss(model, prepared, normalizer):
    """The same loss through materialised logits (the check only)."""
    with torch.no_grad():
        h = x_t_hidden_states(model, prepared)
        logits = model.get_output_embeddings()(h).float()
        ce = F.cross_entropy(logits.reshape(-1, V), prepared.input_ids.reshape(-1), reduction="none")
        return (ce * prepared.union.loss_weight.reshape(-1)).sum() / normalizer


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_step_loss_grad_no_logits(make_model):
    model = make_model()
    batch = make_batch()
    hook = NoLogits(model)
    out = dllm_train_step(model, batch, CFG, step=3)
    out.loss.backward()
    assert hook.calls == 0  # the [tokens x vocab] logits never exist
    hook.close()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    # default normaliser: this micro-batch's response tokens
    p = out.prepared
    n_resp = (batch["labels"] != -100).sum()
    assert torch.allclose(out.loss.detach(), materialised_loss(model, p, n_resp), rtol=1e-4, atol=1e-6)
    # class statistics are consistent with the codes
    code = p.union.code
    assert int(out.stats["n_random"]) == int((code == RANDOM).sum())
    assert int(out.stats["n_target"]) == int((code == RANDOM_TARGET).sum())
    assert int(out.stats["n_forced"]) == int((code == FORCED).sum())
    n_t = int(out.stats["n_target"]) + int(out.stats["n_forced"])
    assert n_t == int(batch["target_mask"].sum())
    # the 2L input: [x_t || x_0] with duplicated position ids
    L = batch["input_ids"].shape[1]
    assert torch.equal(p.model_input_ids[:, L:], batch["input_ids"])
    assert torch.equal(p.position_ids[:, :L], p.position_ids[:, L:])


def test_attention_mask_matches_reference():
    batch = make_batch()
    p = prepare_dllm_batch(batch, CFG, step=0, attn_implementation="sdpa")
    ref = block_diffusion_attention_mask(4, valid=batch["attention_mask"].bool())
    assert p.attention_mask.dtype == torch.bool and torch.equal(p.attention_mask[:, 0], ref)
    pe = prepare_dllm_batch(batch, CFG, step=0, attn_implementation="eager")
    assert torch.equal(pe.attention_mask[:, 0] == 0, ref)
    from torch.nn.attention.flex_attention import create_mask

    pf = prepare_dllm_batch(batch, CFG, step=0, attn_implementation="flex_attention")
    B, L2 = ref.shape[0], ref.shape[1]
    assert torch.equal(create_mask(pf.attention_mask.mask_mod, B, 1, L2, L2, device="cpu")[:, 0], ref)


def test_eager_equals_sdpa():
    batch = make_batch()
    a = dllm_train_step(tiny_llama("sdpa"), batch, CFG, step=2).loss
    b = dllm_train_step(tiny_llama("eager"), batch, CFG, step=2).loss
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_perturbation_respects_mask():
    """x_t hidden states of block k depend on clean blocks < k only (and on their own noisy block)."""
    model = tiny_llama().eval()
    bs, L = 4, 16
    batch = {"input_ids": torch.randint(0, MASK_ID, (1, L)), "labels": torch.randint(0, MASK_ID, (1, L))}
    p = prepare_dllm_batch(batch, CFG, step=0, attn_implementation="sdpa")
    with torch.no_grad():
        base = x_t_hidden_states(model, p)
        for k in range(L // bs):
            pert = p.model_input_ids.clone()
            pert[0, L + k * bs :] = (pert[0, L + k * bs :] + 1) % MASK_ID  # clean blocks >= k
            p2 = type(p)(**{**p.__dict__, "model_input_ids": pert})
            h = x_t_hidden_states(model, p2)
            assert torch.equal(h[0, : (k + 1) * bs], base[0, : (k + 1) * bs]), k
            if k + 1 < L // bs:
                assert not torch.allclose(h[0, (k + 1) * bs :], base[0, (k + 1) * bs :])  # later blocks see it
            # noisy tokens of a later block never leak into earlier blocks
            pert = p.model_input_ids.clone()
            pert[0, (k + 1) * bs : L] = MASK_ID
            h = x_t_hidden_states(model, type(p)(**{**p.__dict__, "model_input_ids": pert}))
            assert torch.equal(h[0, : (k + 1) * bs], base[0, : (k + 1) * bs]), k


def test_packed_documents_are_independent():
    model = tiny_llama().eval()
    ids = torch.randint(0, MASK_ID, (1, 20))
    labels = ids.clone()
    labels[0, [0, 1, 9, 10]] = -100
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    batch = {"input_ids": ids, "labels": labels, "cu_seqlens": cu}
    p = prepare_dllm_batch(batch, CFG, step=0, attn_implementation="sdpa")
    assert p.position_ids[0, :20].tolist() == list(range(9)) + list(range(11))
    with torch.no_grad():
        base = x_t_hidden_states(model, p)
        pert = p.model_input_ids.clone()
        pert[0, 9:20] = 5
        pert[0, 29:40] = 5  # the second document, both halves
        h = x_t_hidden_states(model, type(p)(**{**p.__dict__, "model_input_ids": pert}))
    assert torch.equal(h[0, :9], base[0, :9])
    out = dllm_train_step(model, batch, CFG, step=0)
    assert torch.isfinite(out.loss)


def test_packed_batch_from_t3s_data():
    from t3s.data import TokenizedExample, pack_examples

    exs = [TokenizedExample(id=str(i), input_ids=list(range(1, 8 + i)), labels=[-100] * 2 + list(range(3, 8 + i)),
                            response_start=2, target_mask=[0, 0] + [1, 0] * ((5 + i) // 2) + [0] * ((5 + i) % 2))
           for i in range(3)]  # fmt: skip
    (packed,) = pack_examples(exs, max_tokens=64)
    model = tiny_llama()
    cfg = DLLMConfig(**{**CFG.__dict__, "normalization": "sequence"})
    out = dllm_train_step(model, packed, cfg, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    p = out.prepared
    assert p.n_docs == 3 and int(p.n_sequences) == 3
    assert int(out.stats["n_target"] + out.stats["n_forced"]) == int(packed.target_mask.sum())


@pytest.mark.parametrize("normalization", ["token", "sequence", "masked"])
def test_gradient_accumulation_is_exact(normalization):
    cfg = DLLMConfig(**{**CFG.__dict__, "normalization": normalization, "sampler": "iid"})
    batch = make_batch(B=4, L=12, seed=3)
    m1, m2 = tiny_llama(seed=5), tiny_llama(seed=5)
    whole = dllm_train_step(m1, batch, cfg, step=7)
    whole.loss.backward()
    half = [{k: v[a:b] for k, v in batch.items()} for a, b in [(0, 1), (1, 4)]]
    preps = [prepare_dllm_batch(h, cfg, step=7, token_offset=a * 12, attn_implementation="sdpa")
             for h, a in zip(half, [0, 1])]  # fmt: skip
    norm = step_normalizer(preps, normalization)
    total = 0.0
    for pr in preps:
        out = dllm_loss(m2, pr, cfg, norm)
        out.loss.backward()
        total = total + out.loss.detach()
    assert torch.allclose(whole.loss.detach(), total, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_sequence_normalisation_value():
    cfg = DLLMConfig(**{**CFG.__dict__, "normalization": "sequence"})
    model = tiny_llama()
    batch = make_batch()
    out = dllm_train_step(model, batch, cfg, step=1)
    p = out.prepared
    with torch.no_grad():
        logits = model.get_output_embeddings()(x_t_hidden_states(model, p)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), p.input_ids, reduction="none") * p.union.loss_weight
        n = (batch["labels"] != -100).sum(1)
        expect = (ce.sum(1) / n).sum() / 2
    assert torch.allclose(out.loss.detach(), expect, rtol=1e-4)


def test_flex_attention_forward_matches_sdpa():
    """flex_attention with the BlockMask (forward only: CPU FlexAttention has no backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    if not torch.cuda.is_available():
        pytest.skip("HF flex_attention compiles the kernel; too slow for CPU CI (GPU run checks it)")
    dev = "cuda"
    batch = {k: v.to(dev) for k, v in make_batch().items()}
    a = tiny_llama("sdpa").to(dev)
    b = tiny_llama("flex_attention").to(dev)
    la = dllm_train_step(a, batch, CFG, step=0).loss
    lb = dllm_train_step(b, batch, CFG, step=0).loss
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5)


def test_train_dllm_loop_logs_classes():
    from t3s.data import TokenizedExample

    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(6):
        n = 10 + i
        ids = torch.randint(0, MASK_ID, (n,), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]
        tmask = [0] * 3 + [int(x) for x in (torch.rand(n - 3, generator=g) < 0.3).tolist()]
        examples.append(TokenizedExample(id=str(i), input_ids=ids, labels=labels, response_start=3,
                                         target_mask=tmask))  # fmt: skip
    model = tiny_llama()
    rows = []
    hist = train_dllm(model, examples, cfg={"mask_token_id": MASK_ID, "block_size": 4}, pad_id=0, steps=3,
                      batch_size=4, micro_batch_size=2, lr=1e-3, log=rows.append)  # fmt: skip
    assert len(hist) == 3 and rows == hist
    for r in hist:
        assert math.isfinite(r["loss"]) and r["normalizer"] > 0
        assert r["n_forced"] + r["n_target"] > 0
        assert {"n_random", "ce_random", "n_target", "ce_target", "n_forced", "ce_forced"} <= set(r)


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="mask_token_id"):
        dllm_train_step(model, make_batch(), DLLMConfig())
    with pytest.raises(ValueError, match="normalization"):
        DLLMConfig(normalization="bogus")
    with pytest.raises(ValueError, match="unknown dllm option"):
        DLLMConfig.from_dict({"blocksize": 4})
    with pytest.raises(ValueError, match="labels"):
        dllm_train_step(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, CFG)
    with pytest.raises(ValueError, match="attention implementation"):
        prepare_dllm_batch(make_batch(), CFG, step=0, attn_implementation="flash_attention_2")
