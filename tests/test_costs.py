"""Whole costs of fitted samplers (samplers.costs) and the search for their match at equal TV."""

from __future__ import annotations

import math

import pytest

from experiments.evaluation import smallest_sir_ks
from samplers.costs import break_even_draws_per_prompt, format_break_even, total_tokens_per_draw


def cumulative_break_even(fit: int, prompts: int, own: float, baseline: float) -> int | None:
    """The first whole number of draws per prompt at which the fitted sampler's running total
    (fit plus its draws) is at most the baseline's, counted draw by draw; None within 10⁶."""
    spent, baseline_spent = float(fit), 0.0
    for n in range(1, 10**6):
        spent += prompts * own
        baseline_spent += prompts * baseline
        if spent <= baseline_spent:
            return n
    return None


@pytest.mark.parametrize(
    ("fit", "prompts", "own", "baseline"),
    [(248_298, 16, 10.0, 113.1), (298_936, 8, 8.4, 206.0), (1_000, 3, 5.0, 5.5), (50, 1, 2.0, 1.0)],
)
def test_break_even_matches_the_running_totals(fit, prompts, own, baseline):
    """n* = F / (P·(b − c)): the running totals, summed draw by draw, cross at ⌈n*⌉."""
    n = break_even_draws_per_prompt(fit, prompts, own, baseline)
    crossing = cumulative_break_even(fit, prompts, own, baseline)
    if crossing is None:
        assert math.isinf(n) and format_break_even(n) == "never"
    else:
        assert math.ceil(n - 1e-9) == crossing


def test_total_tokens_per_draw_spreads_the_fit():
    # The figure: the main job's fit (248,298 tokens) over 16 prompts × 8 draws.
    assert total_tokens_per_draw(10.0, 248_298, 128) == pytest.approx(10.0 + 1939.828125)
    assert total_tokens_per_draw(10.0, 0, 128) == 10.0
    assert break_even_draws_per_prompt(0, 16, 10.0, 5.0) == 0.0
    with pytest.raises(ValueError, match="draws"):
        total_tokens_per_draw(10.0, 1, 0)


def linear_scan(tv_of, target: float) -> int:
    """The smallest K with TV ≤ target, K = 1, 2, 3, ... one by one."""
    k = 1
    while tv_of(k) > target:
        k += 1
    return k


@pytest.mark.parametrize(
    ("coefficient", "falls"),
    [
        (lambda k: 0.05 - 0.004 / k, True),  # K·TV rising to its limit (the tiny worlds)
        (lambda k: 1.27 * k / (k + 3.0), True),  # rising far from its limit (the stress world)
        (lambda k: 0.05 * (1 + 0.5 * math.sin(k)), False),  # the guesses fail: bisection ends it
    ],
)
def test_smallest_sir_k_matches_a_linear_scan(coefficient, falls):
    """Whatever the shape of K·TV(p_K), the search returns a K that meets the target where
    K − 1 does not, the scan's K when TV falls with K, and asks for few exact laws."""
    tv_of = lambda k: coefficient(k) / k  # noqa: E731
    asked: list[int] = []

    def tv_at(ks):
        asked.extend(ks)
        return {k: tv_of(k) for k in ks}

    known = {k: tv_of(k) for k in (1, 4, 16, 64)}
    targets = [0.9 * tv_of(1), 0.0123, 0.00382, 0.00095, 0.0002]
    found = smallest_sir_ks(tv_at, targets, known)
    for target, (k, tv) in zip(targets, found, strict=True):
        assert tv == tv_of(k) <= target
        assert k == 1 or tv_of(k - 1) > target
        if falls:
            assert k == linear_scan(tv_of, target)
    assert len(set(asked)) < 60  # far fewer exact laws than a scan up to K ≈ 6,000


def test_smallest_sir_k_needs_the_proposal_itself():
    with pytest.raises(ValueError, match="K = 1"):
        smallest_sir_ks(lambda ks: {}, [0.1], {4: 0.1})
    with pytest.raises(ValueError, match="TV 0"):
        smallest_sir_ks(lambda ks: {}, [0.0], {1: 0.1})
