"""-inf is a legal log-probability: it never becomes NaN in scores, losses, weights, ESS or
divergences — with masked tokens, α at 0 and 1, long responses, and under bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from gfn_spin import ArithmeticMixture, GeometricMixture, LocalProduct, Policy
from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.samples import pad_responses
from objectives.spin import spin_loss
from objectives.subtb import WEIGHTINGS, modified_subtb_loss
from samplers import GFlowNetSampler, ImportanceResampler, SMCSampler
from samplers.weighting import effective_sample_size, ess_fraction
from selfplay.reference import build_reference


def _no_nan(*tensors: torch.Tensor) -> bool:
    return not any(bool(torch.isnan(torch.as_tensor(t)).any()) for t in tensors)


def _masked(world) -> Policy:
    """The base policy with the last symbol forbidden (log-probability -inf for it)."""
    return Policy(world.base.model, world.tokenizer, allowed_token_ids=world.symbol_ids[:3])


def test_masked_tokens_and_zero_probability_responses(world, prompt):
    masked, shifted, forbidden = _masked(world), world.shifted, world.symbol_ids[3]
    a, b = world.symbol_ids[:2]
    responses = [(a, forbidden), (forbidden,) * 7, (a, b), ()]
    ids, lengths = pad_responses(responses, 7, world.tokenizer.pad_token_id)
    rows = [prompt] * len(responses)
    with torch.no_grad():
        base_lp = masked.log_prob(rows, ids, lengths)
        shifted_lp = shifted.log_prob(rows, ids, lengths)
        assert torch.isneginf(base_lp[:2]).all() and torch.isfinite(base_lp[2:]).all()
        for alpha in (0.0, 0.3, 1.0):
            for density in (
                GeometricMixture([masked, shifted], [1 - alpha, alpha]),
                LocalProduct([masked, shifted], [1 - alpha, alpha]),
                ArithmeticMixture([masked, shifted], [1 - alpha, alpha]),
                build_reference([masked, shifted], alpha, history=1),
            ):
                scores = density.score(rows, ids, lengths)
                log_prob = scores.sequence_logprob()
                assert _no_nan(
                    scores.token_logprobs, scores.eos_logprobs, scores.prefix_terminal_logprobs()
                ), (type(density).__name__, alpha)
                state = density.advance(density.start([prompt]), torch.tensor([forbidden]))
                assert _no_nan(state.next_logprobs)
                if alpha == 1.0:  # the masked component has weight 0: it must not contribute
                    torch.testing.assert_close(log_prob, shifted_lp)
                elif alpha == 0.0 and not isinstance(density, LocalProduct):
                    torch.testing.assert_close(log_prob, base_lp)
        # Weight 0 on the only component allowing the token: the response has probability 0.
        zero = ArithmeticMixture([masked, shifted], [1.0, 0.0]).log_prob(rows, ids, lengths)
        assert torch.isneginf(zero[:2]).all()

    # Sampler weights and ESS with -inf target densities (proposal π_t proposes the token).
    target = GeometricMixture([masked, shifted], [0.5, 0.5])
    for sampler in (
        ImportanceResampler(target, shifted, 8, max_new_tokens=3),
        SMCSampler(target, 8, proposal=shifted, max_new_tokens=3),
    ):
        draws = sampler.sample([prompt], 16, generator=0)
        assert _no_nan(draws.stats["ess"], draws.stats["log_z"], draws.log_target)
        assert torch.isfinite(draws.log_target).all()  # no impossible draw is ever returned
        assert forbidden not in {t for r in draws.responses() for t in r}

    # Divergences between supports that differ: KL may be inf, never NaN.
    symbols = world.symbol_ids  # the forbidden token included: the supports differ
    p = exact_distribution(target, prompt, 3, allowed_token_ids=symbols).logprobs
    q = exact_distribution(shifted, prompt, 3, allowed_token_ids=symbols).logprobs
    assert torch.isneginf(p).any()
    d = divergences(p, q)
    assert _no_nan(torch.tensor(list(d.values())))
    assert math.isfinite(d["kl_pq"]) and d["kl_qp"] == math.inf and 0 < d["tv"] < 1

    # Losses with -inf rewards and -inf reference log-probs.
    with torch.no_grad():
        policy = shifted.score(rows, ids, lengths)
        log_reward = target.score(rows, ids, lengths).prefix_terminal_logprobs()
    for weighting in WEIGHTINGS:
        loss = modified_subtb_loss(
            policy.token_logprobs,
            policy.eos_logprobs,
            log_reward,
            lengths,
            weighting=weighting,
        )
        assert torch.isfinite(loss)
    # Pairs 0 and 1 hold -inf (the masked policy forbids those responses): loss 0. Pairs 2 and 3
    # are possible: -log σ(β m) with m = 2 (shifted − base) and β = 0.1, computed with math.
    loss = spin_loss(shifted_lp, base_lp, base_lp, shifted_lp)
    assert loss[:2].tolist() == [0.0, 0.0]
    for b in (2, 3):
        margin = 0.1 * 2.0 * (float(shifted_lp[b]) - float(base_lp[b]))
        assert float(loss[b]) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-5)


def _random_llama(tokenizer, seed: int) -> Policy:
    """A tiny random Llama whose EOS is rare, so responses run to the cap."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)  # sharp (very negative) log-probs ...
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0  # ... and EOS well below the best
    return Policy(model, tokenizer)


def test_long_responses_on_a_random_model(world):
    cap = 64
    first, second = _random_llama(world.tokenizer, 0), _random_llama(world.tokenizer, 1)
    target = GeometricMixture([first, second], [0.5, 0.5])
    prompts = world.eval_prompts[:2]
    draws = SMCSampler(target, 8, max_new_tokens=cap).sample(prompts, 2, generator=0)
    assert int(draws.lengths.max()) == cap and float(draws.lengths.float().mean()) > cap / 2
    assert _no_nan(draws.stats["ess"], draws.stats["log_z"], draws.log_target)
    sir = ImportanceResampler(target, None, 8, max_new_tokens=cap).sample(prompts, 2, generator=0)
    assert _no_nan(sir.stats["ess"], sir.stats["log_z"])
    rows = [prompts[i] for i in draws.prompt_index.tolist()]
    with torch.no_grad():
        scores = target.score(rows, draws.response_ids, draws.lengths)
        policy = first.score(rows, draws.response_ids, draws.lengths)
    log_reward = scores.prefix_terminal_logprobs()
    assert _no_nan(log_reward) and torch.isfinite(scores.sequence_logprob()).all()
    log_pf = policy.token_logprobs.clone().requires_grad_(True)
    for weighting in WEIGHTINGS:
        loss = modified_subtb_loss(
            log_pf, policy.eos_logprobs, log_reward, draws.lengths, weighting=weighting
        )
        (grad,) = torch.autograd.grad(loss, log_pf)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    sampler = GFlowNetSampler(
        target, first, max_new_tokens=cap, prompts_per_step=2, samples_per_prompt=2, seed=0
    )
    for _ in range(2):
        assert math.isfinite(sampler.train_step(prompts)["loss"])


def test_bf16_autocast_scoring_and_gflownet_step(world, prompt):
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([_masked(world), shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(
        target, shifted, max_new_tokens=7, prompts_per_step=4, samples_per_prompt=4, seed=0
    )
    prompts = world.eval_prompts[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        draws = ImportanceResampler(target, None, 8, max_new_tokens=7).sample(
            prompts, 4, generator=0
        )
        rows = [prompts[i] for i in draws.prompt_index.tolist()]
        with torch.no_grad():
            scores = target.score(rows, draws.response_ids, draws.lengths)
            policy_lp = shifted.log_prob(rows, draws.response_ids, draws.lengths)
        for _ in range(2):
            record = sampler.train_step(prompts)
        own = sampler.sample(prompts, 8, generator=0)
    assert _no_nan(scores.token_logprobs, scores.eos_logprobs, policy_lp)
    assert _no_nan(draws.stats["ess"], draws.stats["log_z"])
    assert math.isfinite(record["loss"])
    assert _no_nan(own.stats["ess"], own.stats["log_z"], own.log_q)
    assert all(math.isfinite(v) for v in own.stats["log_z"])
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in sampler.trainable_parameters)


# -- properties over random log-weights --------------------------------------------------------

log_values = st.one_of(
    st.floats(min_value=-700.0, max_value=50.0, allow_nan=False), st.just(-math.inf)
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(log_values, log_values), min_size=1, max_size=12))
def test_property_divergences_never_nan(pairs):
    p_raw = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    q_raw = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    if torch.isneginf(p_raw).all() or torch.isneginf(q_raw).all():
        return  # not a distribution
    p, q = torch.log_softmax(p_raw, 0), torch.log_softmax(q_raw, 0)
    d = divergences(p, q)
    assert not any(math.isnan(v) for v in d.values())
    assert -1e-12 <= d["tv"] <= 1 + 1e-12
    assert d["kl_pq"] >= -1e-9 and d["kl_qp"] >= -1e-9
    assert -1e-12 <= d["js"] <= math.log(2) + 1e-9
    assert divergences(p, p)["tv"] == 0.0 and abs(divergences(p, p)["kl_pq"]) < 1e-12


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(log_values, min_size=1, max_size=16))
def test_property_effective_sample_size_never_nan(values):
    log_w = torch.tensor(values, dtype=torch.float64)
    count = len(values)
    ess = float(effective_sample_size(log_w))
    fraction = float(ess_fraction(log_w[None]))
    assert not math.isnan(ess) and not math.isnan(fraction)
    if torch.isneginf(log_w).all():
        assert ess == 0.0 and fraction == 0.0
    else:
        # Closed form (Σw)²/Σw² on weights scaled by the largest, in Python floats.
        top = max(values)
        weights = [math.exp(v - top) for v in values]
        expected = sum(weights) ** 2 / sum(w * w for w in weights)
        assert ess == pytest.approx(expected, rel=1e-9)
        assert fraction == pytest.approx(expected / count, rel=1e-9)
        assert 1 - 1e-9 <= ess <= count + 1e-9
    # Invariant to a common shift of the log-weights (only ratios matter).
    assert abs(float(effective_sample_size(log_w + 300.0)) - ess) < 1e-6 * max(ess, 1)


def test_weighted_logsum_keeps_forbidden_tokens_forbidden_under_negative_weights():
    """An extrapolated mixture (a negative weight) has the intersection of the supports."""
    from gfn_spin.scores import weighted_logsum

    inf = float("inf")
    a = torch.tensor([-1.0, -inf, -2.0, -inf])
    b = torch.tensor([-3.0, -0.5, -inf, -inf])
    total = weighted_logsum([a, b], [1.5, -0.5])
    expected = torch.tensor([1.5 * -1.0 - 0.5 * -3.0, -inf, -inf, -inf])
    assert not torch.isnan(total).any()
    assert torch.equal(total, expected)
    # A zero weight still drops its component entirely, -inf included.
    assert torch.equal(weighted_logsum([a, b], [1.0, 0.0]), a)
