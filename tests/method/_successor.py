"""A hand-built "successor" causal LM for long-trace tests: it deterministically continues ``w0 w1 w2 ...``.

Every layer's output projections are zero, so the last hidden state is the current token's (unit, random)
embedding ``e_i`` up to scale; the LM head row of ``succ(i)`` is ``e_i``, and ``e_i · e_i = 1 > e_k · e_i`` for
every other token, so the argmax is the successor. The chain ``w0 → w1 → … → w{n-1} → \\boxed{7} → <eos>``
makes a teacher trace whose answer appears after ``n`` tokens, which greedy decoding reproduces exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<unk>"]
ANSWER = "\\boxed{7}"


def build_successor(root: Path, *, chain: int, n_examples: int = 2, hidden: int = 64) -> dict:
    """Model + tokenizer folder and a train JSONL (``n_examples`` traces of ``chain + 1`` response tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = Path(root)
    words = [f"w{i}" for i in range(chain)]
    prompts = [f"p{k}" for k in range(n_examples)]
    vocab = [*SPECIALS, ANSWER, *prompts, *words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=4 * chain)
    ids = {w: i for i, w in enumerate(vocab)}
    V, H = len(vocab), hidden
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=H, max_position_embeddings=2 * chain + 64,
                      tie_word_embeddings=False, eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
                      bos_token_id=None, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg)
    succ = {ids[w]: ids[words[i + 1]] for i, w in enumerate(words[:-1])}
    succ[ids[words[-1]]] = ids[ANSWER]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = torch.randn(V, H, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        emb = emb / emb.norm(dim=1, keepdim=True)
        model.model.embed_tokens.weight.copy_(emb.float())
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        for i, j in succ.items():
            model.lm_head.weight[j] = emb[i].float()
        model.lm_head.weight[ids["<eos>"]] = emb[ids[ANSWER]].float()
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    response = " " + " ".join([*words[1:], ANSWER])
    rows = [{"id": f"t{k}", "prompt": f"{p} w0", "response": response, "answer": "7"} for k, p in enumerate(prompts)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"model": str(root / "model"), "train": str(root / "train.jsonl"), "response_tokens": chain + 1}
