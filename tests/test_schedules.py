"""The one learning-rate schedule (gfn_spin.schedules): transformers' formulas after warmup."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from gfn_spin.schedules import lr_factor


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("total", "warmup"), [(1, 0), (7, 0), (30, 3), (101, 10)])
def test_warmup_from_zero_is_transformers_schedule_exactly(decay, total, warmup):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    # transformers' "constant" has no warmup; its "cosine" with a floor is "cosine_with_min_lr"
    expected = get_scheduler(
        decay, optimizer, num_warmup_steps=warmup, num_training_steps=total
    ).lr_lambdas[0]
    warmup_steps = 0 if decay == "constant" else warmup
    for step in range(total + 2):
        assert lr_factor(step, total, warmup_steps=warmup_steps, decay=decay) == expected(step)


def test_cosine_floor_is_transformers_min_lr_and_warmup_can_start_at_one_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total, warmup = 50, 5
    expected = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs={"min_lr_rate": 0.05},
    ).lr_lambdas[0]
    got = [
        lr_factor(
            s, total, warmup_steps=warmup, decay="cosine", min_lr_ratio=0.05, warmup_from_zero=False
        )
        for s in range(total)
    ]
    assert got[warmup:] == [expected(s) for s in range(warmup, total)]
    assert got[:warmup] == [(s + 1) / warmup for s in range(warmup)]
    assert got[-1] > 0.05
