"""Precision-derived tolerances shared by tests and benchmarks.

The rule (flash-attention's): a kernel's error against a float64 oracle may be at most twice the error of the
same computation done by plain PyTorch in the kernel's input dtype, plus a small absolute floor for that dtype.
Nothing here is ever widened to make a kernel pass.
"""

from __future__ import annotations

import torch

# Absolute floor per dtype: a few ulps at unit scale, for values that are exactly zero in the oracle.
EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_abs_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    return (actual.double() - oracle.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_oracle(
    name: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    *,
    dtype: torch.dtype,
    factor: float = 2.0,
) -> None:
    """Assert ``|actual - oracle| <= factor * |baseline - oracle| + EPS[dtype] * scale`` elementwise-max.

    ``oracle`` is a float64 computation; ``baseline`` is the same quantity computed by plain PyTorch in the
    precision under test (the error we accept as unavoidable). ``scale`` is ``max(1, |oracle|_max)``.
    """
    if actual.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values (unwritten or overflowed elements)")
    scale = max(1.0, oracle.double().abs().max().item() if oracle.numel() else 1.0)
    err = max_abs_err(actual, oracle)
    budget = factor * max_abs_err(baseline, oracle) + EPS[dtype] * scale
    if err > budget:
        raise AssertionError(f"{name}: max abs error {err:.3e} exceeds budget {budget:.3e} (dtype {dtype})")
