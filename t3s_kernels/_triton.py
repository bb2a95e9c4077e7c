"""The one place that imports Triton and decides which backend a call runs.

``impl="auto"`` runs Triton on CUDA tensors and the pure-PyTorch reference on CPU tensors. Setting
``TRITON_INTERPRET=1`` (before the first import of triton) lets ``impl="triton"`` run the same kernels on CPU
through Triton's interpreter; tests use this. The package imports without Triton installed.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux-only dependency; macOS / Windows users get the reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

IMPLS = ("auto", "triton", "reference")


def interpreting() -> bool:
    """True when Triton kernels run on CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors living on ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def resolve_impl(impl: str, device: torch.device, *, arg: str = "impl") -> str:
    """Map ``"auto" | "triton" | "reference"`` to the backend that will run on ``device``.

    ``auto`` picks Triton on CUDA and the reference everywhere else (the interpreter is for tests, and must be
    asked for with ``impl="triton"``).
    """
    if impl not in IMPLS:
        raise ValueError(f"{arg} must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "reference"
    if impl == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"{arg}='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton for CPU "
            f"tensors; got tensors on {device} (triton installed: {HAS_TRITON})"
        )
    return impl
