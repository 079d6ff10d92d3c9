"""Mixtures and exact enumeration: normalization, consistency, and ancestral sampling exactness."""

from __future__ import annotations

import math

import pytest
import torch

from gfn_spin import ArithmeticMixture, GeometricMixture, LocalProduct
from gfn_spin.exact import count_responses, divergences, exact_distribution
from gfn_spin.samples import ancestral_sample
from tests.stats import chi_square_threshold, tv_noise_bound_from_probs


def _densities(world):
    base, shifted = world.base, world.shifted
    return {
        "policy": base,
        "arithmetic": ArithmeticMixture([base, shifted], [0.3, 0.7]),
        "nested arithmetic": ArithmeticMixture(
            [base, ArithmeticMixture([base, shifted], [0.5, 0.5])], [0.5, 0.5]
        ),
        "local product": LocalProduct([base, shifted], [0.5, 0.5]),
        "geometric": GeometricMixture([base, shifted], [0.5, 0.5]),
        "geometric of arithmetic": GeometricMixture(
            [base, ArithmeticMixture([base, shifted], [0.5, 0.5])], [0.05, 0.95]
        ),
    }


@pytest.mark.parametrize("name", ["policy", "arithmetic", "nested arithmetic", "local product"])
def test_autoregressive_densities_sum_to_one(world, prompt, name):
    dist = exact_distribution(_densities(world)[name], prompt, world.max_new_tokens)
    assert len(dist.responses) == count_responses(4, world.max_new_tokens) == 21845
    assert abs(dist.log_z) < 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "policy",
        "arithmetic",
        "nested arithmetic",
        "local product",
        "geometric",
        "geometric of arithmetic",
    ],
)
def test_enumeration_agrees_with_teacher_forced_scores(world, prompt, name):
    density = _densities(world)[name]
    dist = exact_distribution(density, prompt, world.max_new_tokens)
    pick = torch.arange(0, len(dist.responses), 97)
    rows = [dist.responses[i] for i in pick]
    ids = torch.full((len(rows), world.max_new_tokens), 0, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        scored = density.log_prob([prompt] * len(rows), ids, lengths).double()
    torch.testing.assert_close(scored - dist.log_z, dist.logprobs[pick], atol=1e-5, rtol=0)


def test_geometric_mixture_is_the_normalized_product(world, prompt):
    base = exact_distribution(world.base, prompt, world.max_new_tokens)
    shifted = exact_distribution(world.shifted, prompt, world.max_new_tokens)
    assert base.responses == shifted.responses
    for alpha in (0.0, 0.5, 0.95, 1.0):
        geometric = exact_distribution(
            GeometricMixture([world.base, world.shifted], [1 - alpha, alpha]),
            prompt,
            world.max_new_tokens,
        )
        product = (1 - alpha) * base.logprobs + alpha * shifted.logprobs
        torch.testing.assert_close(
            geometric.logprobs, product - product.logsumexp(0), atol=1e-5, rtol=0
        )


def test_arithmetic_mixture_is_the_weighted_sum(world, prompt):
    base = exact_distribution(world.base, prompt, world.max_new_tokens)
    shifted = exact_distribution(world.shifted, prompt, world.max_new_tokens)
    mixture = exact_distribution(
        ArithmeticMixture([world.base, world.shifted], [0.3, 0.7]), prompt, world.max_new_tokens
    )
    expected = torch.logaddexp(math.log(0.3) + base.logprobs, math.log(0.7) + shifted.logprobs)
    torch.testing.assert_close(mixture.logprobs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["policy", "arithmetic", "local product"])
def test_ancestral_samples_follow_the_exact_distribution(world, prompt, name):
    density = _densities(world)[name]
    dist = exact_distribution(density, prompt, world.max_new_tokens)
    draws = 4000
    samples = ancestral_sample(
        density, [prompt], draws, max_new_tokens=world.max_new_tokens, generator=11
    )
    responses = samples.responses()

    # log_q of each draw is its enumerated log-probability.
    position = dist.index()
    expected = torch.stack([dist.logprobs[position[r]] for r in responses])
    torch.testing.assert_close(samples.log_q.double(), expected, atol=1e-5, rtol=0)

    # χ² over the 30 most probable responses plus one bin for the rest; threshold at 4σ.
    top = dist.logprobs.argsort(descending=True)[:30]
    probs = torch.cat([dist.logprobs[top].exp(), 1 - dist.logprobs[top].exp().sum()[None]])
    counts = torch.zeros(31, dtype=torch.float64)
    slot = {dist.responses[int(i)]: j for j, i in enumerate(top)}
    for r in responses:
        counts[slot.get(r, 30)] += 1
    chi2 = float(((counts - draws * probs) ** 2 / (draws * probs)).sum())
    assert chi2 < chi_square_threshold(30), chi2

    # TV of the empirical distribution within the noise floor of exact draws.
    tv = divergences(dist.logprobs, dist.empirical_logprobs(responses))["tv"]
    assert tv < tv_noise_bound_from_probs(dist.logprobs.exp(), draws), tv


def test_shifted_sampler_is_detected_by_the_same_test(world, prompt):
    """The χ²/TV test above can fail: draws from the shifted policy are rejected against the base."""
    dist = exact_distribution(world.base, prompt, world.max_new_tokens)
    draws = 4000
    samples = ancestral_sample(
        world.shifted, [prompt], draws, max_new_tokens=world.max_new_tokens, generator=11
    )
    tv = divergences(dist.logprobs, dist.empirical_logprobs(samples.responses()))["tv"]
    assert tv > tv_noise_bound_from_probs(dist.logprobs.exp(), draws)


def test_enumeration_size_guard_raises_before_work(world, prompt):
    with pytest.raises(ValueError, match="enumeration too large"):
        exact_distribution(world.base, prompt, 30)
    with pytest.raises(ValueError, match="enumeration too large"):
        exact_distribution(world.base, prompt, 7, max_responses=1000)


def test_enumeration_with_restricted_alphabet(world, prompt):
    dist = exact_distribution(world.base, prompt, 3, allowed_token_ids=world.symbol_ids[:2])
    assert len(dist.responses) == count_responses(2, 3)
    assert all(set(r) <= set(world.symbol_ids[:2]) for r in dist.responses)


def test_mixture_argument_errors(world):
    with pytest.raises(ValueError, match="sum to 1"):
        ArithmeticMixture([world.base, world.shifted], [0.5, 0.6])
    with pytest.raises(ValueError, match="non-negative"):
        ArithmeticMixture([world.base, world.shifted], [-0.5, 1.5])
    with pytest.raises(ValueError, match="finite"):
        GeometricMixture([world.base, world.shifted], [float("nan"), 1.0])
    with pytest.raises(ValueError, match="entries"):
        GeometricMixture([world.base, world.shifted], [1.0])
    with pytest.raises(ValueError, match="empty"):
        ArithmeticMixture([], [])
    with pytest.raises(ValueError, match="normalized"):
        ArithmeticMixture([GeometricMixture([world.base], [1.0])], [1.0])


def test_components_with_different_vocabularies_are_refused(world):
    class OtherVocab:
        eos_token_id = world.base.eos_token_id
        vocab_size = world.base.vocab_size + 1
        normalized = True

    with pytest.raises(ValueError, match="vocabulary"):
        GeometricMixture([world.base, OtherVocab()], [0.5, 0.5])

    class OtherEos(OtherVocab):
        eos_token_id = world.base.eos_token_id + 1
        vocab_size = world.base.vocab_size

    with pytest.raises(ValueError, match="EOS"):
        ArithmeticMixture([world.base, OtherEos()], [0.5, 0.5])


def test_zero_weight_component_with_forbidden_tokens_gives_no_nan(world, prompt):
    """A component forbidding a token (-inf) with weight 0 must not poison the mixture."""
    narrow = type(world.base)(
        world.base.model, world.tokenizer, allowed_token_ids=world.symbol_ids[:2]
    )
    mixture = GeometricMixture([world.base, narrow], [1.0, 0.0])
    dist = exact_distribution(mixture, prompt, 4)
    assert torch.isfinite(dist.logprobs).all()
    forbid = GeometricMixture([world.base, narrow], [0.5, 0.5])
    dist = exact_distribution(forbid, prompt, 4, allowed_token_ids=world.symbol_ids)
    assert not torch.isnan(dist.logprobs).any()
    assert torch.isneginf(dist.logprobs).any()


def test_divergences_closed_forms_and_zero_mass():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    out = divergences(p.log(), q.log())
    assert out["tv"] == pytest.approx(0.5)
    assert out["kl_pq"] == pytest.approx(math.log(2))
    assert out["kl_qp"] == math.inf
    m = (p + q) / 2
    js = 0.5 * sum(
        pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True) if pi > 0
    ) + 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m, strict=True) if qi > 0)
    assert out["js"] == pytest.approx(float(js))
    same = divergences(p.log(), p.log())
    assert same == {"tv": 0.0, "kl_pq": 0.0, "kl_qp": 0.0, "js": 0.0}
    with pytest.raises(ValueError, match="aligned"):
        divergences(p.log(), q[:2].log())


def test_geometric_over_local_product_is_the_product_of_local_normalizers(world, prompt):
    # G̃(y) / q_loc(y) = Π_{k ≤ n} Z_loc(s_k), with Z_loc = 1 at the forced stop (k = L): the
    # left side from teacher-forced scores, the right side from incremental decoding states.
    weights = [0.3, 0.7]
    geometric = GeometricMixture([world.base, world.shifted], weights)
    local = geometric.local_product()
    a, b = world.symbol_ids[:2]
    cap = world.max_new_tokens
    responses = [(), (a,), (a, b, b), (b,) * cap]
    ids = torch.full((len(responses), cap), world.tokenizer.pad_token_id, dtype=torch.long)
    for row, response in enumerate(responses):
        ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses])
    rows = [prompt] * len(responses)
    with torch.no_grad():
        ratio = geometric.log_prob(rows, ids, lengths) - local.log_prob(rows, ids, lengths)
        for row, response in enumerate(responses):
            state = local.start([prompt])
            total = 0.0
            for k in range(len(response) + 1):
                if k < cap:
                    total += float(state.log_z_local[0])
                if k < len(response):
                    state = local.advance(state, torch.tensor([response[k]]))
            # float32 scores: sums of at most L + 1 terms of a few nats, rounding far below 1e-4.
            assert float(ratio[row]) == pytest.approx(total, abs=1e-4), response
