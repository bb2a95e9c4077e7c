"""``nn.Module`` drop-ins for :func:`linear_cross_entropy` and :func:`token_logprobs`.

The modules only hold options; every call goes to the functional in :mod:`t3s_kernels.linear_ce.api`. The loss
owns the LM head: ``forward`` takes the hidden states and the head weight (and optional bias), so any model that
returns hidden states can use it without patching (torchtune's ``set_model_output`` idea).

Examples:
    >>> import torch
    >>> from t3s_kernels import LinearCrossEntropyLoss
    >>> loss_fn = LinearCrossEntropyLoss(z_loss=1e-4)
    >>> hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
    >>> targets = torch.tensor([1, 2, -100, 4, 5, 6])
    >>> loss = loss_fn(hidden, weight, targets)
    >>> loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .api import TokenLogprobs, linear_cross_entropy, token_logprobs

__all__ = ["LinearCrossEntropyLoss", "LinearTokenLogprobs"]


class OptionsModule(nn.Module):
    """An ``nn.Module`` holding keyword options of a functional as attributes, named in ``_OPTIONS`` (in order).

    :meth:`_store_options` sets them from a constructor's arguments, :meth:`_options` reads them back as keyword
    arguments, and ``extra_repr`` lists them (strings quoted).
    """

    _OPTIONS: tuple[str, ...] = ()

    def _store_options(self, values: Mapping[str, Any]) -> None:
        for name in self._OPTIONS:
            setattr(self, name, values[name])

    def _options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._OPTIONS}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self._options().items())


class LinearCrossEntropyLoss(OptionsModule):
    """Cross-entropy straight from hidden states and an LM-head weight, never holding ``[N, V]`` logits.

    Holds the keyword options of :func:`~t3s_kernels.linear_cross_entropy`; ``forward`` takes the per-call
    tensors. See the functional for shapes, numerics and the meaning of each option.

    Args:
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``"mean"`` (weighted mean ``Σ wᵢ·lossᵢ / Σ wᵢ``, or ``/ normalizer``), ``"sum"`` or ``"none"``.
        label_smoothing: in ``[0, 1]``, as :func:`torch.nn.functional.cross_entropy`.
        z_loss: coefficient of the ``lse²`` auxiliary loss.
        softcap: logits become ``softcap · tanh(z / softcap)`` when set.
        temperature: logits are divided by ``temperature``.
        shift: shift inside the op (targets are the input ids): ``True`` / ``k`` scores position ``t`` against
            ``targets[t + k]``.
        return_lse: ``forward`` returns ``(loss, lse)``.
        impl: ``"auto" | "triton" | "reference"``.
        strategy: backend strategy (``"auto"`` picks per call).
        class_weight: optional ``[V]`` class weights (``nn.CrossEntropyLoss``'s ``weight``), held as a buffer so
            ``.to(device)`` moves it.
    """

    _OPTIONS = (
        "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "temperature", "shift", "return_lse",
        "impl", "strategy",
    )

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        shift: bool | int = False,
        return_lse: bool = False,
        impl: str = "auto",
        strategy: str = "auto",
        class_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self._store_options(locals())
        self.register_buffer("class_weight", class_weight)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        normalizer: torch.Tensor | float | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``hidden [..., D]``, ``weight [V, D]``, ``targets [...]`` int64 → loss (and ``lse`` if asked)."""
        return linear_cross_entropy(
            hidden, weight, targets, bias=bias, token_weight=token_weight, normalizer=normalizer,
            class_weight=self.class_weight, **self._options(),
        )


class LinearTokenLogprobs(OptionsModule):
    """Per-token log-probs (and optionally entropy / LSE) from hidden states and an LM-head weight.

    Holds the keyword options of :func:`~t3s_kernels.token_logprobs`; ``forward`` returns its
    :class:`~t3s_kernels.TokenLogprobs` NamedTuple of fp32 ``[...]`` tensors.

    Args:
        ignore_index: target value whose log-prob is reported as 0 (and gets no gradient).
        softcap: logits become ``softcap · tanh(z / softcap)`` when set.
        temperature: logits are divided by ``temperature``.
        return_entropy: also compute the entropy of each row's distribution.
        return_lse: also return each row's log-sum-exp.
        impl: ``"auto" | "triton" | "reference"``.
    """

    _OPTIONS = ("ignore_index", "softcap", "temperature", "return_entropy", "return_lse", "impl")

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        softcap: float | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_lse: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self._store_options(locals())

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> TokenLogprobs:
        """``hidden [..., D]``, ``weight [V, D]``, ``targets [...]`` int64 → ``TokenLogprobs``."""
        return token_logprobs(hidden, weight, targets, bias=bias, **self._options())
