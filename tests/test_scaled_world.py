"""The scaled world and its exact dynamic program, checked against brute-force enumeration.

On the small variant (5 symbols, cap 5: 3,906 responses) everything the dynamic program says
(log Z, log p(y), KL both ways, the population ESS, the data law's KL) is compared with
:func:`gfn_spin.exact.exact_distribution`, which knows nothing about bounded contexts.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.mixtures import LocalProduct
from gfn_spin.policy import Policy
from gfn_spin.samples import pad_responses
from tests.stats import tv_noise_bound_from_probs
from worlds.bounded_context import (
    BoundedContextTarget,
    ContextTables,
    check_bounded_context,
    ess_fraction,
    monte_carlo_kl,
    state_contexts,
)
from worlds.scaled import (
    CONTEXT,
    ScaledWorld,
    ScaledWorldConfig,
    build_world,
)

ALPHAS = (0.5, 0.9)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ScaledWorld:
    return build_world(ScaledWorldConfig.small(), cache_dir=tmp_path_factory.mktemp("scaled"))


def rounding_tolerance(world: ScaledWorld, tables: ContextTables) -> float:
    """Float32 rounding bound for a log-density summed over ≤ L+1 step scores.

    Policies return float32 log-softmax outputs: each is off by a few ulps of the largest
    magnitude involved (the entry itself or the log-normalizer), bounded by the table's largest
    finite entry. Two computation paths (enumeration, DP tables) each contribute, over L+1
    terms; 8 ulps per term covers the log-softmax's subtraction and exp-sum.
    """
    finite = tables.logprobs[torch.isfinite(tables.logprobs)]
    scale = max(1.0, float(finite.abs().max()))
    return 2 * (world.max_new_tokens + 1) * 8 * torch.finfo(torch.float32).eps * scale


def response_batch(world: ScaledWorld, responses: list[tuple[int, ...]]):
    return pad_responses(responses, world.max_new_tokens, world.base.eos_token_id)


def test_scaled_defaults_meet_the_sizes():
    config = ScaledWorldConfig()
    assert config.num_symbols >= 256 and config.max_new_tokens >= 32
    with pytest.raises(ValueError, match="prompt_lengths"):
        ScaledWorldConfig(prompt_lengths=(1, 3))
    with pytest.raises(ValueError, match="max_step"):
        ScaledWorldConfig(num_symbols=4, max_step=2)


def test_policies_are_bounded_context_and_the_check_can_fail(small: ScaledWorld):
    """The law at every state of long prompts equals the table read from two-token contexts;
    a two-layer model with the same window reads three tokens back, and the check sees it."""
    generator = torch.Generator().manual_seed(0)
    symbols = torch.tensor(small.symbol_ids)
    prompts = [
        [small.tokenizer.bos_token_id, *symbols[torch.randint(5, (n,), generator=generator)]]
        for n in (2, 3, 7, 11)
    ]
    prompts = [[int(t) for t in p] for p in prompts]
    draws = small.target(0.5).sample(prompts, 8, generator=generator)
    rows = [prompts[i] for i in draws.prompt_index.tolist()]
    for name in ("base", "iterate", "stress"):
        policy = getattr(small, name)
        gap = check_bounded_context(
            policy, small.policy_tables(name), rows, draws.response_ids, draws.lengths
        )
        assert gap <= rounding_tolerance(small, small.policy_tables(name))

    # A LoRA adapter (what a GFlowNet policy trains) keeps the window: exact KL applies to it.
    torch.manual_seed(0)
    adapted = small.load_policy("base").add_adapter("gfn")
    with torch.no_grad():
        for name, weight in adapted.model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    adapted_tables = ContextTables.from_density(adapted, small.symbol_ids, CONTEXT)
    assert not torch.allclose(adapted_tables.logprobs, small.policy_tables("base").logprobs)
    gap = check_bounded_context(adapted, adapted_tables, rows, draws.response_ids, draws.lengths)
    assert gap <= rounding_tolerance(small, adapted_tables)

    torch.manual_seed(0)
    deeper = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(small.tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            sliding_window=CONTEXT,
            max_position_embeddings=64,
        )
    ).eval()
    wide = Policy(deeper, small.tokenizer, allowed_token_ids=small.symbol_ids)
    wide_tables = ContextTables.from_density(wide, small.symbol_ids, CONTEXT)
    gap = check_bounded_context(wide, wide_tables, rows, draws.response_ids, draws.lengths)
    assert gap > 10 * rounding_tolerance(small, wide_tables)


@pytest.mark.parametrize("pair", ["iterate", "stress"])
def test_dynamic_program_equals_enumeration(small: ScaledWorld, pair: str):
    """log Z, every log p(y), KL(q‖p), KL(p‖q) and the ESS of the local product q."""
    base, other = small.policy_tables("base"), small.policy_tables(pair)
    for alpha in ALPHAS:
        mixture = small.mixture(alpha, pair)
        local = LocalProduct(mixture.components, mixture.weights)
        local_tables = ContextTables.from_density(local, small.symbol_ids, CONTEXT)
        target = small.target(alpha, pair)
        tol = rounding_tolerance(small, base.combine([other], [1 - alpha, alpha]))
        for prompt in small.eval_prompts[:2]:
            exact = exact_distribution(mixture, prompt, small.max_new_tokens)
            assert float(target.log_z([prompt])[0]) == pytest.approx(exact.log_z, abs=tol)
            ids, lengths = response_batch(small, exact.responses)
            logp = target.log_prob([prompt] * len(lengths), ids, lengths)
            assert float((logp - exact.logprobs).abs().max()) <= tol

            q = exact_distribution(local, prompt, small.max_new_tokens)
            assert q.responses == exact.responses
            truth = divergences(q.logprobs, exact.logprobs)
            assert float(target.kl_from(local_tables, [prompt])[0]) == pytest.approx(
                truth["kl_pq"], abs=tol
            )
            assert float(target.kl_to(local_tables, [prompt])[0]) == pytest.approx(
                truth["kl_qp"], abs=tol
            )
            log_w = exact.logprobs - q.logprobs  # w/Z under q
            ess = 1 / float(torch.exp(torch.logsumexp(q.logprobs + 2 * log_w, 0)))
            assert float(target.proposal_ess(local_tables, [prompt])[0]) == pytest.approx(
                ess, rel=tol
            )


def test_data_law_and_its_divergence_are_exact(small: ScaledWorld):
    """The walk's table is a normalized law (log Z = 0) and KL(p_data‖π) matches enumeration."""
    data = BoundedContextTarget(small.task, small.max_new_tokens)
    assert torch.allclose(small.task.logprobs.exp().sum(1), torch.ones(1, dtype=torch.float64))
    prompts = small.eval_prompts
    assert data.log_z(prompts).abs().max() < 1e-12
    total = 0.0
    for prompt in prompts:
        policy = exact_distribution(small.base, prompt, small.max_new_tokens)
        ids, lengths = response_batch(small, policy.responses)
        data_logp = data.log_prob([prompt] * len(lengths), ids, lengths)
        assert float(torch.logsumexp(data_logp, 0)) == pytest.approx(0.0, abs=1e-12)
        total += divergences(data_logp, policy.logprobs)["kl_pq"]
    assert small.kl_from_data("base") == pytest.approx(total / len(prompts), abs=1e-5)


def test_exact_sampling_follows_the_exact_law(small: ScaledWorld):
    draws_per_prompt = 20_000
    target = small.target(0.5, "stress")
    prompt = small.eval_prompts[0]
    exact = exact_distribution(small.mixture(0.5, "stress"), prompt, small.max_new_tokens)
    draws = target.sample([prompt], draws_per_prompt, generator=0)
    empirical = exact.empirical_logprobs(draws.responses())
    tv = divergences(empirical, exact.logprobs)["tv"]
    assert tv <= tv_noise_bound_from_probs(exact.logprobs.exp(), draws_per_prompt)
    # log_q and log_target are the exact densities of the draws.
    position = exact.index()
    rows = torch.tensor([position[r] for r in draws.responses()])
    assert torch.allclose(draws.log_q, exact.logprobs[rows], atol=1e-4)
    assert torch.allclose(draws.log_target - draws.stats["log_z"][0], draws.log_q)
    named = target.sample([prompt], 3, generator=0, tokenizer=small.tokenizer)
    assert named.texts == small.tokenizer.batch_decode(
        [list(r) for r in named.responses()], skip_special_tokens=True
    )


def test_monte_carlo_kl_and_ess_bracket_the_exact_values(small: ScaledWorld):
    """From draws of the local product (scored with its own exact log q), the Monte Carlo KL
    is within 5 standard errors of the exact one, and the ESS/N estimates near the exact."""
    target = small.target(0.9, "stress")
    mixture = small.mixture(0.9, "stress")
    local = LocalProduct(mixture.components, mixture.weights)
    local_tables = ContextTables.from_density(local, small.symbol_ids, CONTEXT)
    prompt = small.eval_prompts[1]
    draws = BoundedContextTarget(local_tables, small.max_new_tokens).sample(
        [prompt], 4000, generator=1
    )
    log_target = target.log_unnormalized([prompt] * len(draws), draws.response_ids, draws.lengths)
    log_z = float(target.log_z([prompt])[0])
    estimate, stderr = monte_carlo_kl(draws.log_q, log_target, log_z)
    exact = float(target.kl_from(local_tables, [prompt])[0])
    assert stderr > 0 and abs(estimate - exact) <= 5 * stderr
    exact_ess = float(target.proposal_ess(local_tables, [prompt])[0])
    assert 0 < ess_fraction(draws.log_q, log_target) <= 1 + 1e-12
    assert ess_fraction(draws.log_q, log_target, log_z) > 0
    # The target's own draws weigh all the same: ESS/N = 1.
    own = target.sample([prompt], 100, generator=2)
    assert ess_fraction(own.log_q, own.log_target) == pytest.approx(1.0)
    assert exact_ess < 1.0


def test_bad_inputs_are_refused(small: ScaledWorld):
    target = small.target(0.5)
    with pytest.raises(ValueError, match="fewer than context"):
        target.log_z([[small.symbol_ids[0]]])
    with pytest.raises(ValueError, match="outside the alphabet"):
        target.log_z([[small.tokenizer.bos_token_id, small.symbol_ids[0]]])
    with pytest.raises(ValueError, match="pair"):
        small.target(0.5, "other")
    with pytest.raises(ValueError, match="contexts exceed"):
        ContextTables.from_density(small.base, list(range(4, 4 + 700)), 2)


def test_cached_world_loads_the_same_models(small: ScaledWorld):
    again = build_world(small.config, cache_dir=small.directory.parent)
    assert again.build_seconds == small.build_seconds
    assert torch.equal(
        small.policy_tables("stress").logprobs, again.policy_tables("stress").logprobs
    )
    assert math.isfinite(small.build_seconds)


@pytest.mark.parametrize("pair", ["iterate", "stress"])
def test_length_blind_projection_counts_the_moves_of_the_enumerated_target(
    small: ScaledWorld, pair: str
):
    """The projection is N(c, v) / Σ_v N(c, v), N the expected moves from each context under p:
    counted here over every enumerated response of two prompts (its forced stops excluded)."""
    target = small.target(0.5, pair)
    tables, cap = target.tables, small.max_new_tokens
    prompts = small.eval_prompts[:2]
    size = tables.num_symbols
    counts = torch.zeros(tables.num_contexts, size + 1, dtype=torch.float64)
    for prompt in prompts:
        exact = exact_distribution(small.mixture(0.5, pair), prompt, cap)
        ids, lengths = response_batch(small, exact.responses)
        steps = torch.arange(cap)
        filled = torch.where(steps[None, :] < lengths[:, None], ids, tables.alphabet[0])
        contexts = state_contexts(tables, [prompt] * len(lengths), filled)
        symbols = tables.symbol_positions(filled, "response_ids")
        weight = exact.logprobs.exp() / len(prompts)
        for k in range(cap):
            moving = lengths > k
            counts.index_put_(
                (contexts[moving, k], symbols[moving, k]), weight[moving], accumulate=True
            )
            stopping = lengths == k
            counts.index_put_(
                (contexts[stopping, k], torch.full_like(contexts[stopping, k], size)),
                weight[stopping],
                accumulate=True,
            )
    visited = counts.sum(1) > 0
    expected = counts[visited] / counts[visited].sum(1, keepdim=True)
    law = target.length_blind_projection(prompts).logprobs.exp()
    assert torch.allclose(law[visited], expected, atol=1e-9)
    assert torch.allclose(law.sum(1), torch.ones(tables.num_contexts, dtype=torch.float64))
    # It is the KL(p‖q) optimum: mixing in the local product's tables moves KL(p‖q) up.
    mixture = small.mixture(0.5, pair)
    local = ContextTables.from_density(
        LocalProduct(mixture.components, mixture.weights), small.symbol_ids, CONTEXT
    )
    best = target.kl_to(target.length_blind_projection(prompts), prompts).mean()
    mixed = law.mul(0.9).add(local.logprobs.exp().mul(0.1)).log()
    other = ContextTables(mixed, tables.alphabet, tables.eos_token_id, tables.context)
    assert best < target.kl_to(other, prompts).mean()
