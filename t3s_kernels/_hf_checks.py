"""Argument checks of :class:`t3s_kernels.hf.FusedLossCausalLM`: each failure names the argument and what was
expected."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def check_causal_lm(model: nn.Module) -> None:
    """The wrapped model has a trunk (``base_model``) and a head with a ``weight`` (``get_output_embeddings()``)."""
    trunk = getattr(model, "base_model", None)
    if trunk is None or trunk is model:
        raise TypeError(
            "FusedLossCausalLM needs a causal LM whose `base_model` is its trunk (e.g. LlamaForCausalLM, "
            f"Qwen3ForCausalLM); got {type(model).__name__} with base_model={type(trunk).__name__}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(
            f"FusedLossCausalLM needs model.get_output_embeddings() to return a module with a `weight` [V, D]; "
            f"{type(model).__name__} returned {type(head).__name__}"
        )


def resolve_normalizer(normalizer: Any, num_items_in_batch: Any) -> Any:
    """``normalizer`` or its Hugging Face alias ``num_items_in_batch``, never both."""
    if normalizer is not None and num_items_in_batch is not None:
        raise ValueError("pass either normalizer or num_items_in_batch (its Hugging Face alias), not both")
    return num_items_in_batch if normalizer is None else normalizer


def default_labels(input_ids: torch.Tensor | None, labels: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """``labels``, or ``input_ids`` with ``ignore_index`` where ``attention_mask == 0``."""
    if labels is not None:
        return labels
    if input_ids is None:
        raise ValueError("labels is required when input_ids is not given")
    if attention_mask is not None:
        return input_ids.masked_fill(attention_mask == 0, ignore_index)
    return input_ids


def check_labels_shape(labels: torch.Tensor, hidden: torch.Tensor) -> None:
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} ([B, T]), got {tuple(labels.shape)}")
