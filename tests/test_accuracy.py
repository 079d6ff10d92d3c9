"""The accuracy estimators of samplers.accuracy against exact enumeration on the tiny world.

Target: the tiny world's α = 0.5 geometric mixture of base and shifted, responses ≤ CAP = 5
symbols (1,365 responses, so Z, KL(q‖p) and E_q|log p − log q| are exact); q: its local product.

Tolerance: every estimator returns a standard error computed from its own sample (R SMC runs,
n draws); each check is ``|estimate − exact| ≤ Z_SIGMAS · SE`` with ``Z_SIGMAS = 4``: the
estimates are means of R or n i.i.d. terms with finite variance (finitely many responses), so
by the central limit theorem a correct estimator fails with two-sided probability ≈ 6e-5.
Each check has a negative control, a deliberately broken estimator that the same tolerance
must reject, so the tolerance is tight enough to mean something:

- the reference averaged as ``log Ẑ`` instead of ``Ẑ`` (biased low by Jensen's inequality);
- KL(q‖p) from draws of q weighted with the log-density of another model (the base policy);
- |Δ log Z| against a reference off by 0.1 nats.
"""

from __future__ import annotations

import pytest
import torch

from gfn_spin.exact import ExactDistribution, divergences, exact_distribution
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.accuracy import (
    Estimate,
    importance_log_z,
    kl_to_target,
    log_z_error,
    reference_log_z,
    smc_reference,
)
from samplers.weighting import logmeanexp

CAP = 5
Z_SIGMAS = 4.0  # Gaussian two-sided tail ≈ 6e-5 (see the module docstring)
DRAWS = 4000


@pytest.fixture(scope="module")
def exact_p(target, prompts) -> list[ExactDistribution]:
    return [exact_distribution(target, p, CAP) for p in prompts]


@pytest.fixture(scope="module")
def exact_q(target, prompts) -> list[ExactDistribution]:
    return [exact_distribution(target.local_product(), p, CAP) for p in prompts]


@pytest.fixture(scope="module")
def local_draws(target, prompts):
    sampler = AncestralSampler(target.local_product(), max_new_tokens=CAP, target=target)
    return sampler.sample(prompts, DRAWS, generator=0)


def exact_log_z(exact_p) -> Estimate:
    value = torch.tensor([e.log_z for e in exact_p], dtype=torch.float64)
    return Estimate(value, torch.zeros_like(value))


def within(estimate: Estimate, exact: torch.Tensor) -> bool:
    return bool(((estimate.value - exact).abs() <= Z_SIGMAS * estimate.se).all())


def test_reference_log_z_matches_enumeration(target, prompts, exact_p):
    exact = exact_log_z(exact_p).value
    sampler = SMCSampler(target, 2, max_new_tokens=CAP)
    log_z_runs = sampler.sample(prompts, 3000, generator=0).stats["log_z_populations"].double()
    reference = reference_log_z(log_z_runs)
    assert within(reference, exact), (reference, exact)
    # Negative control: the same runs averaged in log space are biased low beyond the SE.
    log_space = Estimate(log_z_runs.mean(1), log_z_runs.std(1) / log_z_runs.shape[1] ** 0.5)
    assert not within(log_space, exact), (log_space, exact)


def test_smc_reference_is_reference_log_z_of_smc_runs(target, prompts):
    runs = SMCSampler(target, 4, max_new_tokens=CAP).sample(prompts, 5, generator=3)
    reference = smc_reference(
        target, prompts, num_particles=4, runs=5, max_new_tokens=CAP, generator=3
    )
    expected = reference_log_z(runs.stats["log_z_populations"])
    assert torch.equal(reference.value, expected.value) and torch.equal(reference.se, expected.se)


def test_reference_log_z_refuses_one_run():
    with pytest.raises(ValueError, match="at least 2 runs"):
        reference_log_z(torch.zeros(3, 1))


def test_kl_to_target_matches_enumeration(world, prompts, local_draws, exact_p, exact_q):
    pairs = zip(exact_p, exact_q, strict=True)
    exact = torch.tensor(
        [divergences(p.logprobs, q.logprobs)["kl_qp"] for p, q in pairs], dtype=torch.float64
    )
    log_w = (local_draws.log_target - local_draws.log_q).view(len(prompts), DRAWS)
    estimate = kl_to_target(log_w, exact_log_z(exact_p))
    assert within(estimate, exact), (estimate, exact)
    assert float(estimate.se.max()) < 0.25 * float(exact.min())  # precise enough to mean much
    # Negative control: the same draws weighted with another model's log-density.
    rows = [p for p in prompts for _ in range(DRAWS)]
    wrong_q = world.base.log_prob(rows, local_draws.response_ids, local_draws.lengths)
    broken = kl_to_target(
        (local_draws.log_target - wrong_q).view(len(prompts), DRAWS), exact_log_z(exact_p)
    )
    assert not within(broken, exact), (broken, exact)


def test_log_z_error_matches_enumeration(prompts, local_draws, exact_p, exact_q):
    """With groups of one draw, E|log Ẑ − log Z| = Σ_y q(y) |log p(y) − log q(y)|, exactly."""
    pairs = zip(exact_p, exact_q, strict=True)
    exact = torch.tensor(
        [float((q.logprobs.exp() * (p.logprobs - q.logprobs).abs()).sum()) for p, q in pairs],
        dtype=torch.float64,
    )
    log_w = (local_draws.log_target - local_draws.log_q).view(len(prompts), DRAWS)
    reference = exact_log_z(exact_p)
    estimate = log_z_error(importance_log_z(log_w, 1), reference)
    assert within(estimate, exact), (estimate, exact)
    # Negative control: a reference 0.1 nats off.
    shifted = Estimate(reference.value + 0.1, reference.se)
    assert not within(log_z_error(importance_log_z(log_w, 1), shifted), exact)


def test_importance_log_z_groups_and_mean():
    log_w = torch.log(torch.tensor([[1.0, 3.0, 2.0, 4.0, 9.0]]))
    assert torch.allclose(
        importance_log_z(log_w, 2), torch.log(torch.tensor([[2.0, 3.0]])).double()
    )
    estimate = Estimate(torch.tensor([1.0, 3.0]), torch.tensor([0.3, 0.4]))
    assert estimate.mean() == pytest.approx((2.0, 0.25))
    with pytest.raises(ValueError, match="no group"):
        importance_log_z(log_w, 6)


@pytest.mark.parametrize("weights_from", ["decoding", "scoring"])
def test_sir_reports_each_draws_log_z(target, prompts, weights_from):
    """SIR's per-draw estimates (for log_z_error) average, in linear space, to its log Ẑ."""
    sampler = ImportanceResampler(target, None, 3, max_new_tokens=CAP, weights_from=weights_from)
    stats = sampler.sample(prompts, 4, generator=0).stats
    assert stats["log_z_populations"].shape == (len(prompts), 4)
    assert torch.allclose(logmeanexp(stats["log_z_populations"]), stats["log_z"])
