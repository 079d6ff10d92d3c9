"""Samplers against exact enumeration on the tiny world.

Every statistical tolerance is derived from the sample sizes (see ``tests/stats.py``) and from
exact quantities of the enumerated distributions; the derivation is written next to it.

Cost control: the samplers run on the world's models with a length cap L = 3 (85 responses per
prompt; the stop at L is forced, so the cap path is exercised on many draws), which keeps the
exact references cheap and the empirical-TV noise floor low. The report-sized settings (L = 7)
are in the closing table of issue 3, not in the test suite.
"""

from __future__ import annotations

import math

import pytest
import torch

from gfn_spin import ArithmeticMixture, GeometricMixture, Policy
from gfn_spin.exact import ExactDistribution, divergences, exact_distribution
from samplers import (
    AncestralSampler,
    ArithmeticMixtureSampler,
    ExactSampler,
    ImportanceResampler,
    SMCSampler,
)
from tests.stats import tv_deviation_bound, tv_noise_bound_from_probs

CAP = 3
FAILURE = 1e-3  # probability that a correct sampler fails one bound (McDiarmid / Gaussian)
Z_SIGMAS = 4.0  # Gaussian tail for standard-error tolerances (two-sided p ≈ 6e-5)


def _tv(dist: ExactDistribution, responses: list[tuple[int, ...]]) -> float:
    return divergences(dist.empirical_logprobs(responses), dist.logprobs)["tv"]


def _geometric(world, alpha: float) -> GeometricMixture:
    return GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])


@pytest.fixture(scope="module")
def hard_prompt(world) -> list[int]:
    """The eval prompt where the local product is far from the α = 0.5 target at L = 3.

    There TV(q_loc, target) = 0.32 and ρ = 1 + χ² = 2.07, so SIR/SMC bias at small K/N is
    visible above the noise floor of 600-1000 draws (about 0.08-0.10).
    """
    return world.eval_prompts[1]


def _proposal_stats(target_dist: ExactDistribution, proposal_dist: ExactDistribution):
    """ρ = E_q[(w/Z)²] = Σ p²/q and the first-order SIR bias coefficient ½ E_p|ρ − w/Z|.

    For K candidates the law q_K of a SIR draw is, to first order in 1/K,
    ``q_K(y) = p(y) (1 + (ρ − w(y)/Z) / K)`` (expand E[w/(w + S)] with S the other K − 1
    weights), so ``TV(q_K, p) ≈ ½ E_p|ρ − w/Z| / K``.
    """
    assert target_dist.responses == proposal_dist.responses
    log_ratio = target_dist.logprobs - proposal_dist.logprobs  # log (w/Z)
    rho = float(torch.exp(torch.logsumexp(target_dist.logprobs + log_ratio, 0)))
    p = target_dist.logprobs.exp()
    first_order = 0.5 * float((p * (rho - log_ratio.exp()).abs()).sum())
    return rho, first_order


# -- exact samplers ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ancestral", "arithmetic"])
def test_exact_samplers_match_enumeration(world, prompt, kind):
    if kind == "ancestral":
        sampler = AncestralSampler(world.base, max_new_tokens=CAP)
        density = world.base
        wrong = world.shifted
    else:
        sampler = ArithmeticMixtureSampler(
            [world.base, world.shifted], [0.3, 0.7], max_new_tokens=CAP
        )
        density = ArithmeticMixture([world.base, world.shifted], [0.3, 0.7])
        wrong = world.shifted  # what a sampler that ignored the base component would draw
    dist = exact_distribution(density, prompt, CAP)
    draws = 3000
    samples = sampler.sample([prompt], draws, generator=0)
    # Bound: E[TV] ≤ ½ Σ sqrt(p_i/N) plus McDiarmid at FAILURE.
    bound = tv_noise_bound_from_probs(dist.logprobs.exp(), draws, FAILURE)
    assert divergences(exact_distribution(wrong, prompt, CAP).logprobs, dist.logprobs)["tv"] > bound
    assert _tv(dist, samples.responses()) < bound
    position = dist.index()
    enumerated = dist.logprobs[[position[r] for r in samples.responses()]]
    torch.testing.assert_close(samples.log_q.double(), enumerated, atol=1e-5, rtol=0)


def test_exact_sampler_draws_enumerated_distribution(world, prompt):
    target = _geometric(world, 0.5)
    sampler = ExactSampler(target, CAP)
    dist = exact_distribution(target, prompt, CAP)
    draws = 3000
    samples = sampler.sample([prompt, prompt], draws, generator=0)
    assert samples.stats["log_z"].tolist() == pytest.approx([dist.log_z] * 2, abs=1e-9)
    bound = tv_noise_bound_from_probs(dist.logprobs.exp(), draws, FAILURE)
    for row in range(2):
        mine = [
            r
            for r, i in zip(samples.responses(), samples.prompt_index.tolist(), strict=True)
            if i == row
        ]
        assert _tv(dist, mine) < bound
    scored = target.log_prob([prompt] * len(samples), samples.response_ids, samples.lengths)
    torch.testing.assert_close(samples.log_target.double(), scored.double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(samples.log_q, samples.log_target - dist.log_z, atol=1e-9, rtol=0)
    again = sampler.sample([prompt], 10, generator=1)
    assert again.stats["tokens"] == 0  # the enumeration is cached per prompt


def test_exact_sampler_refuses_large_enumerations_before_model_work(world):
    before = world.base.tokens_evaluated + world.shifted.tokens_evaluated
    with pytest.raises(ValueError, match="enumeration too large"):
        ExactSampler(_geometric(world, 0.5), max_new_tokens=12)
    assert world.base.tokens_evaluated + world.shifted.tokens_evaluated == before


# -- importance resampling and SMC: convergence to the target --------------------------------


@pytest.mark.parametrize("kind", ["sir", "smc"])
def test_tv_to_target_falls_with_candidates_or_particles(world, hard_prompt, kind):
    target = _geometric(world, 0.5)
    proposal = target.local_product()
    target_dist = exact_distribution(target, hard_prompt, CAP)
    proposal_dist = exact_distribution(proposal, hard_prompt, CAP)
    rho, first_order = _proposal_stats(target_dist, proposal_dist)
    tv_proposal = divergences(target_dist.logprobs, proposal_dist.logprobs)["tv"]

    def make(size):
        if kind == "sir":
            return ImportanceResampler(target, None, size, max_new_tokens=CAP)
        return SMCSampler(target, size, max_new_tokens=CAP)

    # K = N = 1 is the proposal itself (one candidate; one particle never resamples).
    small_draws = 3000
    small = make(1).sample([hard_prompt], small_draws, generator=1)
    tv_small = _tv(target_dist, small.responses())
    # Jensen: E[TV(empirical, p)] ≥ TV(q, p); McDiarmid bounds the downward fluctuation.
    assert tv_small > tv_proposal - tv_deviation_bound(small_draws)

    size, draws = 16, 600
    large = make(size).sample([hard_prompt], draws, generator=2)
    tv_large = _tv(target_dist, large.responses())
    # Triangle inequality: TV(emp, p) ≤ TV(emp, q_K) + TV(q_K, p). The first term is the
    # exact-draw noise floor (bound computed from p; q_K is within the margin of p). Margin:
    # twice the first-order bias ½E_p|ρ − w/Z|/K (factor 2 for the O(1/K²) remainder; for SMC,
    # which without resampling is exactly SIR with K = N, we use the same margin since
    # resampling on the local-product weights is meant to lower the bias, not raise it).
    margin = 2 * first_order / size
    bound = tv_noise_bound_from_probs(target_dist.logprobs.exp(), draws, FAILURE) + margin
    assert tv_large < bound, (tv_large, bound)
    # The fall is significant: the bound at K = 16 is under what K = 1 must show.
    assert bound < tv_proposal - tv_deviation_bound(small_draws) < tv_small
    assert tv_large < tv_small

    # log Ẑ. SIR: a mean of M = draws·K weights has relative variance (ρ − 1)/M (ρ − 1 is
    # χ²(p‖q), the relative variance of one weight), so sd(log Ẑ) ≈ sqrt((ρ − 1)/M).
    # SMC: log of the mean of `draws` independent unbiased Ẑ_j, sd ≈ sd(Ẑ_j)/(mean·sqrt(draws)).
    if kind == "sir":
        standard_error = math.sqrt((rho - 1) / (draws * size))
    else:
        ratio = large.stats["log_z_populations"][0].double().exp()
        standard_error = float(ratio.std() / ratio.mean()) / math.sqrt(draws)
    tolerance = Z_SIGMAS * standard_error
    assert abs(float(large.stats["log_z"][0]) - target_dist.log_z) < tolerance
    assert large.log_target is not None and large.log_q is None
    scored = target.log_prob([hard_prompt] * draws, large.response_ids, large.lengths)
    torch.testing.assert_close(large.log_target.double(), scored.double(), atol=1e-4, rtol=0)
    assert large.stats["tokens"] > 0 and 1 <= float(large.stats["ess"][0]) <= size


def test_smc_normalizer_is_unbiased_and_log_normalizer_is_not(world, hard_prompt):
    # A longer cap (5: 1,365 responses) so that several resampling epochs and particles
    # finishing at different lengths enter Ẑ.
    cap = 5
    target = _geometric(world, 0.5)
    exact = exact_distribution(target, hard_prompt, cap)
    # Few particles and resampling at every step (except s_0, where all weights are equal):
    # the regime where a wrong weight or a wrong Ẑ update would show.
    sampler = SMCSampler(target, 4, ess_threshold=1.0, max_new_tokens=cap)
    populations = 2000
    samples = sampler.sample([hard_prompt], populations, generator=3)
    # Ẑ is a product over resampling epochs: a mean above 1 resampling per population means
    # some population resampled at least twice (pigeonhole), so the check below covers the
    # product and not a single ratio. A population resamples at most once per step before
    # the forced stop at s_L: cap − 1 times.
    resamples = float(samples.stats["resamples"][0])
    assert 1 < resamples <= cap - 1
    # Control: the same sampler that never resamples reports none.
    never = SMCSampler(target, 4, ess_threshold=0.0, max_new_tokens=cap)
    assert float(never.sample([hard_prompt], 64, generator=3).stats["resamples"][0]) == 0
    log_z = samples.stats["log_z_populations"][0].double()  # independent runs
    ratio = (log_z - exact.log_z).exp()  # Ẑ_j / Z
    standard_error = float(ratio.std()) / math.sqrt(populations)
    assert abs(float(ratio.mean()) - 1) < Z_SIGMAS * standard_error, (ratio.mean(), standard_error)
    # log Ẑ is biased low by about Var(Ẑ/Z)/2 (Jensen); with these counts that is many SEs.
    log_standard_error = float(log_z.std()) / math.sqrt(populations)
    assert float(log_z.mean()) < exact.log_z - Z_SIGMAS * log_standard_error
    assert float(samples.stats["log_z"][0]) == pytest.approx(
        math.log(float(ratio.mean())) + exact.log_z, abs=1e-9
    )


def test_smc_with_another_proposal_and_its_reduction_to_local_product(world, hard_prompt):
    target = _geometric(world, 0.95)
    exact = exact_distribution(target, hard_prompt, CAP)
    # Another autoregressive proposal (π_t): weights from the target's step scores.
    sampler = SMCSampler(target, 8, proposal=world.shifted, max_new_tokens=CAP)
    assert sampler.weighting == "general"
    populations = 400
    samples = sampler.sample([hard_prompt], populations, generator=4)
    ratio = (samples.stats["log_z_populations"][0].double() - exact.log_z).exp()
    standard_error = float(ratio.std()) / math.sqrt(populations)
    assert abs(float(ratio.mean()) - 1) < Z_SIGMAS * standard_error + 1e-6
    scored = target.log_prob([hard_prompt] * populations, samples.response_ids, samples.lengths)
    torch.testing.assert_close(samples.log_target.double(), scored.double(), atol=1e-4, rtol=0)

    # The general rule log g(v|s) − log q(v|s) with q = q_loc is log Z_loc(s): same draws and Ẑ.
    fast = SMCSampler(target, 8, max_new_tokens=CAP)
    general = SMCSampler(target, 8, max_new_tokens=CAP, weighting="general")
    assert fast.weighting == "local_product"
    a = fast.sample([hard_prompt], 50, generator=5)
    b = general.sample([hard_prompt], 50, generator=5)
    assert a.responses() == b.responses()
    torch.testing.assert_close(
        a.stats["log_z_populations"], b.stats["log_z_populations"], atol=1e-4, rtol=0
    )


def test_sir_with_target_as_proposal_has_full_ess(world, prompt):
    target = ArithmeticMixture([world.base, world.shifted], [0.5, 0.5])
    sampler = ImportanceResampler(target, target, 8, max_new_tokens=CAP)
    samples = sampler.sample([prompt, prompt], 5, generator=0)
    torch.testing.assert_close(samples.stats["ess"], torch.full((2,), 8.0, dtype=torch.float64))
    torch.testing.assert_close(
        samples.stats["log_z"], torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert ImportanceResampler(target, None, 2, max_new_tokens=CAP).proposal is target


# -- zero target density, determinism, bad input ----------------------------------------------


def _restricted(world, symbols: str) -> Policy:
    """The base model renormalized on a few symbols (zero density on responses with others)."""
    ids = world.tokenizer.convert_tokens_to_ids(list(symbols))
    return Policy(world.base.model, world.tokenizer, allowed_token_ids=ids)


def test_minus_infinite_weights_are_legal(world, prompt):
    restricted = _restricted(world, "ab")
    target = GeometricMixture([restricted, world.shifted], [0.5, 0.5])
    allowed = set(world.tokenizer.convert_tokens_to_ids(["a", "b"]))
    # Full support, and half its mass on responses the target allows: a block of 16 candidates
    # has some -inf weights but is all -inf with probability ≤ 2^-16.
    proposal = ArithmeticMixture([restricted, world.shifted], [0.5, 0.5])
    for sampler in (
        ImportanceResampler(target, proposal, 16, max_new_tokens=CAP),
        SMCSampler(target, 16, proposal=proposal, max_new_tokens=CAP),
    ):
        samples = sampler.sample([prompt], 40, generator=0)
        assert all(set(r) <= allowed for r in samples.responses())
        assert torch.isfinite(samples.log_target).all()
        assert torch.isfinite(samples.stats["log_z"]).all()
        assert torch.isfinite(samples.stats["ess"]).all()


def test_all_zero_weights_raise_a_clear_error(world, prompt):
    # The target allows only "a", the proposal only "b": only the empty response survives.
    target, proposal = _restricted(world, "a"), _restricted(world, "b")
    with pytest.raises(RuntimeError, match="zero target density"):
        ImportanceResampler(target, proposal, 1, max_new_tokens=CAP).sample(
            [prompt], 100, generator=0
        )
    with pytest.raises(RuntimeError, match="all weights zero"):
        SMCSampler(target, 1, proposal=proposal, max_new_tokens=CAP).sample(
            [prompt], 100, generator=0
        )


@pytest.mark.parametrize("kind", ["sir", "smc", "exact"])
def test_same_seed_same_samples(world, prompt, kind):
    target = _geometric(world, 0.5)
    sampler = {
        "sir": lambda: ImportanceResampler(target, None, 4, max_new_tokens=CAP),
        "smc": lambda: SMCSampler(target, 4, ess_threshold=1.0, max_new_tokens=CAP),
        "exact": lambda: ExactSampler(target, CAP),
    }[kind]()
    first = sampler.sample([prompt, world.eval_prompts[2]], 30, generator=11)
    second = sampler.sample(
        [prompt, world.eval_prompts[2]], 30, generator=torch.Generator().manual_seed(11)
    )
    assert first.responses() == second.responses()
    assert first.prompt_index.tolist() == [0] * 30 + [1] * 30
    assert len(first.texts) == 60
    other = sampler.sample([prompt, world.eval_prompts[2]], 30, generator=12)
    assert other.responses() != first.responses()


def test_bad_arguments_are_named(world, prompt):
    target = _geometric(world, 0.5)
    with pytest.raises(ValueError, match="num_candidates"):
        ImportanceResampler(target, None, 0, max_new_tokens=CAP)
    with pytest.raises(ValueError, match="num_particles"):
        SMCSampler(target, 0, max_new_tokens=CAP)
    for threshold in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ess_threshold"):
            SMCSampler(target, 4, ess_threshold=threshold, max_new_tokens=CAP)
    with pytest.raises(ValueError, match="proposal"):
        ImportanceResampler(target, target, 4, max_new_tokens=CAP)
    with pytest.raises(ValueError, match="proposal"):
        SMCSampler(target, 4, proposal=target, max_new_tokens=CAP)
    before = world.base.tokens_evaluated
    for sampler in (
        ImportanceResampler(target, None, 4, max_new_tokens=CAP),
        SMCSampler(target, 4, max_new_tokens=CAP),
        ExactSampler(target, CAP),
    ):
        with pytest.raises(ValueError, match="prompts"):
            sampler.sample([], 1)
        with pytest.raises(ValueError, match=r"prompts\[1\]"):
            sampler.sample([prompt, []], 1)
        with pytest.raises(ValueError, match="num_samples"):
            sampler.sample([prompt], 0)
    assert world.base.tokens_evaluated == before


# -- the one contract: typed stats, strategy options -------------------------------------------


def test_exact_log_q_gives_importance_stats_computed_by_hand(world, prompt):
    """A sampler with an exact log_q and a target reports, per prompt, the absolute ESS
    (Σw)²/Σw² of its draws' weights, its fraction, log mean w and mean log w: here recomputed
    in plain Python floats from log_target and log_q."""
    target = _geometric(world, 0.5)
    draws = 12
    samples = AncestralSampler(world.shifted, max_new_tokens=CAP, target=target).sample(
        [prompt, world.eval_prompts[0]], draws, generator=3
    )
    log_w = (samples.log_target - samples.log_q).double().view(2, draws).tolist()
    for p, row in enumerate(log_w):
        w = [math.exp(v) for v in row]
        ess = sum(w) ** 2 / sum(v * v for v in w)
        assert float(samples.stats["ess"][p]) == pytest.approx(ess, rel=1e-9)
        assert float(samples.stats.ess_fraction[p]) == pytest.approx(ess / draws, rel=1e-9)
        assert float(samples.stats["log_z"][p]) == pytest.approx(math.log(sum(w) / draws), rel=1e-9)
        assert float(samples.stats.elbo[p]) == pytest.approx(sum(row) / draws, rel=1e-9)
    assert samples.stats["tokens"] == samples.stats.tokens > 0
    assert set(samples.stats) >= {"ess", "log_z", "tokens", "seconds"}
    plain = AncestralSampler(world.base, max_new_tokens=CAP).sample([prompt], 6, generator=1)
    assert plain.stats["ess"] is None  # no target given: nothing to weigh against
    # Equal weights (the proposal is the target): every draw counts, ESS = the number of draws.
    same = AncestralSampler(world.base, max_new_tokens=CAP, target=world.base)
    stats = same.sample([prompt], 6, generator=1).stats
    # log w is 0 up to float32 rounding of sampling vs scoring (≤ L+1 terms of |log p| < 20).
    assert float(stats["ess"][0]) == pytest.approx(6.0, abs=1e-6)
    assert float(stats.log_z[0]) == pytest.approx(0.0, abs=(CAP + 1) * 20 * 2**-23)
    with pytest.raises(KeyError):
        stats["not_a_stat"]


def test_a_strategy_that_does_not_apply_is_refused(world):
    target = _geometric(world, 0.5)
    with pytest.raises(ValueError, match=r"weighting='local_product' does not apply.*'general'"):
        SMCSampler(target, 4, proposal=world.shifted, max_new_tokens=CAP, weighting="local_product")
    with pytest.raises(ValueError, match="weights_from='decoding' must be"):
        ImportanceResampler(target, world.shifted, 4, max_new_tokens=CAP, weights_from="decoding")
    assert SMCSampler(target, 4, max_new_tokens=CAP, weighting="general").weighting == "general"
    assert ImportanceResampler(target, world.shifted, 4, max_new_tokens=CAP).weights_from == (
        "scoring"
    )
