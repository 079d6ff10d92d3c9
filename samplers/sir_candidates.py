"""How many SIR candidates a requested accuracy needs, from a pilot's importance weights.

For :func:`samplers.choose_sampler` and whoever sizes SIR by hand: given n weights ``w = p̃/q``
of proposal draws per prompt, the K whose SIR law has a mean exact TV to the target at most a
requested accuracy, by one of two rules (:data:`Rule`):

- ``"estimate"``: :func:`sir_candidates_estimated`, the smallest K whose plug-in estimate of
  SIR's exact TV (:func:`sir_tv_estimates`, with a grouped jackknife) meets the accuracy;
- ``"bound"``: :func:`sir_candidates_for`, from the pilot's ``χ² = n/ESS − 1`` through the
  bound below.

**The bound rule for K** (:func:`sir_tv_bound`). SIR's output law is ``p_K(y) = K·q(y)·w(y)·
E[1/(w(y) + S)]`` (``gfn_spin.exact.sir_output_law``), ``w = p/q`` with ``E_q[w] = 1`` and ``S``
the sum of K − 1 weights. Expanding ``1/(w + S)`` around ``S ≈ K − 1`` gives
``p_K(y)/p(y) = 1 + (m − w(y))/K + O(K⁻²)`` with ``m = E_p[w] = 1 + χ²``, so
``TV(p_K, p) ≈ c/K`` with ``c = ½·E_p|w − m| = E_q[w·(m − w)⁺]``. From χ² alone:

- ``E_q[w·(m − w)⁺] ≤ m·E_q[(m − w)⁺] = (m/2)·(E_q|w − m| + χ²) ≤ (m/2)·(√(χ²·m) + χ²)``
  (Cauchy-Schwarz, ``E_q(w − m)² = χ²·m``): ``≈ ½·√χ²`` for a good proposal;
- ``w·(m − w) ≤ m²/4`` and ``w·(m − w)⁺ ≤ m·w``: ``c ≤ m·min(1, m/4)`` for a poor one.

The rule takes ``K = ⌈mean_prompts c(χ²) / accuracy⌉``, and K = 1 when the local product's own
bound ``½·mean √χ²`` (``E_q|w − 1| ≤ √χ²``) meets the accuracy. On the tiny worlds ``K·TV(p_K)``
rises toward ``c`` as K grows, so ``c/K`` bounds the exact TV at every K there. K is at most
twice the smallest K that meets the accuracy once that K is in the first-order regime (K ≥ 16
there), and up to 4× where ``K·TV(p_K)`` is still far below ``c`` (a few candidates on the
stress world at α = 0.5); ``tests/test_choice.py`` checks both rules against SIR's exact law. The
pilot's χ² comes from
``pilot_draws`` weights per prompt: where weights are heavy-tailed it is an underestimate, and
so is K; raise ``pilot_draws`` there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from gfn_spin.exact import sir_output_laws
from samplers.weighting import ess_fraction

#: How a pilot's weights predict SIR's TV (module docstring).
Rule = Literal["estimate", "bound"]


def sir_tv_bound(chi_square: torch.Tensor) -> torch.Tensor:
    """Per prompt, the bound ``c(χ²)`` on ``lim K·TV(p_K, p)`` of SIR (module docstring).

    ``chi_square``: ``[P]`` ``χ²(target‖proposal) = 1/(ESS/N) − 1``. Returns ``[P]`` float64.
    """
    chi = chi_square.double().clamp(min=0.0)
    m = 1.0 + chi
    return torch.minimum(0.5 * m * (torch.sqrt(chi * m) + chi), m * torch.clamp(m / 4, max=1.0))


def sir_candidates_for(ess_fraction: torch.Tensor, accuracy: float) -> tuple[int, float]:
    """The K of SIR whose mean TV over prompts the rule bounds by ``accuracy``, and that bound.

    ``ess_fraction``: ``[P]`` ESS/N of the proposal's importance weights, one per prompt. K = 1
    (the proposal alone) when ``½·mean √χ²`` meets ``accuracy``; otherwise
    ``⌈mean c(χ²) / accuracy⌉`` (:func:`sir_tv_bound`).
    """
    _check_accuracy(accuracy)
    if ess_fraction.numel() == 0 or bool((ess_fraction <= 0).any()):
        raise ValueError("ess_fraction must be positive for every prompt (no pilot weight was)")
    chi = 1.0 / ess_fraction.double() - 1.0
    alone = _root_chi_bound(chi)
    if alone <= accuracy:
        return 1, alone
    coefficient = float(sir_tv_bound(chi).mean())
    k = max(2, math.ceil(coefficient / accuracy))
    return k, coefficient / k


def sir_tv_estimates(log_weights: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Estimates of SIR's mean exact TV over prompts, for each K of ``ks``, from a pilot.

    ``log_weights``: ``[P, n]`` log importance weights ``log G̃ − log q`` of n ≥ 2 independent
    proposal draws per prompt (only ratios within a prompt matter). Per prompt, the plug-in
    estimate is the exact TV between SIR's output law and the target
    (``gfn_spin.exact.sir_output_laws``) when the proposal is the empirical law of the n draws
    (1/n each) and the target is that law reweighted by w; at K = 1 it is
    ``½·Σ_i |w_i/Σ_j w_j − 1/n|``, the plug-in of ``TV(q, p) = ½·E_q|w − 1|``. The plug-in
    reads low by O(1/n) (n draws miss the rare large weights: 10-35% of the TV at n = 16 on the
    tiny world's α = 0.5 pair), so the estimate is its grouped jackknife: with the n draws in g
    equal groups (g = 4 when n is a multiple of 4, else 3 or 2, else n),
    ``g·θ − (g − 1)·mean_groups θ₋group``, clipped at 0, which cancels the 1/n term at g + 1
    plug-ins per prompt (there: 2-13% low).
    """
    log_w = log_weights.double()
    if log_w.dim() != 2 or log_w.shape[1] < 2:
        raise ValueError(f"log_weights must be [P, n] with n >= 2, got {tuple(log_w.shape)}")
    prompts, n = log_w.shape
    groups = next((g for g in (4, 3, 2) if n % g == 0), n)
    member = torch.arange(n) % groups
    # [P·g, n − n/g]: each prompt's draws without one group, grouped by prompt.
    left_out = torch.stack([log_w[:, member != g] for g in range(groups)], 1).flatten(0, 1)
    whole = _plug_in_tv(log_w, ks)
    left = _plug_in_tv(left_out, ks).view(prompts, groups, len(ks)).mean(1)
    jackknife = (groups * whole - (groups - 1) * left).clamp(min=0.0).mean(0)
    return {k: float(value) for k, value in zip(ks, jackknife, strict=True)}


def _plug_in_tv(log_weights: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """``[R, len(ks)]``: per row of ``[R, m]`` log-weights, the plug-in TV of SIR at each K."""
    m = log_weights.shape[1]
    uniform = torch.full((m,), -math.log(m), dtype=torch.float64)
    rows = []
    for row in log_weights:  # one m-point enumeration per pilot row, not per position
        target = torch.softmax(row, 0)
        laws = sir_output_laws(uniform, uniform + row, ks)
        rows.append([0.5 * float((law.logprobs.exp() - target).abs().sum()) for law in laws])
    return torch.tensor(rows, dtype=torch.float64)


def sir_candidates_estimated(
    log_weights: torch.Tensor, accuracy: float, max_candidates: int = 1 << 16
) -> tuple[int, float]:
    """The smallest K whose :func:`sir_tv_estimates` estimate meets ``accuracy``, and that
    estimate: doubling from K = 1, then bisection (SIR's TV falls as K grows). ``[P, n]``
    ``log_weights`` as there; K is capped at ``max_candidates``."""
    _check_accuracy(accuracy)

    def estimate(k: int) -> float:
        return sir_tv_estimates(log_weights, [k])[k]

    low, high, at_high = 0, 1, estimate(1)
    while at_high > accuracy and high < max_candidates:
        low, high = high, min(2 * high, max_candidates)
        at_high = estimate(high)
    while high - low > 1:  # the estimate at low is above the accuracy (or low = 0)
        middle = (low + high) // 2
        at_middle = estimate(middle)
        if at_middle <= accuracy:
            high, at_high = middle, at_middle
        else:
            low = middle
    return high, at_high


def candidates_for(log_weights: torch.Tensor, accuracy: float, rule: Rule) -> tuple[int, float]:
    """SIR's K for ``accuracy`` from a pilot's ``[P, n]`` ``log_weights``, and its predicted
    mean TV: by :func:`sir_candidates_estimated` (``rule="estimate"``) or by the χ² bound of
    :func:`sir_candidates_for` (``rule="bound"``)."""
    if rule == "estimate":
        return sir_candidates_estimated(log_weights, accuracy)
    if rule == "bound":
        return sir_candidates_for(ess_fraction(log_weights), accuracy)
    raise ValueError(f"rule={rule!r} must be 'estimate' or 'bound'")


def proposal_tv(log_weights: torch.Tensor, rule: Rule) -> float:
    """The predicted mean TV of the proposal's own draws (K = 1) from a pilot's ``[P, n]``
    ``log_weights``: the plug-in ``½·E_q|w − 1|`` (``"estimate"``) or ``½·√χ²`` (``"bound"``)."""
    if rule == "estimate":
        return sir_tv_estimates(log_weights, [1])[1]
    return _root_chi_bound(1.0 / ess_fraction(log_weights) - 1.0)


def _root_chi_bound(chi_square: torch.Tensor) -> float:
    """``½·mean √χ²`` over prompts: the bound on the proposal's own TV (``E_q|w − 1| ≤ √χ²``)."""
    return 0.5 * float(chi_square.clamp(min=0.0).sqrt().mean())


def _check_accuracy(accuracy: float) -> None:
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy={accuracy} must be in (0, 1): a mean TV to reach")
