"""The sampler choice (samplers.choice): SIR's K rule against SIR's exact law, and the decisions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experiments.evaluation import smallest_sir_ks
from gfn_spin.exact import divergences, exact_distribution, sir_output_laws
from gfn_spin.mixtures import GeometricMixture
from samplers import GFlowNetSampler, ImportanceResampler
from samplers.choice import choose_sampler
from samplers.gflownet import GFlowNetConfig
from samplers.sir_candidates import (
    candidates_for,
    sir_candidates_estimated,
    sir_candidates_for,
    sir_tv_bound,
    sir_tv_estimates,
)
from selfplay import AlphaSpinConfig
from selfplay.config import derive_seed
from selfplay.opponents import opponent_sampler


def first_order_coefficient(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``lim K·TV(p_K, p) = E_q[w·(m − w)⁺]``, ``m = E_q[w²]``, summed over an explicit support."""
    m = (q * w * w).sum()
    return (q * w * (m - w).clamp(min=0)).sum()


def test_sir_tv_bound_holds_on_random_supports():
    """c(χ²) bounds the first-order coefficient computed term by term, for proposals from
    nearly exact to heavy-tailed (log-weights of scale 0.05 to 3)."""
    generator = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.3, 1.0, 3.0):
        for _ in range(50):
            q = torch.rand(200, generator=generator, dtype=torch.float64) + 0.01
            q /= q.sum()
            w = torch.exp(scale * torch.randn(200, generator=generator, dtype=torch.float64))
            w /= (q * w).sum()  # E_q[w] = 1
            chi = (q * w * w).sum() - 1
            assert first_order_coefficient(q, w) <= sir_tv_bound(chi[None])[0] * (1 + 1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.95])
def test_sir_rule_meets_the_accuracy_on_exact_sir_laws(world, alpha):
    """From the exact χ² of the local product on two eval prompts, the rule's K has an exact
    mean TV at most the accuracy. It wastes candidates by the ratio of the bound c(χ²) to the
    exact K·TV(p_K) at the smallest K that meets the accuracy: at most 2x once that K is in the
    first-order regime (the tightest accuracy, K ≥ 16 here), at most 4x where K·TV(p_K) is
    still far below its limit (few candidates on the stress world at α = 0.5)."""
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    cap = world.max_new_tokens
    pairs = [
        (
            exact_distribution(target, p, cap).logprobs,
            exact_distribution(target.local_product(), p, cap).logprobs,
        )
        for p in world.eval_prompts[:2]
    ]
    ess = torch.stack([torch.exp(-torch.logsumexp(2 * p - q, 0)) for p, q in pairs])

    def tv_at(ks):
        total = dict.fromkeys(ks, 0.0)
        for p, q in pairs:
            for k, law in zip(ks, sir_output_laws(q, p, ks, rtol=1e-6), strict=True):
                total[k] += divergences(p, law.logprobs)["tv"] / len(pairs)
        return total

    known = tv_at([1, 4, 16, 64])
    accuracies = [0.5 * known[1], 0.1 * known[1], 0.02 * known[1]]
    smallest = smallest_sir_ks(tv_at, accuracies, known)
    for accuracy, (k_min, _) in zip(accuracies, smallest, strict=True):
        k, bound = sir_candidates_for(ess, accuracy)
        assert bound <= accuracy
        assert tv_at([k])[k] <= accuracy
        assert k_min <= k <= (2 if accuracy == accuracies[-1] else 4) * k_min


@pytest.fixture(scope="module")
def target(world):
    return GeometricMixture([world.base, world.shifted], [0.05, 0.95])


@pytest.mark.parametrize("rule", ["estimate", "bound"])
def test_choose_sampler_takes_the_local_product_or_the_rules_sir(world, target, rule):
    prompts = world.eval_prompts[:4]
    cap = world.max_new_tokens
    common = {"draws_per_prompt": 2, "max_new_tokens": cap, "rule": rule, "generator": 0}
    loose = choose_sampler(target, prompts, accuracy=0.5, **common)
    assert loose.chosen.name == "local product" and isinstance(loose.sampler, ImportanceResampler)
    assert loose.sampler.num_candidates == 1 and loose.sampler.weights_from == "decoding"
    tight = choose_sampler(target, prompts, accuracy=0.002, **common)
    k, predicted = candidates_for(tight.pilot_log_weights, 0.002, rule)
    assert k > 1 and tight.chosen.name == f"SIR K={k}" and tight.chosen.predicted_tv == predicted
    assert isinstance(tight.sampler, ImportanceResampler) and tight.sampler.num_candidates == k
    assert tight.chosen.fit_tokens == 0
    assert tight.chosen.total_tokens_per_draw == tight.chosen.tokens_per_draw > 0
    assert tight.pilot_tokens > 0 and len(tight.options) == 1
    # The pilot grew from 16 weights per prompt, doubling while K was above half of them.
    n = tight.pilot_log_weights.shape[1]
    assert loose.pilot_log_weights.shape == (4, 16) and n in (32, 64, 128, 256)
    assert 2 * k <= n or n == 256
    assert 2 * candidates_for(tight.pilot_log_weights[:, : n // 2], 0.002, rule)[0] > n // 2


@pytest.mark.parametrize("alpha", [0.5, 0.95])
def test_sir_tv_estimates_converge_to_sir_exact_laws(world, alpha):
    """The pilot's estimate from n = 16 weights of local-product draws (choose_sampler's
    default), against the exact TV of SIR's law (both enumerated) at K = 1, 2, 4, 16. Drawn
    from the enumerated local product: R = 50 pilots on each of two eval prompts; the mean
    estimate must lie within 4 standard errors (over the R pilots) of the exact TV. The
    grouped jackknife leaves a bias of O(1/n²), measured at most 1.5 of those SEs here; the
    plain plug-in (no jackknife) is 7 SEs low at K = 16, α = 0.5, and fails."""
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    cap, ks, n, runs = world.max_new_tokens, [1, 2, 4, 16], 16, 50
    pairs = [
        (exact_distribution(target, p, cap), exact_distribution(target.local_product(), p, cap))
        for p in world.eval_prompts[:2]
    ]
    exact = dict.fromkeys(ks, 0.0)
    for p, q in pairs:
        for k, law in zip(ks, sir_output_laws(q.logprobs, p.logprobs + p.log_z, ks), strict=True):
            exact[k] += divergences(p.logprobs, law.logprobs)["tv"] / len(pairs)
    generator = torch.Generator().manual_seed(0)
    estimates = torch.tensor(
        [
            list(
                sir_tv_estimates(
                    torch.stack(
                        [
                            (p.logprobs - q.logprobs)[
                                torch.multinomial(q.logprobs.exp(), n, True, generator=generator)
                            ]
                            for p, q in pairs
                        ]
                    ),
                    ks,
                ).values()
            )
            for _ in range(runs)
        ],
        dtype=torch.float64,
    )
    mean, se = estimates.mean(0), estimates.std(0) / runs**0.5
    for j, k in enumerate(ks):
        assert abs(float(mean[j]) - exact[k]) <= 4 * float(se[j]), (k, float(mean[j]), exact[k])


def test_sir_candidates_estimated_is_the_smallest_k_meeting_the_estimate():
    """Doubling and bisection return the smallest K whose estimate meets the accuracy: checked
    against the estimate at every K up to it (a double loop)."""
    log_weights = torch.randn(
        3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    for accuracy in (0.3, 0.1, 0.03):
        k, estimate = sir_candidates_estimated(log_weights, accuracy)
        every = sir_tv_estimates(log_weights, list(range(1, k + 1)))
        assert estimate == pytest.approx(every[k]) and every[k] <= accuracy
        assert all(every[j] > accuracy for j in range(1, k))


@pytest.mark.parametrize("weights_from", ["decoding", "scoring"])
def test_sir_reports_every_candidates_log_weight(world, target, weights_from):
    """stats.log_weights holds each draw's K candidate weights: the chosen draw's own
    log G̃ − log q is among them (its log q from the local product, teacher-forced; float32
    rounding of a sum over at most 7 tokens stays below 1e-4)."""
    prompts, cap = world.eval_prompts[:2], world.max_new_tokens
    sampler = ImportanceResampler(target, None, 4, max_new_tokens=cap, weights_from=weights_from)
    samples = sampler.sample(prompts, 3, generator=0)
    assert samples.stats.log_weights.shape == (2, 3, 4)
    log_q = target.local_product().log_prob(
        [prompts[i] for i in samples.prompt_index.tolist()], samples.response_ids, samples.lengths
    )
    chosen = (samples.log_target - log_q).double().view(2, 3, 1)
    assert bool(((samples.stats.log_weights - chosen).abs().min(-1).values < 1e-4).all())


def test_choose_sampler_fits_a_gflownet_only_when_sir_is_not_enough(world, target):
    """The fit runs only when SIR needs more than max_candidates; the GFlowNet wins only when
    its total, fit spread over the draws, is the smallest among options meeting the accuracy."""
    prompts = world.eval_prompts[:4]
    cap = world.max_new_tokens
    fits = []

    def fit(fit_tokens):
        def fitted():
            gfn = GFlowNetSampler(target, world.shifted, max_new_tokens=cap, steps=2, seed=0)
            gfn.fit(prompts, progress=False)
            fits.append(fit_tokens)
            return gfn, fit_tokens

        return fitted

    common = {"accuracy": 0.002, "max_new_tokens": cap, "generator": 0}
    enough = choose_sampler(target, prompts, draws_per_prompt=2, fit_gflownet=fit(1), **common)
    assert fits == [] and enough.chosen.name.startswith("SIR K=")
    k = enough.sampler.num_candidates
    # SIR would need more than max_candidates: a GFlowNet is fitted. An exact-enough GFlowNet
    # (its KL given) with a cheap fit over many draws wins; the same with a huge fit loses.

    def past_max(draws: int, fit_tokens: int, **more):
        return choose_sampler(
            target,
            prompts,
            draws_per_prompt=draws,
            max_candidates=k - 1,
            fit_gflownet=fit(fit_tokens),
            **common,
            **more,
        )

    cheap = past_max(10_000, 1000, gflownet_kl=1e-8)
    assert fits == [1000] and cheap.chosen.name == "GFlowNet"
    assert isinstance(cheap.sampler, GFlowNetSampler)
    gfn = cheap.chosen
    assert gfn.total_tokens_per_draw == pytest.approx(gfn.tokens_per_draw + 1000 / (4 * 10_000))
    dear = past_max(2, 10**9, gflownet_kl=1e-8)
    assert fits == [1000, 10**9] and dear.chosen.name.startswith("SIR K=")
    assert {o.name for o in dear.options} >= {"GFlowNet", dear.chosen.name}
    totals = [o.total_tokens_per_draw for o in dear.options if o.meets_accuracy]
    assert dear.chosen.total_tokens_per_draw == min(totals)
    # A fit drawing k rollouts per served draw costs at least k local-product candidates per
    # draw, as much as SIR with K = k: it cannot pay, so it is never started.
    futile = past_max(2, 1, fit_rollouts=k * 4 * 2)
    assert fits == [1000, 10**9] and futile.chosen.name == f"SIR K={k}"


def test_alpha_spin_auto_opponent_is_the_pilots_choice(world, target, tmp_path):
    """sampler="auto": the opponent is what choose_sampler picks from the same pilot; a
    GFlowNet is fitted (and saved for the next iteration's warm start) only past
    auto_max_candidates."""
    prompts = [list(p) for p in world.train_prompts[:8]]
    cap = world.max_new_tokens
    small = GFlowNetConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, twist_width=16)
    config = AlphaSpinConfig(alpha=0.95, history=1, auto_accuracy=0.002, gflownet=small)
    common = {"max_new_tokens": cap, "iteration": 1, "fit_prompts": prompts}
    iterates = [world.base, world.shifted]
    chosen = opponent_sampler(config, target, iterates, save_to=tmp_path / "a", **common)
    expected = choose_sampler(
        target,
        prompts,
        accuracy=0.002,
        draws_per_prompt=1,
        max_new_tokens=cap,
        generator=derive_seed(config.seed, "pilot", 1),
    )
    assert isinstance(chosen, ImportanceResampler)
    assert chosen.num_candidates == expected.sampler.num_candidates
    assert not (tmp_path / "a").exists()  # K ≤ 64: no fit
    tight = dataclasses.replace(config, auto_max_candidates=1)
    opponent_sampler(tight, target, iterates, save_to=tmp_path / "b", **common)
    assert (tmp_path / "b").is_dir()  # past auto_max_candidates, with a fit that may pay
