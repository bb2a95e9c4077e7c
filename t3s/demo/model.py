"""Tiny Hugging Face causal LMs (Llama or Qwen3) built from a config, for the offline CPU demo."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "llama"  # "llama" | "qwen3"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "qwen3"):
            raise ValueError(f"TinyModelSpec.arch must be 'llama' or 'qwen3', got {self.arch!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("TinyModelSpec: hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("TinyModelSpec: num_attention_heads must be a multiple of num_key_value_heads")

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(spec: TinyModelSpec, tokenizer):
    """A ``LlamaConfig`` / ``Qwen3Config`` sized for ``tokenizer`` (vocab, bos/eos/pad ids)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        initializer_range=0.02,
        use_cache=True,
    )
    if spec.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen3Config

    return Qwen3Config(**common)


def build_model(spec: TinyModelSpec, tokenizer, *, seed: int = 0):
    """A freshly initialised tiny causal LM (deterministic given ``seed``), in fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(spec, tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
