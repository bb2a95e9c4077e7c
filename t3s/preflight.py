"""Checks made before any work starts: each failure is one ``ValueError`` line naming the key, file or line.

Used by the pipeline before its first stage and by ``t3s train`` / ``t3s demo`` before they create outputs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "vocab.txt")


def check_file(key: str, path: str) -> Path:
    """``path`` (from config ``key``) exists as a file or folder."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{key}: {path} does not exist")
    if p.is_dir() and not any(p.iterdir()):
        raise ValueError(f"{key}: {path} is an empty folder")
    return p


def check_model_dir(key: str, path: str) -> Path:
    """A local Hugging Face model folder: ``config.json`` and a weights file."""
    if not path:
        raise ValueError(f"{key} is not set: give a local Hugging Face model folder (θ0)")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{key}: {path} is not a local folder; models are loaded from local paths only "
                         "(nothing is downloaded)")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any((p / w).is_file() for w in WEIGHT_FILES) and not any(p.glob("*.safetensors")):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES[::2])})")
    if missing:
        raise ValueError(f"{key}: {path} is not a Hugging Face model folder: missing {', '.join(missing)} "
                         "(write one with model.save_pretrained(folder))")
    return p


def check_tokenizer_dir(key: str, path: str) -> Path:
    """A local tokenizer folder: ``tokenizer_config.json`` plus a vocabulary file."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{key}: tokenizer folder {path} does not exist")
    missing = []
    if not (p / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a vocabulary ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"{key}: {path} holds no tokenizer: missing {' and '.join(missing)} "
                         "(write one with tokenizer.save_pretrained(folder))")
    return p


def check_verifier(key: str, spec: str) -> None:
    from t3s.answers import get_verifier

    try:
        get_verifier(spec)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def model_vocab_size(model_dir: str) -> int | None:
    """``vocab_size`` from the model's ``config.json`` (the embedding rows), without loading weights."""
    from t3s.io import read_json

    cfg = read_json(Path(model_dir) / "config.json")
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return int(size) if size is not None else None


def check_vocabulary(model_dir: str, tokenizer: Any, sequences: Iterable[Iterable[int]], *, what: str) -> None:
    """Every token id the run will feed the model is a row of its embedding."""
    vocab = model_vocab_size(model_dir)
    if vocab is None:
        return
    if len(tokenizer) > vocab:
        raise ValueError(f"model.tokenizer has {len(tokenizer)} tokens but the model at {model_dir} embeds only "
                         f"{vocab} (vocab_size): tokenizer and model do not match")
    top = max((max(seq, default=-1) for seq in sequences), default=-1)
    if top >= vocab:
        raise ValueError(f"{what}: token id {top} is outside the model's vocabulary (vocab_size {vocab})")


def check_mask_token(key: str, mask_token_id: Any, vocab_size: int | None, *, id_dtype: str = "int64") -> int:
    """A block-diffusion mask token: an integer (not bool / float) in ``[0, vocab_size)`` that fits ``id_dtype``."""
    import torch

    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
        raise ValueError(f"{key}: expected an integer token id, got {mask_token_id!r}")
    info = torch.iinfo(getattr(torch, id_dtype))
    if not 0 <= mask_token_id <= info.max:
        raise ValueError(f"{key}: {mask_token_id} is not a token id (must be in [0, {info.max}] for {id_dtype} ids)")
    if vocab_size is not None and mask_token_id >= vocab_size:
        raise ValueError(f"{key}: {mask_token_id} is outside the model's vocabulary (vocab_size {vocab_size})")
    return mask_token_id


def check_dllm(cfg: Any, tokenizer: Any) -> None:
    """``dllm.*`` options resolve and ``dllm.mask_token_id`` is a valid id of the model (train.mode=dllm)."""
    from t3s.dllm import resolve_dllm_config

    try:
        dllm = resolve_dllm_config(cfg.dllm, tokenizer)
    except TypeError as e:
        raise ValueError(f"dllm: {e}") from None
    check_mask_token("dllm.mask_token_id", dllm.mask_token_id, model_vocab_size(cfg.model.path))


def check_kwargs(key: str, fn: Callable, options: Mapping[str, Any], *, nested: Mapping[str, type] | None = None,
                 reserved: Iterable[str] = ()) -> None:
    """``options`` are keyword arguments ``fn`` accepts, except ``reserved`` ones the caller passes itself (and
    nested dataclass specs name only their fields)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [n for n, p in params.items()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in set(reserved)]
        bad = sorted(set(options) - set(known))
        if bad:
            raise ValueError(f"{key}: unknown option(s) {', '.join(bad)}; known: {', '.join(known)}")
    for name, cls in (nested or {}).items():
        value = options.get(name)
        if isinstance(value, Mapping):
            fields = [f.name for f in dataclasses.fields(cls)]
            bad = sorted(set(value) - set(fields))
            if bad:
                raise ValueError(f"{key}.{name}: unknown option(s) {', '.join(bad)}; known: {', '.join(fields)}")
