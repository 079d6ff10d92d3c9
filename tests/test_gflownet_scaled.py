"""The scaled-world GFlowNet bench measures what enumeration says, on the small variant.

``bench.gflownet_scaled`` reads a fitted GFlowNet's exact KL(q‖p) and population ESS from the
dynamic program over two-token contexts, and its ELBO, Monte Carlo KL and empty fraction from
its draws. Here the GFlowNet is fitted briefly on the small world (5 symbols, cap 5: 3,906
responses) and every figure is compared with :func:`gfn_spin.exact.exact_distribution` of the
policy and of the target, which knows nothing about contexts.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.gflownet_scaled import draw_report, exact_policy_report
from gfn_spin.exact import divergences, exact_distribution
from samplers import GFlowNetSampler
from samplers.gflownet import GFlowNetConfig
from worlds.scaled import ScaledWorld, ScaledWorldConfig, build_world

ALPHA, PAIR = 0.5, "iterate"
DRAWS = 256


def fit_config(world: ScaledWorld, steps: int) -> GFlowNetConfig:
    return GFlowNetConfig(
        max_new_tokens=world.max_new_tokens, steps=steps, prompts_per_step=8, warmup_steps=2
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ScaledWorld:
    return build_world(ScaledWorldConfig.small(), cache_dir=tmp_path_factory.mktemp("scaled"))


@pytest.fixture(scope="module")
def fitted(world: ScaledWorld) -> GFlowNetSampler:
    torch.manual_seed(0)
    gfn = GFlowNetSampler(world.mixture(ALPHA, PAIR), world.load_policy(PAIR), fit_config(world, 8))
    gfn.fit(world.train_prompts, progress=False)
    return gfn


def test_chunked_fit_follows_the_whole_fit(world: ScaledWorld):
    """The curve's chunks (fit to 5, then to 8 steps) end at the weights of one 8-step fit."""
    mixture = world.mixture(ALPHA, PAIR)
    whole = GFlowNetSampler(mixture, world.load_policy(PAIR), fit_config(world, 8))
    whole.fit(world.train_prompts, progress=False)
    chunked = GFlowNetSampler(mixture, world.load_policy(PAIR), fit_config(world, 8))
    chunked.fit(world.train_prompts, steps=5, progress=False, schedule_steps=8)
    chunked.fit(world.train_prompts, steps=8, progress=False, schedule_steps=8)
    with pytest.raises(ValueError, match="schedule_steps=8 must be at least"):
        chunked.fit(world.train_prompts, steps=9, progress=False, schedule_steps=8)
    for a, b in zip(whole.head.parameters(), chunked.head.parameters(), strict=True):
        assert torch.equal(a, b)
    # Plain chunks would compress the cosine schedule: the check above can fail.
    plain = GFlowNetSampler(mixture, world.load_policy(PAIR), fit_config(world, 8))
    plain.fit(world.train_prompts, steps=5, progress=False)
    plain.fit(world.train_prompts, steps=8, progress=False)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(whole.head.parameters(), plain.head.parameters(), strict=True)
    )


def test_exact_and_monte_carlo_figures_match_enumeration(world: ScaledWorld, fitted):
    target = world.target(ALPHA, PAIR)
    mixture = world.mixture(ALPHA, PAIR)
    prompts = world.eval_prompts
    kls, esss, empties = [], [], []
    for prompt in prompts:
        p = exact_distribution(mixture, prompt, world.max_new_tokens)
        q = exact_distribution(fitted.policy, prompt, world.max_new_tokens)
        assert q.responses == p.responses
        kls.append(divergences(q.logprobs, p.logprobs)["kl_qp"])
        # Population ESS/N = Z² / E_q[w²] = 1 / Σ p²/q.
        esss.append(float(torch.exp(-torch.logsumexp(2 * p.logprobs - q.logprobs, 0))))
        empties.append(float(q.logprobs[q.responses.index(())].exp()))
    kl, ess, empty = (sum(v) / len(v) for v in (kls, esss, empties))
    assert kl > 1e-4  # the fitted twist is not the target: the comparison is not trivial

    samples = fitted.sample(prompts, DRAWS, generator=0)
    exact = exact_policy_report(target, fitted.policy, world.symbol_ids, prompts, samples)
    # Float32 step scores (a few ulps of the largest |score| each, over ≤ L+1 steps, on both
    # sides) bound each log-density's error; KL and log ESS move by at most a few of those.
    scale = max(
        1.0, float(target.tables.logprobs[torch.isfinite(target.tables.logprobs)].abs().max())
    )
    rounding = 2 * (world.max_new_tokens + 1) * 8 * torch.finfo(torch.float32).eps * scale
    assert exact["bounded_context_gap"] <= rounding
    assert exact["kl_qp"] == pytest.approx(kl, abs=4 * rounding)
    assert exact["ess_fraction"] == pytest.approx(ess, rel=4 * rounding)

    # Monte Carlo figures: within 5 standard errors of the enumerated values.
    mc = draw_report(target, prompts, samples)
    assert abs(mc["kl_qp_mc"] - kl) <= 5 * mc["kl_qp_stderr"]
    log_z = float(target.log_z(prompts).mean())
    assert mc["elbo"] == pytest.approx(log_z - mc["kl_qp_mc"], abs=1e-9)
    empty_stderr = math.sqrt(empty * (1 - empty) / (DRAWS * len(prompts)))
    assert abs(mc["empty_fraction"] - empty) <= 5 * empty_stderr
