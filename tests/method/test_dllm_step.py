"""t3s.dllm: block-diffusion training step on tiny Hugging Face models built from a config."""

from __future__ import annotations

import copy
import math

import pytest
import torch

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
from t3s_kernels.block_diffusion.reference import philox_uniform

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


# ---- the oracle: the step written from DESIGN.md "Block diffusion", in float64, sharing no code with t3s.dllm --


def oracle_documents(batch) -> list[list[int]]:
    """Each document's flat token indices: a padded row's real tokens, a packed batch's cu_seqlens spans; every
    pad (invalid, or past cu_seqlens[-1]) is a document of its own."""
    B, L = batch["input_ids"].shape
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        docs = [list(range(cu[d], cu[d + 1])) for d in range(len(cu) - 1)]
        return docs + [[j] for j in range(cu[-1], L)]
    valid = batch["attention_mask"].bool().tolist()
    docs = []
    for b in range(B):
        docs.append([b * L + j for j in range(L) if valid[b][j]])
        docs += [[b * L + j] for j in range(L) if not valid[b][j]]
    return docs


def oracle_noise_documents(batch) -> list[tuple[int, int]]:
    """(start, length) of the documents the draw counts blocks in: a padded row, or a packed cu_seqlens span."""
    B, L = batch["input_ids"].shape
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].tolist()
        return [(cu[d], cu[d + 1] - cu[d]) for d in range(len(cu) - 1)]
    return [(b * L, L) for b in range(B)]


def oracle_attention(batch, block_size: int):
    """Dense boolean [B, 1, 2L, 2L] mask and [B, 2L] position ids, by explicit loops over the rule."""
    B, L = batch["input_ids"].shape
    doc_of, pos_of = {}, {}
    for d, toks in enumerate(oracle_documents(batch)):
        for r, j in enumerate(toks):
            doc_of[j], pos_of[j] = d, r
    allowed = torch.zeros(B, 1, 2 * L, 2 * L, dtype=torch.bool)
    for b in range(B):
        for q in range(2 * L):
            jq, q_clean = b * L + q % L, q >= L
            for k in range(2 * L):
                jk, k_clean = b * L + k % L, k >= L
                if doc_of[jq] != doc_of[jk]:
                    continue  # never across documents
                bq, bk = pos_of[jq] // block_size, pos_of[jk] // block_size
                if not q_clean and not k_clean:
                    ok = bq == bk  # noisy <-> noisy within the same block
                elif not q_clean:
                    ok = bk < bq  # noisy -> clean strictly earlier blocks
                elif k_clean:
                    ok = bk <= bq  # clean -> clean same or earlier block
                else:
                    ok = False  # clean never sees noisy
                allowed[b, 0, q, k] = ok
    pos = torch.tensor([[pos_of[b * L + j] for j in range(L)] for b in range(B)])
    return allowed, torch.cat([pos, pos], dim=1)


def oracle_noisy_and_weights(batch, cfg: DLLMConfig, t_blk: torch.Tensor, step: int):
    """x_t and the float64 loss weights from the definition, over the library's draw (the Philox uniforms and the
    per-block t): m = (u < t) ∧ maskable, m' = m ∨ (target ∧ maskable), weights per ``cfg.weight_mode``."""
    ids = batch["input_ids"].reshape(-1)
    maskable = (batch["labels"] != -100).reshape(-1)
    if "attention_mask" in batch:
        maskable &= batch["attention_mask"].bool().reshape(-1)
    target = batch.get("target_mask", torch.zeros_like(batch["labels"], dtype=torch.bool)).reshape(-1).bool()
    u = philox_uniform(cfg.seed, step, torch.arange(ids.numel()))
    noisy, weight = ids.clone(), torch.zeros(ids.numel(), dtype=torch.float64)
    blk = 0  # blocks are numbered document by document (a padded row, pads included; a packed cu_seqlens span)
    for start, n in oracle_noise_documents(batch):
        for k in range(0, n, cfg.block_size):
            t = t_blk[blk]
            blk += 1
            for j in range(start + k, min(start + k + cfg.block_size, start + n)):
                m = bool(u[j] < t) and bool(maskable[j])
                tgt = bool(target[j]) and bool(maskable[j])
                if m or tgt:
                    noisy[j] = MASK_ID
                if cfg.weight_mode == "uniform":
                    weight[j] = float(m or tgt)
                elif cfg.weight_mode == "elbo_naive":
                    weight[j] = 1.0 / float(t) if (m or tgt) else 0.0
                else:  # t3s_split: ELBO 1/t on random non-targets, lambda on every target
                    weight[j] = cfg.target_weight if tgt else (1.0 / float(t) if m else 0.0)
    assert blk == t_blk.numel()
    return noisy.view_as(batch["input_ids"]), weight.view_as(batch["labels"])


def oracle_normalised(per_token: torch.Tensor, batch, cfg: DLLMConfig, weight: torch.Tensor) -> torch.Tensor:
    """The weighted sum over the micro-batch divided as ``cfg.normalization`` says (one micro-batch = one step)."""
    maskable = (batch["labels"] != -100).reshape(-1)
    flat = per_token.reshape(-1)
    if cfg.normalization == "token":
        return flat.sum() / maskable.sum()
    if cfg.normalization == "masked":
        return flat.sum() / (weight.reshape(-1) != 0).sum()
    docs = [d for d in oracle_documents(batch) if maskable[d].any()]
    return sum(flat[d].sum() / maskable[d].sum() for d in docs) / len(docs)


def oracle_loss_and_grads(model, batch, cfg: DLLMConfig, t_blk, step: int, dtype: torch.dtype):
    """Loss and parameter gradients through materialised logits of ``model`` cast to ``dtype``."""
    m = copy.deepcopy(model).to(dtype)
    L = batch["input_ids"].shape[1]
    noisy, weight = oracle_noisy_and_weights(batch, cfg, t_blk, step)
    allowed, pos = oracle_attention(batch, cfg.block_size)
    logits = m(input_ids=torch.cat([noisy, batch["input_ids"]], 1), attention_mask=allowed, position_ids=pos,
               use_cache=False).logits[:, :L]  # fmt: skip
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = -logp.gather(-1, batch["input_ids"][..., None])[..., 0]
    loss = oracle_normalised(ce * weight.to(dtype), batch, cfg, weight)
    loss.backward()
    return noisy, loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def assert_close_to_oracle(got, ref64, ref32, what: str):
    """``|got − ref64| ≤ 2·|ref32 − ref64| + 8·eps32·max|ref64|``: twice the same-dtype error of plain torch, plus a
    few float32 ulps of the scale (the fused loss sums in a different order)."""
    err = (got.double() - ref64).abs().max()
    budget = 2 * (ref32.double() - ref64).abs().max() + 8 * torch.finfo(torch.float32).eps * ref64.abs().max()
    assert err <= budget, f"{what}: |lib - fp64 oracle| = {float(err):.3g} > {float(budget):.3g}"


def packed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    T, cu = 22, torch.tensor([0, 9, 13, 20])  # odd lengths, a pad tail past cu_seqlens[-1]
    ids = torch.randint(0, MASK_ID, (1, T), generator=g)
    labels = ids.clone()
    labels[0, [0, 1, 2, 9, 13, 14]] = -100
    labels[0, 20:] = -100
    target = (torch.rand(1, T, generator=g) < 0.3) & (labels != -100)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu, "target_mask": target}


ORACLE_CASES = [
    pytest.param("padded", dict(weight_mode="t3s_split", target_weight=2.5, normalization="token"), id="split-token"),
    pytest.param("padded", dict(weight_mode="elbo_naive", normalization="sequence", t_mode="per_sequence",
                                sampler="iid"), id="elbo-sequence"),  # fmt: skip
    pytest.param("packed", dict(weight_mode="uniform", normalization="masked", sampler="bd3lm"), id="packed-uniform"),
    pytest.param("packed", dict(weight_mode="t3s_split", normalization="sequence"), id="packed-split-sequence"),
]


@pytest.mark.parametrize("layout,opts", ORACLE_CASES)
def test_step_matches_definition_oracle(layout, opts):
    """Loss and every gradient of the library's step (fused loss, library mask and positions) against the step
    written from the definition in float64 (dense mask by loops, materialised logits, weights from the classes)."""
    cfg = DLLMConfig(**{**CFG.__dict__, **opts})
    batch = make_batch() if layout == "padded" else packed_batch()
    step = 5
    model = tiny_llama(seed=2)
    out = dllm_train_step(model, batch, cfg, step=step)
    out.loss.backward()
    t_blk = out.prepared.union.t  # the library's draw of t (checked against its own oracle in test_noise_levels)
    noisy, loss64, grads64 = oracle_loss_and_grads(model, batch, cfg, t_blk, step, torch.float64)
    _, loss32, grads32 = oracle_loss_and_grads(model, batch, cfg, t_blk, step, torch.float32)
    assert torch.equal(out.prepared.model_input_ids[:, : noisy.shape[1]], noisy)
    assert_close_to_oracle(out.loss.detach(), loss64, loss32, "loss")
    lib_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert lib_grads.keys() == grads64.keys()
    for name, g in lib_grads.items():
        assert_close_to_oracle(g, grads64[name], grads32[name], name)


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
    p = out.prepared  # the loss value and gradients: test_step_matches_definition_oracle
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
