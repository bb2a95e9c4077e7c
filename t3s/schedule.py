"""The learning-rate schedule shared by AR training (:mod:`t3s.train`) and block diffusion (:mod:`t3s.dllm`).

Linear warm-up over ``warmup_steps``, then ``constant`` or ``cosine`` from the peak to ``min_lr_ratio x peak``
at ``total_steps``. The paper gives the peak (1e-5) but not the shape: the defaults (cosine to 0, no warm-up) are
this library's choice, listed with the other paper-silent choices in ``t3s.choices``.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "constant")


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                 schedule: str = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_lambda`; step it once per optimizer step."""
    lr_lambda(0, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
              min_lr_ratio=min_lr_ratio)  # a bad schedule name fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio))
