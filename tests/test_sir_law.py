"""The exact law of SIR (``gfn_spin.exact.sir_output_law``) against brute force, limits and draws."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gfn_spin import GeometricMixture
from gfn_spin.exact import divergences, exact_distribution, sir_output_law, sir_output_laws
from samplers import ImportanceResampler
from tests.stats import tv_noise_bound_from_probs

RTOL = 1e-8


def _brute_force(q: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """SIR's output law by summing over every K-tuple of candidates (conditional on a draw)."""
    q = q / q.sum()
    w = torch.where(q > 0, g / q, torch.zeros_like(q))
    law = torch.zeros_like(q)
    no_draw = 0.0
    for picks in itertools.product(range(len(q)), repeat=k):
        prob = math.prod(float(q[i]) for i in picks)
        weights = [float(w[i]) for i in picks]
        total = sum(weights)
        if total == 0:
            no_draw += prob
            continue
        for i, wi in zip(picks, weights, strict=True):
            law[i] += prob * wi / total
    return law / (1 - no_draw)


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for size in (3, 4, 5):
        q = torch.rand(size, generator=gen, dtype=torch.float64) + 0.05
        g = torch.rand(size, generator=gen, dtype=torch.float64) * 7 + 0.01
        cases.append((f"positive-{size}", q, g))
    q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    cases.append(("target forbids one", q, torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)))
    cases.append(
        ("proposal misses one", torch.tensor([0.6, 0.0, 0.4]), torch.tensor([1.0, 3.0, 1.0]))
    )
    # Weights spanning 1e-6 .. 1e4: the integral's range in log t is wide.
    q = torch.tensor([0.9, 0.0999, 1e-4, 1e-8], dtype=torch.float64)
    cases.append(("wide weights", q, torch.tensor([1e-6, 0.5, 0.4, 1e-4], dtype=torch.float64)))
    # A weight of 1e-300: its integral is summed in log space (the linear sum underflows).
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    cases.append(("tiny weight", q, torch.tensor([1e-300, 1.0, 2.0], dtype=torch.float64)))
    return cases


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name,q,g", _cases(), ids=[c[0] for c in _cases()])
def test_law_matches_brute_force_over_all_k_tuples(name, q, g, k):
    q, g = q.double(), g.double()
    law = sir_output_law(q.log(), g.log(), k, rtol=RTOL)
    expected = _brute_force(q, g, k)
    got = law.logprobs.exp()
    assert law.precision <= RTOL
    # Each positive entry is within the stated relative precision (plus float64 rounding).
    positive = expected > 0
    relative = (law.logprobs[positive] - expected[positive].log()).abs()
    assert torch.all(relative <= law.precision + 1e-12)
    assert abs(float(got.sum()) - 1.0) <= law.precision + 1e-14
    assert torch.all(got[(q == 0) | (g == 0)] == 0)


def test_one_candidate_is_the_proposal_restricted_to_positive_weight():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    g = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    law = sir_output_law(q.log(), g.log(), 1)
    assert torch.allclose(law.logprobs.exp(), torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64))
    assert law.no_draw_prob == pytest.approx(0.5)


@pytest.mark.parametrize("k", [2, 10, 1000, 10**6])
def test_law_tends_to_the_target_within_the_chi_square_bound(k):
    """TV(p_K, p) ≤ ρ/(K − 1), ρ = E_q[w²] (w normalized to E_q w = 1).

    Derivation: p_K(y)/p(y) = K·E[1/(w + S)] ≥ K/(w + K − 1) by Jensen, so
    TV = Σ p (1 − p_K/p)_+ ≤ Σ p (w − 1)_+/(w + K − 1) ≤ E_p[w]/(K − 1) = ρ/(K − 1).
    """
    gen = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(200, generator=gen, dtype=torch.float64), 0)
    p = torch.softmax(torch.randn(200, generator=gen, dtype=torch.float64) * 1.5, 0)
    law = sir_output_law(q.log(), p.log() + 3.0, k, rtol=RTOL)
    rho = float((p**2 / q).sum())
    tv = divergences(p.log(), law.logprobs)["tv"]
    assert tv <= rho / (k - 1) + law.precision
    # And p_K is not q: at K = 2 it has moved from the proposal toward the target.
    if k == 2:
        assert tv < divergences(p.log(), q.log())["tv"]


def test_several_k_at_once_agree_with_one_at_a_time():
    gen = torch.Generator().manual_seed(2)
    q = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0).log()
    g = torch.randn(50, generator=gen, dtype=torch.float64) * 2
    together = sir_output_laws(q, g, [16, 1, 4], rtol=RTOL)
    for k, law in zip([16, 1, 4], together, strict=True):
        alone = sir_output_law(q, g, k, rtol=RTOL)
        tol = law.precision + alone.precision
        assert torch.allclose(law.logprobs.exp(), alone.logprobs.exp(), rtol=tol, atol=1e-15)


def test_extreme_log_weights_stay_finite():
    """log q down to −800 (w would overflow float64): log space keeps every entry finite."""
    q = torch.tensor([0.0, -1.0, -800.0, -30.0], dtype=torch.float64)
    g = torch.tensor([-2.0, -0.5, -1.0, -700.0], dtype=torch.float64)
    law = sir_output_law(q, g, 8)
    assert torch.isfinite(law.logprobs).all()
    assert abs(float(law.logprobs.exp().sum()) - 1.0) <= law.precision + 1e-14


def test_bad_inputs_fail_clearly():
    q = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="aligned"):
        sir_output_law(q, torch.zeros(4), 2)
    with pytest.raises(ValueError, match="num_candidates"):
        sir_output_law(q, q, 0)
    with pytest.raises(ValueError, match="could never draw"):
        sir_output_law(torch.tensor([0.0, -math.inf]), torch.tensor([-math.inf, 0.0]), 2)
    with pytest.raises(ValueError, match="NaN"):
        sir_output_law(q, torch.tensor([0.0, math.nan, 0.0]), 2)


def test_importance_resampler_draws_follow_the_law(world, prompt):
    """The sampler's draws on the tiny world have the law's histogram, not the target's.

    SIR with K = 2 from π_t toward the α = 0.5 mixture sits far from both π_t and the target,
    so this tells the computed law from either of them.
    """
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    base = exact_distribution(world.base, prompt, cap)
    shifted = exact_distribution(world.shifted, prompt, cap)
    log_g = 0.5 * base.logprobs + 0.5 * shifted.logprobs
    law = sir_output_law(shifted.logprobs, log_g, 2, rtol=RTOL)
    draws = 16000
    samples = ImportanceResampler(target, world.shifted, 2, max_new_tokens=cap).sample(
        [prompt], draws, generator=0
    )
    emp = base.empirical_logprobs(samples.responses()).exp()
    target = torch.softmax(log_g, 0)
    exact = law.logprobs.exp()
    # Bin the 21,845 responses into the law's 30 likeliest and the rest: the binned TV is a lower
    # bound of the TV, and its noise bound with 31 cells is tight enough to tell the laws apart.
    top = exact.argsort(descending=True)[:30]

    def binned(probs: torch.Tensor) -> torch.Tensor:
        return torch.cat([probs[top], (1 - probs[top].sum()).clamp_min(0)[None]])

    def tv(a: torch.Tensor, b: torch.Tensor) -> float:
        return 0.5 * float((binned(a) - binned(b)).abs().sum())

    bound = tv_noise_bound_from_probs(binned(exact), draws)
    assert tv(exact, target) > 2 * bound  # the test can tell the law from the target
    assert tv(exact, shifted.logprobs.exp()) > 2 * bound  # and from the proposal
    assert tv(exact, emp) <= bound
