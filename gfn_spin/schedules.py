"""The learning-rate schedule of every trainer in the project (GFlowNet fits, α-SPIN iterates).

For whoever configures or writes a trainer: one formula and one set of meanings. A linear
warmup over ``warmup_steps`` optimizer steps, then a decay over the remaining steps to
``min_lr_ratio`` of the peak: ``"constant"``, ``"linear"`` or ``"cosine"``. The decays are
transformers' formulas (``get_scheduler``'s ``linear``, ``cosine`` and ``cosine_with_min_lr``),
written here, not called, because the two trainers' warmups start one step apart and each
keeps its results: α-SPIN's, as transformers' (and TRL's), is at rate 0 at step 0; a
GFlowNet fit's is at 1/warmup, so that no step of a short fit is spent at rate 0.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

LrDecay = Literal["constant", "linear", "cosine"]
LR_DECAYS: tuple[str, ...] = get_args(LrDecay)


def lr_factor(
    step: int,
    total_steps: int,
    *,
    warmup_steps: int,
    decay: str,
    min_lr_ratio: float = 0.0,
    warmup_from_zero: bool = True,
) -> float:
    """The learning rate at optimizer step ``step`` (from 0) of ``total_steps``, over the peak.

    Warmup: ``step / warmup_steps`` (``warmup_from_zero``), else ``(step + 1) / warmup_steps``.
    After it, ``"constant"`` stays at 1, ``"linear"`` falls straight and ``"cosine"`` along
    half a cosine from 1 at the end of warmup to ``min_lr_ratio`` at ``total_steps``.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"decay={decay!r} must be one of {LR_DECAYS}")
    if step < warmup_steps:
        return (step if warmup_from_zero else step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    remaining = max(total_steps - warmup_steps, 1)
    if decay == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * max(0.0, (total_steps - step) / remaining)
    progress = (step - warmup_steps) / remaining
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    warmup_steps: int,
    decay: str,
    min_lr_ratio: float = 0.0,
    warmup_from_zero: bool = True,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as the optimizer's schedule, positioned at ``start_step`` (a resumed
    fit); call its ``step()`` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda i: lr_factor(
            start_step + i,
            total_steps,
            warmup_steps=warmup_steps,
            decay=decay,
            min_lr_ratio=min_lr_ratio,
            warmup_from_zero=warmup_from_zero,
        ),
    )
