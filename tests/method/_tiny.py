"""A tiny offline setting for the method tests: the demo's arithmetic task, word-level tokenizer and a
randomly initialised 1-layer Llama (no pretraining), saved to local folders."""

from __future__ import annotations

import json
from pathlib import Path

from t3s.config import Config, load_config


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny(root: Path, *, n_train: int = 16, n_heldout: int = 8, seed: int = 0) -> dict:
    """Model folder, tokenizer folder, train / held-out JSONL under ``root`` (built once per folder)."""
    from t3s.demo.model import TinyModelSpec, build_model
    from t3s.demo.task import TaskSpec, make_datasets
    from t3s.demo.tokenizer import build_tokenizer

    root = Path(root)
    model_dir = root / "model"
    task = TaskSpec()
    if not (model_dir / "config.json").exists():
        tok = build_tokenizer(task)
        spec = TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=128)
        model = build_model(spec, tok, seed=seed)
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        data = make_datasets(seed, task, n_train=n_train, n_heldout=n_heldout)
        write_jsonl(root / "train.jsonl", data["train_b"])
        write_jsonl(root / "heldout.jsonl", data["heldout"])
    return {"model": str(model_dir), "train": str(root / "train.jsonl"), "heldout": str(root / "heldout.jsonl")}


def tiny_examples(root: Path, *, max_tokens: int = 128):
    """``(paths, tokenizer, tokenized training examples)`` of the tiny setting under ``root``."""
    from t3s.data import load_records, tokenize_records
    from t3s.train import load_tokenizer

    paths = make_tiny(root)
    tok = load_tokenizer(paths["model"])
    return paths, tok, tokenize_records(load_records(paths["train"]), tok, max_tokens=max_tokens)


def tiny_config(root: Path, run_dir: Path, *overrides: str) -> Config:
    paths = make_tiny(root)
    return load_config(None, [
        f"run_dir={run_dir}", f"model.path={paths['model']}", f"data.train={paths['train']}",
        f"data.heldout={paths['heldout']}", "data.max_length=128", "train.steps=4", "train.batch_size=4",
        "train.micro_batch_size=2", "optim.lr=1e-2", "optim.warmup_steps=1", "accuracy.every=2",
        "accuracy.num_prompts=4", "accuracy.max_new_tokens=6", "eval.max_new_tokens=6", "bottleneck.method=argmin",
        # a random 1-layer model writes no answers within 6 tokens: the flat curve has no Imitation Shock, so
        # the plumbing tests take θb anyway, after θ0 (min_step=1, a departure from Eq. 1) to get a non-zero Δc
        "bottleneck.on_bad_curve=warn", "bottleneck.on_no_shock=proceed", "bottleneck.min_step=1",
        "diagnostics.num_examples=4", *overrides])
