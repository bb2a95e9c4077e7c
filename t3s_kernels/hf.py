"""One generic adapter that trains any Hugging Face causal LM through the fused loss, with no per-model code.

:class:`FusedLossCausalLM` wraps a ``*ForCausalLM`` (or a ``*ForConditionalGeneration`` whose text head is an
output embedding). It runs the model's own trunk (``model.base_model``: the module the causal-LM class calls to
get its last hidden states) and hands those hidden states, together with the weight (and bias) of
``model.get_output_embeddings()``, to :func:`~t3s_kernels.linear_cross_entropy`. The ``[tokens, vocab]`` logits
never exist. Nothing is patched: the wrapped model keeps working as before, and ``model(...)`` stays available.

Head quirks are read from the text config (``config.get_text_config()``) and folded into the loss's two knobs,
``softcap`` and ``temperature`` (loss logits are ``z = cap(x) / temperature``, ``x`` the raw head output):

============================  ===========================================  ========================================
config key                    what the model does to the raw logits ``x``  folded as
============================  ===========================================  ========================================
``output_multiplier`` (m)     ``x · m`` before soft-capping                ``softcap = c / m``, ``temperature /= m``
``final_logit_softcapping``   ``c · tanh(x / c)`` (Gemma 2/3/4, …)         ``softcap = c``
``logit_scale`` (s)           ``logits · s`` (Cohere)                      ``temperature /= s``
``logits_scaling`` (s)        ``logits / s`` (Granite family)              ``temperature *= s``
============================  ===========================================  ========================================

(``c · tanh(m·x / c) = m · cap_{c/m}(x)``, so any pre-scale / cap / post-scale chain is exactly one
``(softcap, temperature)`` pair.) A model that post-processes its logits some other way (for example
HyperCLOVAX, which *multiplies* by ``logits_scaling``) is caught by :meth:`FusedLossCausalLM.verify_head`, which
compares the adapter's logits with the model's own on a few tokens; pass ``softcap=`` / ``temperature=``
explicitly to override the table.

Distributed: under FSDP2 make the adapter the root (``fully_shard(layer)`` for each decoder layer, then
``fully_shard(adapter)``). The head weight is read inside :meth:`forward`, after the root's pre-forward hook has
gathered it, so a tied or untied head both work. DDP needs nothing special. With ``normalizer`` = scored tokens of
the whole step across ranks, each rank's loss is its share of the global mean, while FSDP2 and DDP *average*
gradients over ranks: multiply the loss by the world size, or call ``adapter.set_gradient_divide_factor(1.0)`` on
every FSDP2 module (``tests/test_hf_fsdp.py`` checks gathered gradient × world size = single-process gradient).

Not included (add them to the returned loss yourself): auxiliary losses a model adds inside its own ``forward``
(e.g. MoE router load-balancing losses).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from t3s_kernels import _hf_checks
from t3s_kernels.linear_ce import _checks
from t3s_kernels.linear_ce.api import TokenLogprobs, linear_cross_entropy, token_logprobs
from t3s_kernels.linear_ce.modules import OptionsModule

__all__ = ["FusedLossCausalLM", "FusedLossOutput", "head_transform_from_config"]


class FusedLossOutput(NamedTuple):
    """What :meth:`FusedLossCausalLM.forward` returns.

    Attributes:
        loss: fp32 scalar for ``reduction="mean" | "sum"``; ``[B, T-1]`` per-token losses for ``"none"``.
        per_token_loss: ``[B, T-1]`` fp32 weighted per-token losses (position ``t`` scores ``labels[:, t+1]``; 0 at
            ignored / zero-weight tokens) when ``return_per_token=True``, else ``None``.
        hidden_states: the trunk's last hidden states ``[B, T, D]`` when ``return_hidden=True``, else ``None``.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def head_transform_from_config(config: Any) -> tuple[float | None, float]:
    """``(softcap, temperature)`` equivalent to the logit post-processing a Hugging Face config declares.

    See the module docstring for the table. Keys that are absent or ``None`` are the identity.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def _num(key: str) -> float | None:
        v = getattr(text, key, None)
        if v is None or isinstance(v, bool):
            return None
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"config.{key} must be a finite number > 0 to fold into the loss, got {v!r}")
        return float(v)

    pre = _num("output_multiplier") or 1.0
    cap = _num("final_logit_softcapping")
    post = 1.0
    if (s := _num("logit_scale")) is not None:
        post *= s
    if (s := _num("logits_scaling")) is not None:
        post /= s
    if cap is None:
        # s·(m·x) = x / temperature with temperature = 1 / (s·m)
        return None, 1.0 / (post * pre)
    # s · c·tanh(m·x / c) = (s·m) · cap_{c/m}(x)
    return cap / pre, 1.0 / (post * pre)


def _denominator(labels, token_weight, normalizer, ignore_index: int, like: torch.Tensor) -> torch.Tensor:
    """``Σ wᵢ`` over scored (shifted) targets, or ``normalizer``; 0 (nothing left to score) becomes inf, so the
    loss and its gradients are 0 — never the undivided sum."""
    if normalizer is not None:
        den = torch.as_tensor(normalizer, dtype=like.dtype, device=like.device).detach().reshape(())
    else:
        active = labels[..., 1:] != ignore_index
        w = token_weight[..., 1:].detach().to(like.dtype) if token_weight is not None else 1.0
        den = (active * w).sum().to(like.dtype)
    return torch.where(den == 0, torch.full_like(den, float("inf")), den)


class FusedLossCausalLM(OptionsModule):
    """Wrap a Hugging Face causal LM so its loss is computed by the fused linear-cross-entropy.

    Args:
        model: a ``transformers`` causal LM (``model.base_model`` is its trunk, ``model.get_output_embeddings()``
            its ``nn.Linear``-like head).
        reduction: default reduction of :meth:`forward` (``"mean"``, ``"sum"``, ``"none"``).
        ignore_index: label value that is not scored (Hugging Face's ``-100``).
        label_smoothing, z_loss: passed to :func:`~t3s_kernels.linear_cross_entropy`.
        softcap, temperature: ``"auto"`` (default) reads them from the config (:func:`head_transform_from_config`);
            a number (or ``None`` for ``softcap``) overrides.
        impl, strategy: backend options of :func:`~t3s_kernels.linear_cross_entropy`.

    Examples:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> lm = FusedLossCausalLM(LlamaForCausalLM(cfg))
        >>> ids = torch.randint(0, 64, (2, 7))
        >>> out = lm(ids, labels=ids)  # same value as LlamaForCausalLM(...)(ids, labels=ids).loss
        >>> out.loss.backward()
    """

    _OPTIONS = (  # listed by extra_repr
        "reduction", "ignore_index", "softcap", "temperature", "label_smoothing", "z_loss", "impl", "strategy",
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None | str = "auto",
        temperature: float | str = "auto",
        impl: str = "auto",
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        _hf_checks.check_causal_lm(model)
        self.model = model
        auto_cap, auto_temp = head_transform_from_config(model.config) if hasattr(model, "config") else (None, 1.0)
        self.softcap = auto_cap if softcap == "auto" else softcap
        self.temperature = auto_temp if temperature == "auto" else float(temperature)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.impl = impl
        self.strategy = strategy

    # ----------------------------------------------------------------------------------------------------------
    # pieces
    # ----------------------------------------------------------------------------------------------------------

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """The trunk's last hidden states ``[B, T, D]`` (what the model's own head would be applied to)."""
        model_kwargs.setdefault("use_cache", False)
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **model_kwargs,
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _head_tensors(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        head = self.head  # read here, inside forward, so FSDP2 has gathered it
        weight, bias = head.weight, getattr(head, "bias", None)
        if torch.is_autocast_enabled(hidden.device.type):
            dt = torch.get_autocast_dtype(hidden.device.type)
            hidden, weight = hidden.to(dt), weight.to(dt)
        elif hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        return hidden, weight, bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialised logits ``[..., V]`` exactly as the loss sees them (for checks and small evals only)."""
        hidden, weight, bias = self._head_tensors(hidden)
        x = F.linear(hidden, weight, bias).float()
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x / self.temperature

    @torch.no_grad()
    def verify_head(self, input_ids: torch.Tensor | None = None, *, rtol: float = 1e-4, **model_kwargs: Any) -> float:
        """Check that the adapter's logits equal the model's own ``model(...).logits`` on a few tokens.

        Runs both (materialising logits, so keep the input small; default: 2 × 8 random ids) and raises
        ``ValueError`` if they differ by more than ``rtol`` relative to the largest logit. Returns the max abs
        difference. Use once per new architecture: it catches logit post-processing the config table misses.
        """
        if input_ids is None:
            V = self.head.weight.shape[0]
            g = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, V, (2, 8), generator=g).to(self.head.weight.device)
        ref = self.model(input_ids=input_ids, use_cache=False, **model_kwargs).logits.float()
        ours = self.logits(self.hidden_states(input_ids, **model_kwargs))
        diff = (ours - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        if not diff <= rtol * scale:
            raise ValueError(
                f"{type(self.model).__name__}: the adapter's logits differ from the model's own by {diff:.3e} "
                f"(scale {scale:.3e}); its head post-processing is not (softcap={self.softcap}, "
                f"temperature={self.temperature}). Pass softcap= / temperature= explicitly."
            )
        return diff

    # ----------------------------------------------------------------------------------------------------------
    # training loss
    # ----------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        reduction: str | None = None,
        active_rows: torch.Tensor | None = None,
        return_per_token: bool = False,
        return_hidden: bool = False,
        **model_kwargs: Any,
    ) -> FusedLossOutput:
        """Causal-LM loss with Hugging Face ``labels`` semantics, never materialising logits.

        Everything after ``input_ids`` is keyword-only (Hugging Face's second positional argument is
        ``attention_mask``, so a positional ``labels`` would be a trap).

        Args:
            input_ids: ``[B, T]`` (or pass ``inputs_embeds``).
            labels: ``[B, T]``, the input ids with ``-100`` where nothing is scored; shifted inside like
                Hugging Face (position ``t`` predicts ``labels[:, t+1]``). Default: ``input_ids`` with
                ``-100`` where ``attention_mask == 0``.
            attention_mask, position_ids, inputs_embeds, **model_kwargs: passed to the model's trunk.
            token_weight: optional ``[B, T]`` float weight **aligned with labels** (``token_weight[:, t]`` weights
                the loss of predicting ``labels[:, t]``); a 0/1 T3S mask is a weight, and weight 0 ≡ ``-100``.
            normalizer: divide the weighted sum by this (e.g. the number of scored tokens in the whole optimizer
                step, a device tensor) instead of by this batch's weight sum; makes gradient accumulation exact.
                ``num_items_in_batch`` (the name the Hugging Face ``Trainer`` uses) is an alias.
            reduction: override the default reduction for this call.
            active_rows: optional int64 flat indices (into ``[B, T]``) of the positions whose shifted label is
                scored with a nonzero weight, passed to :func:`~t3s_kernels.linear_cross_entropy` (saves its one
                host read of the active count on CUDA).
            return_per_token: also return the ``[B, T-1]`` weighted per-token losses.
            return_hidden: also return the trunk's hidden states.

        Returns:
            :class:`FusedLossOutput`.
        """
        normalizer = _hf_checks.resolve_normalizer(normalizer, num_items_in_batch)
        reduction = self.reduction if reduction is None else reduction
        labels = _hf_checks.default_labels(input_ids, labels, attention_mask, self.ignore_index)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds, **model_kwargs)
        _hf_checks.check_labels_shape(labels, hidden)
        labels = labels.to(hidden.device)
        h, weight, bias = self._head_tensors(hidden)
        common = {
            "bias": bias,
            "token_weight": token_weight,
            "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
            "temperature": self.temperature,
            "shift": True,
            "impl": self.impl,
            "strategy": self.strategy,
            "active_rows": active_rows,
        }
        if not (return_per_token and reduction != "none"):
            loss = linear_cross_entropy(h, weight, labels, reduction=reduction, normalizer=normalizer, **common)
            return FusedLossOutput(loss, loss if return_per_token else None, hidden if return_hidden else None)
        # the per-token losses are wanted beside a reduced loss: compute them once, reduce them here
        per_token = linear_cross_entropy(h, weight, labels, reduction="none", **common)
        loss = per_token.sum()
        if reduction == "mean":  # reduced here, so the functional's rules for "mean" are checked here
            _checks.check_mean_weights(
                labels[..., 1:], token_weight[..., 1:] if token_weight is not None else None, normalizer,
                self.ignore_index, "FusedLossCausalLM",
            )
            loss = loss / _denominator(labels, token_weight, normalizer, self.ignore_index, loss)
        return FusedLossOutput(loss, per_token, hidden if return_hidden else None)

    # ----------------------------------------------------------------------------------------------------------
    # per-token log-probs (the Δc_t profiler)
    # ----------------------------------------------------------------------------------------------------------

    def token_logprobs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        return_entropy: bool = False,
        return_lse: bool = False,
        **model_kwargs: Any,
    ) -> TokenLogprobs:
        """Per-token ``log p(labels[:, t] | input_ids[:, :t])``, **aligned with labels**: ``[B, T]`` fp32.

        Position ``t`` of every output scores ``labels[:, t]`` from the hidden state at ``t − 1``; column 0 (no
        prefix) and positions whose label is ``ignore_index`` are 0. ``entropy[:, t]`` / ``lse[:, t]`` belong to
        the same distribution (the one that predicts position ``t``). Default ``labels``: ``input_ids`` (every
        token scored). Differentiable; call under ``torch.no_grad()`` for a single pass that stores nothing.
        """
        if labels is None:
            labels = input_ids
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **model_kwargs)
        _hf_checks.check_labels_shape(labels, hidden)
        h, weight, bias = self._head_tensors(hidden)
        out = token_logprobs(
            h[..., :-1, :],
            weight,
            labels[..., 1:].to(hidden.device),
            bias=bias,
            ignore_index=self.ignore_index,
            softcap=self.softcap,
            temperature=self.temperature,
            return_entropy=return_entropy,
            return_lse=return_lse,
            impl=self.impl,
        )

        def _align(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else F.pad(t, (1, 0), value=0.0)

        return TokenLogprobs(_align(out.logprob), _align(out.entropy), _align(out.lse))
