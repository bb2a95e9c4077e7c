"""Packed variable-length sequences for long traces: documents concatenated, ``position_ids`` restarting at 0 per
document, no padding, and the attention backend that serves that layout.

* ``attn_implementation="auto"`` (the ``model.attn_implementation`` config key, also accepted by profiling):
  ``flash_attention_2`` on CUDA when the ``flash-attn`` package imports, ``sdpa`` otherwise.
  :func:`resolve_attn_implementation`.
* How each backend sees document boundaries (:func:`packed_model_inputs`): through ``position_ids`` alone and no
  attention mask. ``flash_attention_2`` turns the restarts into ``cu_seqlens`` and runs the varlen kernel (no
  ``[T, T]`` mask, no padding work); for ``sdpa`` / ``eager`` / ``flex_attention``, transformers ≥ 4.53 detects the
  restarts (``find_packed_sequence_indices``) and builds the block-diagonal causal mask in each backend's own form.
  Older transformers get the mask explicitly (boolean for sdpa, additive for eager).
* :func:`score_packed` is the Δc_t profiler's packed path: the examples of a length bucket are packed
  (first-fit decreasing, :func:`t3s.data.pack_examples`) into rows of at most ``batch_tokens`` tokens, scored with
  :func:`t3s.scoring.score_batch`, and unpacked per document; it gives the same ``c_t`` as one sequence per row
  (``tests/method/test_packing.py``; on a GPU with flash-attn, the ``gpu`` test there).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from t3s.data import IGNORE_INDEX, PackedBatch, TokenizedExample, pack_examples
from t3s.scoring import score_batch

__all__ = ["flash_attn_available", "packed_model_inputs", "resolve_attn_implementation", "score_packed"]

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")


def flash_attn_available() -> bool:
    """Whether ``flash-attn`` is installed and a CUDA device is present (what ``flash_attention_2`` needs)."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str | None, device: torch.device | str | None = None) -> str | None:
    """``"auto"`` -> ``flash_attention_2`` (CUDA ``device`` and flash-attn installed) or ``sdpa``; other values
    (``None`` = the library default) are returned unchanged."""
    if requested is None:
        return None
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS} or None, got {requested!r}")
    if requested != "auto":
        return requested
    on_cuda = device is None or torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and flash_attn_available() else "sdpa"


def model_attn_implementation(model: Any) -> str | None:
    """The attention backend a loaded Hugging Face model runs with."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)


def transformers_detects_packing() -> bool:
    """Whether the installed transformers derives per-document masks from packed ``position_ids`` when no
    attention mask is given (``masking_utils.find_packed_sequence_indices``, transformers >= 4.53)."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def packed_model_inputs(row: PackedBatch, attn_implementation: str | None) -> dict[str, torch.Tensor | None]:
    """``input_ids``, ``position_ids`` and the ``attention_mask`` that give exact per-document attention.

    ``flash_attention_2``, or any backend when transformers derives the document mask from ``position_ids``: no
    mask (varlen flash; for sdpa / eager / flex transformers builds the block-diagonal causal mask itself, in the
    form each backend expects). Older transformers with sdpa: the boolean block-diagonal causal mask; with eager:
    the same as an additive fp32 mask (eager *adds* a 4-D mask to the scores, so a boolean one would be wrong).
    """
    inputs: dict[str, torch.Tensor | None] = {"input_ids": row.input_ids, "position_ids": row.position_ids,
                                              "attention_mask": None}
    if attn_implementation == "flash_attention_2" or transformers_detects_packing():
        return inputs
    allowed = row.attention_mask_4d()
    if attn_implementation == "eager":
        inputs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        inputs["attention_mask"] = allowed
    return inputs


def score_packed(
    model: Any,
    examples: Sequence[TokenizedExample],
    *,
    batch_tokens: int,
    return_entropy: bool = False,
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per-example ``(logprob, entropy)`` fp32 arrays of length ``len(example)`` (0 where labels are -100), from
    packed rows of at most ``max(batch_tokens, longest example)`` tokens. Same values as scoring each example in
    its own row: no token attends across a document boundary and each document's first label is dropped (it
    has no prefix in its own document)."""
    if not examples:
        return []
    device = next(iter(model.parameters())).device
    attn = model_attn_implementation(model)
    longest = max(len(e) for e in examples)
    out: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    # pack copies whose id is their index, so each packed document maps back to its example even with repeated ids
    keyed = [replace(e, id=str(i)) for i, e in enumerate(examples)]
    for row in pack_examples(keyed, max_tokens=max(batch_tokens, longest)):
        inputs = packed_model_inputs(row, attn)
        mask = inputs["attention_mask"]
        logprob, entropy = score_batch(
            model, row.input_ids.to(device), row.labels,  # host labels: the scored rows are indexed there (no sync)
            mask.to(device) if mask is not None else None,
            position_ids=row.position_ids.to(device), return_entropy=return_entropy,
        )
        lp = logprob[0].cpu().numpy()
        en = entropy[0].cpu().numpy() if entropy is not None else None
        cu = row.cu_seqlens.tolist()
        for d, key in enumerate(row.example_ids):
            i = int(key)
            a, b = cu[d], cu[d + 1]
            # pack_examples drops each document's first label (no prefix inside its own document); a scored
            # first token therefore stays 0, as it would in a row of its own
            keep = np.asarray(examples[i].labels) != IGNORE_INDEX
            doc_lp = np.where(keep, lp[a:b], 0.0).astype(np.float32)
            doc_en = np.where(keep, en[a:b], 0.0).astype(np.float32) if en is not None else None
            out[i] = (doc_lp, doc_en)
    return [out[i] for i in range(len(examples))]
