"""Per-token log-probs of a causal LM batch from its trunk's hidden states and LM head, never its logits.

The scorer under the Δc_t profiler (:mod:`t3s.profile`) and its packed path (:mod:`t3s.packing`): it sits below
both so neither needs the other to score a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from t3s.data import IGNORE_INDEX

__all__ = ["LMHead", "lm_head", "score_batch", "trunk_hidden_states"]


@dataclass(frozen=True)
class LMHead:
    """The LM head as :func:`token_logprobs` wants it, with the model's logit transforms folded in."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    temperature: float


def lm_head(model: Any) -> LMHead:
    """The output embedding of a Hugging Face causal LM and the logit transforms its ``forward`` applies.

    Covers the generic layout (``get_output_embeddings()`` is a ``Linear``) plus the config-level transforms
    used by some families: Gemma-2/3 ``final_logit_softcapping``, Granite ``logits_scaling`` (logits divided),
    Cohere ``logit_scale`` (logits multiplied).
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output embedding with a weight; is it a causal LM?")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    temperature = 1.0
    if getattr(config, "logits_scaling", None):
        temperature = float(config.logits_scaling)
    elif getattr(config, "logit_scale", None):
        temperature = 1.0 / float(config.logit_scale)
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None), softcap=softcap, temperature=temperature)


def trunk_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states ``[B, L, D]`` of the model's decoder trunk (final norm included, no LM head).

    ``attention_mask`` is ``[B, L]`` (padding) or a 4-D mask; ``position_ids`` restart per document in a packed
    row (:mod:`t3s.packing`)."""
    trunk = model.get_decoder()
    if trunk is model:
        raise TypeError(f"cannot find the decoder trunk of {type(model).__name__} (get_decoder() returned the model)")
    # No mask at all when nothing is padded: attention then runs as plain causal attention, which CPU and GPU
    # SDPA serve with memory-efficient kernels instead of a materialised [L, L] mask.
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    out = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@torch.no_grad()
def score_batch(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log p(input_ids[:, j] | input_ids[:, :j])`` for every ``j`` with ``labels[:, j] != -100``.

    Args:
        model: a Hugging Face causal LM (anything with ``get_decoder()`` and ``get_output_embeddings()``).
        input_ids, labels: ``[B, L]`` long; labels unshifted (the HF convention), ``-100`` where not scored.
            ``labels`` on the host (as a data loader yields them) lets the scored rows be indexed there: no host
            sync on a GPU; on the device the kernel counts them (one sync).
        attention_mask: ``[B, L]`` (right padding), a 4-D mask (packed rows), or None.
        position_ids: ``[B, L]`` (packed rows: restarting at 0 per document), or None.
        return_entropy: also return the entropy of the predictive distribution at those positions.

    Returns:
        ``(logprob, entropy)``: fp32 ``[B, L]`` tensors aligned with ``labels`` (0 where labels are -100);
        ``entropy`` is None unless asked for. Peak memory is the trunk's activations plus the kernel's bounded
        workspace: no ``[B, L, V]`` logits.
    """
    from t3s_kernels.linear_ce.api import token_logprobs

    head = lm_head(model)
    hidden = trunk_hidden_states(model, input_ids, attention_mask, position_ids)
    # Position j is predicted from the hidden state at j - 1.
    scored = labels[:, 1:] != IGNORE_INDEX
    # labels still on the host (where the batch is born): the scored rows are indexed there, so the kernel's
    # statistics sweep reads no count back from the device; device labels leave it to the kernel (one sync)
    active_rows = torch.nonzero(scored.reshape(-1)).reshape(-1).to(hidden.device) if not labels.is_cuda else None
    targets = labels[:, 1:].to(hidden.device)
    out = token_logprobs(
        hidden[:, :-1],
        head.weight,
        targets,
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        softcap=head.softcap,
        temperature=head.temperature,
        return_entropy=return_entropy,
        active_rows=active_rows,
    )
    batch, length = labels.shape
    logprob = torch.zeros(batch, length, dtype=torch.float32, device=hidden.device)
    logprob[:, 1:] = out.logprob
    entropy = None
    if return_entropy:
        entropy = torch.zeros_like(logprob)
        entropy[:, 1:] = out.entropy
    return logprob, entropy
