"""Guards shared by the public ops: tensors they cannot run on, said clearly before any work.

* ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``, ``jacrev``, ...) hand the op functorch wrapper tensors.
  The ops' Triton kernels are ``torch.autograd.Function``s without vmap / jvp rules, and their argument checks
  read values on the host, so a transform would fail deep inside with an opaque message. :func:`reject_transforms`
  names the op and the alternatives instead.
* Meta tensors carry no values: :func:`reject_meta` is for ops that must read values on the host (the union mask
  reads its block count). ``linear_cross_entropy`` / ``token_logprobs`` do run on meta tensors (shape and dtype
  inference through the reference path); they only skip their value checks there.
"""

from __future__ import annotations

import torch

__all__ = ["reject_meta", "reject_transforms"]


def _functorch_kind(t: torch.Tensor) -> str | None:
    f = torch._C._functorch
    if not f.is_functorch_wrapped_tensor(t):
        return None
    return "vmap" if f.is_batchedtensor(t) else "grad / vjp / jvp / jacrev / jacfwd"


def reject_transforms(fn: str, alternative: str, **tensors) -> None:
    """``TypeError`` when any of ``tensors`` (name → tensor or ``None``) is a ``torch.func`` wrapper."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the functorch query; compiled calls reach the ops
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            kind = _functorch_kind(t)
            if kind is not None:
                raise TypeError(
                    f"{fn} does not support torch.func transforms (got {name} traced by torch.func {kind}): its "
                    f"fused kernels have no vmap / forward-mode rules. {alternative}"
                )


def reject_meta(fn: str, why: str, **tensors) -> None:
    """``ValueError`` when any of ``tensors`` (name → tensor or ``None``) lives on the meta device."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise ValueError(f"{fn} does not support meta tensors (got {name} on 'meta'): {why}")
