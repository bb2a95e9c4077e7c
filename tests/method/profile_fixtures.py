"""Tiny offline model + tokenizer + traces for the data / profile / select tests (nothing is downloaded).

The tokenizer is character-level (``WordLevel`` over printable ASCII, one token per character) with ChatML
special tokens and a ChatML chat template, so token boundaries are predictable in assertions.
"""

from __future__ import annotations

import string

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(*, chat_template: bool = True):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat_template else [],
    )
    if chat_template:
        tok.chat_template = CHATML
    return tok


def tiny_model(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 1):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    # Random init gives near-uniform predictions; sharpen the head so log-probs differ token to token.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def perturbed(model, *, seed: int = 1, scale: float = 0.05):
    """A copy of ``model`` with every weight nudged: a stand-in for a fine-tuned checkpoint."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std().clamp(min=1e-3) * torch.randn(p.shape, generator=gen))
    return other


def tiny_records(n: int = 6):
    from t3s.data import Record

    records = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        prompt = f"What is {a}+{b}?"
        response = "Let me add. " * (1 + i % 3) + f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"
        records.append(Record(id=f"q{i}", prompt=prompt, response=response, answer=str(a + b)))
    return records


def logits_reference(model, input_ids, labels):
    """c_t the plain Hugging Face way (full logits): the oracle the fused path is checked against."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    out = torch.zeros(labels.shape, dtype=torch.float32)
    out[:, 1:] = torch.where(targets != -100, picked, 0.0)
    return out
