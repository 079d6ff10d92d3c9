"""Tolerances for statistical tests, derived from the sample size (not tuned to pass)."""

from __future__ import annotations

import math


def tv_noise_bound(support: int, draws: int, failure: float = 1e-3) -> float:
    """Upper bound on TV(empirical, true) that holds with probability ≥ 1 - failure.

    E[TV] ≤ ½·sqrt(K/N) for K categories (Cauchy-Schwarz on Σ sqrt(p(1-p)/N)) and TV is
    (1/N)-bounded-differences, so McDiarmid adds sqrt(log(1/failure) / (2N)).
    """
    return 0.5 * math.sqrt(support / draws) + math.sqrt(math.log(1 / failure) / (2 * draws))


def chi_square_threshold(dof: int, z: float = 4.0) -> float:
    """A χ² critical value by the Wilson-Hilferty approximation at z standard deviations."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def tv_noise_bound_from_probs(probs, draws: int, failure: float = 1e-3) -> float:
    """Like :func:`tv_noise_bound` but from the true probabilities: E[TV] ≤ ½ Σ_i sqrt(p_i/N).

    (E|p̂_i - p_i| ≤ sqrt(p_i(1-p_i)/N) by Jensen.) Much tighter than sqrt(K/N) when most of the
    K responses have tiny probability, as on the tiny world.
    """
    expected = 0.5 * float((probs / draws).sqrt().sum())
    return expected + math.sqrt(math.log(1 / failure) / (2 * draws))


def tv_deviation_bound(draws: int, failure: float = 1e-3) -> float:
    """How far an empirical TV strays below or above its mean, with probability ≥ 1 - failure.

    TV(empirical, p) changes by at most 1/N when one of N draws changes, so McDiarmid gives
    P(|TV - E TV| ≥ t) ≤ 2·exp(-2 N t²); one-sided at ``failure`` this is the value below.
    """
    return math.sqrt(math.log(1 / failure) / (2 * draws))
