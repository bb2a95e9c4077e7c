"""Argument checks of :func:`~t3s_kernels.linear_cross_entropy` that need more than a type test.

Value checks (target range, finite / non-negative weights, the normaliser) follow one rule, :func:`require`: on
CPU (and with ``T3S_CHECK_INPUTS=1`` everywhere) they raise ``ValueError`` eagerly; on CUDA an eager check would
force a host sync on every call, so they run as ``torch._assert_async`` (device-side assert, no sync); on meta
tensors there are no values to check and they are skipped.

What signed weights mean (the choice documented in the functional and the README):

* ``reduction="sum"`` / ``"none"``: any finite weight, negative included (RL-style signed per-token weights such
  as advantages); weight 0 ≡ ignored.
* ``reduction="mean"`` without ``normalizer``: the denominator is ``Σ wᵢ``, which for signed weights can be 0 or
  negative with tokens left, so a negative weight is an error.
* ``reduction="mean"`` with ``normalizer``: the denominator is the normaliser, not the weights, so signed weights
  are allowed; the normaliser must be finite and ``>= 0``, and 0 only when no weighted token is left (an empty
  optimizer step: loss 0, gradients 0). A mean never silently becomes a sum.
"""

from __future__ import annotations

import math
import operator
import os

import torch

__all__ = [
    "NEGATIVE_MEAN_WEIGHT",
    "check_class_weight",
    "check_mean_weights",
    "check_normalizer",
    "check_normalizer_not_empty",
    "check_shift",
    "fold_class_weight",
    "require",
    "value_check_mode",
]


NEGATIVE_MEAN_WEIGHT = (
    "token_weight must be >= 0 for reduction='mean' without a normalizer (the denominator Σ wᵢ of a weighted mean "
    "is undefined for signed weights); signed (RL-style) weights work with reduction='sum' / 'none', or with "
    "reduction='mean' and an explicit normalizer"
)


def value_check_mode(device: torch.device) -> str:
    """``"skip"`` on meta tensors, ``"async"`` under ``torch.compile``, ``"eager"`` off CUDA or with
    ``T3S_CHECK_INPUTS=1``, else ``"async"``."""
    if device.type == "meta":
        return "skip"
    if torch.compiler.is_compiling():  # a traced graph must not sync with the host
        return "async"
    if device.type != "cuda" or os.environ.get("T3S_CHECK_INPUTS", "0") == "1":
        return "eager"
    return "async"


def require(ok: torch.Tensor, message: str, device: torch.device) -> None:
    """Raise ``ValueError(message)`` unless the bool scalar ``ok`` holds (eagerly, asynchronously or not at all,
    per :func:`value_check_mode`)."""
    mode = value_check_mode(device)
    if mode == "eager":
        if not bool(ok):
            raise ValueError(message)
    elif mode == "async":
        torch._assert_async(ok, message)


def check_shift(shift, targets: torch.Tensor, fn: str) -> int:
    """``shift`` as a token count: ``False`` → 0, ``True`` → 1, an int ``k >= 0`` → ``k`` (Cut Cross-Entropy's
    ``shift``); anything else is a ``TypeError`` (a float or a string is never rounded into a shift)."""
    if isinstance(shift, bool):
        k = int(shift)
    else:
        try:
            k = operator.index(shift)
        except TypeError:
            raise TypeError(
                f"{fn}: shift must be a bool or a non-negative int (position t is scored against "
                f"targets[..., t + shift]), got {type(shift).__name__} {shift!r}"
            ) from None
        if k < 0:
            raise ValueError(f"{fn}: shift must be >= 0 (position t is scored against targets[..., t + shift]), "
                             f"got {k}")
    if k and targets.dim() < 1:
        raise ValueError(f"{fn}: shift={shift!r} needs targets with a sequence dim [..., T], got a 0-d tensor")
    return k


def check_normalizer(normalizer, reduction: str, fn: str) -> None:
    """Type, shape and value of ``normalizer``: finite and ``>= 0`` (0 is checked further once the active tokens
    are known, by :func:`check_normalizer_not_empty`)."""
    if reduction != "mean":
        raise ValueError(f"{fn}: normalizer only applies to reduction='mean', got reduction={reduction!r}")
    msg = f"{fn}: normalizer must be finite and >= 0 (it is the denominator of the mean)"
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"{fn}: normalizer must be a one-element tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"{fn}: normalizer must be a real number tensor, got {normalizer.dtype}")
        n = normalizer.detach().reshape(())
        if value_check_mode(n.device) == "eager":
            value = n.item()
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{msg}, got tensor({value!r})")
        else:
            require((n >= 0) & torch.isfinite(n) if n.is_floating_point() else n >= 0, msg, n.device)
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        kind = type(normalizer).__name__
        raise TypeError(f"{fn}: normalizer must be a float or a one-element tensor, got {kind}")
    elif not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"{msg}, got {normalizer!r}")


def check_normalizer_not_empty(normalizer, targets: torch.Tensor, token_weight, ignore_index: int, fn: str) -> None:
    """A zero ``normalizer`` is accepted only when no token with a nonzero weight is left (the mean of nothing is
    0): a zero normaliser with tokens to score would otherwise have to become a sum or an inf."""
    if isinstance(normalizer, torch.Tensor):
        n = normalizer.detach().reshape(()).to(targets.device)
    elif normalizer == 0:
        n = None
    else:
        return
    active = targets != ignore_index
    if token_weight is not None:
        active = active & (token_weight != 0)
    nothing_left = ~active.any()
    ok = nothing_left if n is None else (n != 0) | nothing_left
    require(ok, f"{fn}: normalizer is 0 but some tokens have a nonzero weight: the mean is undefined "
                "(pass the total weight of the whole step, > 0)", targets.device)


def check_class_weight(class_weight, V: int, device: torch.device, *, label_smoothing: float, signed_ok: bool,
                       fn: str) -> None:
    """``class_weight``: a finite float ``[V]`` tensor on the inputs' device, ``>= 0`` unless signed weights are
    allowed (see the module docstring); not combined with label smoothing."""
    if not isinstance(class_weight, torch.Tensor):
        raise TypeError(f"{fn}: class_weight must be a torch.Tensor of shape [V], got {type(class_weight).__name__}")
    if tuple(class_weight.shape) != (V,):
        raise ValueError(f"{fn}: class_weight must have shape [V] = ({V},), got {tuple(class_weight.shape)}")
    if not class_weight.is_floating_point():
        raise TypeError(f"{fn}: class_weight must be a float tensor, got {class_weight.dtype}")
    if class_weight.device != device:
        raise ValueError(f"{fn}: class_weight must be on {device}, got {class_weight.device}")
    if label_smoothing > 0:
        raise ValueError(
            f"{fn}: class_weight with label_smoothing > 0 is not supported: torch.nn.functional.cross_entropy then "
            "weights the smoothing term's log-prob of every class by its class weight, which is not a per-token "
            "weight; use one of the two, or F.cross_entropy on materialised logits"
        )
    cw = class_weight.detach()
    ok = torch.isfinite(cw).all()
    if not signed_ok:
        ok = ok & (cw >= 0).all()
    what = "finite" if signed_ok else "finite and >= 0 for reduction='mean' without a normalizer"
    require(ok, f"{fn}: class_weight must be {what}", device)


def fold_class_weight(class_weight: torch.Tensor, targets: torch.Tensor, token_weight, ignore_index: int):
    """The per-token weight ``token_weight · class_weight[targets]`` (``class_weight[targets]`` alone without
    ``token_weight``); ignored positions get weight 0. Exact: without label smoothing F.cross_entropy's class
    weight is a per-token weight with the weighted-mean denominator ``Σ class_weight[yᵢ]``."""
    active = targets != ignore_index
    safe = torch.where(active, targets, torch.zeros_like(targets)).long()
    cw = class_weight.detach()[safe] * active
    if token_weight is None:
        return cw
    return token_weight.detach().to(torch.promote_types(token_weight.dtype, cw.dtype)) * cw


def check_mean_weights(targets: torch.Tensor, token_weight, normalizer, ignore_index: int, fn: str) -> None:
    """The rules of ``reduction="mean"`` for a caller that reduces per-token losses itself (``targets`` and
    ``token_weight`` already aligned, e.g. shifted): weights ``>= 0`` without a normaliser, else a valid one."""
    if normalizer is None:
        if token_weight is not None and token_weight.numel():
            require((token_weight.detach() >= 0).all(), f"{fn}: {NEGATIVE_MEAN_WEIGHT}", token_weight.device)
        return
    check_normalizer(normalizer, "mean", fn)
    check_normalizer_not_empty(normalizer, targets, token_weight, ignore_index, fn)
