"""Fast paths must not change results: each is checked against the plain computation."""

from __future__ import annotations

import torch

from gfn_spin import GeometricMixture
from gfn_spin.density import scores_from_steps
from objectives.subtb import modified_subtb_loss
from samplers import ImportanceResampler


def _batch(batch: int, cap: int, seed: int, spread: float) -> list[torch.Tensor]:
    """float32 batch whose potentials span ``spread`` nats while residuals stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, cap + 1, (batch,), generator=gen)
    lengths[-1] = cap
    valid = torch.arange(cap + 1)[None, :] <= lengths[:, None]
    log_pf = torch.where(valid[:, 1:], -3 * torch.rand(batch, cap, generator=gen), 0.0)
    log_pterm = torch.where(valid, -3 * torch.rand(batch, cap + 1, generator=gen), 0.0)
    log_pterm[:, cap] = 0.0
    prefix = torch.cat([torch.zeros(batch, 1), log_pf.cumsum(1)], 1)
    log_reward = prefix + log_pterm - spread + torch.randn(batch, cap + 1, generator=gen)
    return [log_pf, log_pterm, torch.where(valid, log_reward, 0.0), lengths]


def _pair_tensor_loss(log_pf, log_pterm, log_reward, lengths, lam, weighting):
    """The pair sum written directly over the [B, L+1, L+1] residual tensor, in float64."""
    cap = log_pf.shape[1]
    valid = torch.arange(cap + 1)[None, :] <= lengths[:, None]
    prefix = torch.cat([torch.zeros(len(lengths), 1, dtype=log_pf.dtype), log_pf.cumsum(1)], 1)
    potentials = torch.where(valid, log_reward - log_pterm - prefix, 0.0)
    residuals = potentials[:, :, None] - potentials[:, None, :]
    i, j = torch.meshgrid(torch.arange(cap + 1), torch.arange(cap + 1), indexing="ij")
    weights = torch.where(i < j, torch.tensor(lam, dtype=log_pf.dtype) ** (j - i - 1), 0.0)
    weights = weights[None] * valid[:, None, :]
    weighted, normalizer = (weights * residuals**2).sum((1, 2)), weights.sum((1, 2))
    if weighting == "batch":
        return weighted.sum() / normalizer.sum()
    has_pair = lengths >= 1
    return (weighted[has_pair] / normalizer[has_pair]).mean()


def test_subtb_expansion_matches_pair_tensor_on_large_potentials():
    # The loss expands the pair sum into products; large potentials with small residuals are
    # where that expansion would cancel without the per-trajectory centring.
    for lam in (0.0, 0.5, 1.0):
        for weighting in ("batch", "geometric_within"):
            inputs = _batch(16, 40, seed=int(lam * 10), spread=60.0)
            ref_inputs = [t.double().requires_grad_(t.is_floating_point()) for t in inputs[:3]]
            ref = _pair_tensor_loss(*ref_inputs, inputs[3], lam, weighting)
            ours_inputs = [t.clone().requires_grad_(True) for t in inputs[:3]]
            ours = modified_subtb_loss(
                *ours_inputs, inputs[3], subtb_lambda=lam, weighting=weighting
            )
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
            ref_grads = torch.autograd.grad(ref, ref_inputs[:2])
            grads = torch.autograd.grad(ours, ours_inputs[:2])
            for grad, ref_grad in zip(grads, ref_grads, strict=True):
                scale = ref_grad.abs().max()
                torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-4 * scale)


def test_subtb_loss_is_unchanged_under_autocast():
    # Its products must not be downcast when a caller wraps the step in bf16 autocast.
    inputs = _batch(16, 40, seed=3, spread=60.0)
    plain = modified_subtb_loss(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = modified_subtb_loss(*inputs)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=0)


def test_prefill_of_repeated_prompts_equals_prefill_of_each(world):
    # Policy.start prefills each distinct prompt once and copies its cache rows; the decoding
    # that follows must be the one a separate prefill of every row gives.
    short, long = world.eval_prompts[0], max(world.eval_prompts, key=len)
    assert len(short) != len(long)  # mixed lengths: the left padding differs per row
    rows = [short, long, short, short, long]
    shared = world.base.start(rows)
    assert shared.cache.get_seq_length() == len(long)
    tokens = torch.tensor(world.symbol_ids[:1] * len(rows))
    shared_next = world.base.advance(shared, tokens).next_logprobs
    for row, prompt_ids in enumerate(rows):
        alone = world.base.start([prompt_ids])
        torch.testing.assert_close(shared.next_logprobs[row], alone.next_logprobs[0])
        alone_next = world.base.advance(alone, tokens[:1]).next_logprobs
        torch.testing.assert_close(shared_next[row], alone_next[0], rtol=1e-5, atol=1e-5)


def test_sir_from_the_local_product_weighs_while_decoding_as_scoring_does(world):
    # With the target's local product as proposal SIR skips the teacher-forced scoring pass;
    # forcing the scoring path on the same seed must give the same candidates and draws.
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    prompts = world.eval_prompts[:2]
    fast = ImportanceResampler(target, None, 8, max_new_tokens=4)
    # The generic path: decode, then score every candidate.
    scoring = ImportanceResampler(target, None, 8, max_new_tokens=4, weights_from="scoring")
    assert fast.weights_from == "decoding"
    a = fast.sample(prompts, 30, generator=5)
    b = scoring.sample(prompts, 30, generator=5)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.log_target, b.log_target, rtol=0, atol=1e-4)
    for key in ("log_z", "ess"):
        torch.testing.assert_close(
            a.stats[key].double(), b.stats[key].double(), rtol=1e-5, atol=1e-5
        )
    assert set(a.stats) == set(b.stats)
    # The scoring pass is what the fast path saves: one teacher-forced pass per component.
    assert a.stats["tokens"] < b.stats["tokens"]


def test_lean_token_scores_equal_the_full_normalized_steps(world):
    # Policy.score normalizes only the picked entries (logit − logsumexp) and sends only the
    # state columns to the LM head; rows that share a prompt share its prefill. Every layout
    # (one prompt length: a view; mixed lengths: a gather; repeated prompts: prefill + block)
    # must give the scores and gradients of the full log-softmax path on each row alone.
    policy = world.load_policy("shifted")
    short = [p for p in world.eval_prompts if len(p) == len(world.eval_prompts[0])]
    longest = max(world.eval_prompts, key=len)
    layouts = {
        "one length": short[:3],
        "mixed lengths": [short[0], longest, short[1]],
        "shared prompts": [short[0], longest, short[0], longest],
    }
    generator = torch.Generator().manual_seed(0)
    # The first layer's key projection gets gradient only through the prompt's cached keys
    # (and the response's own): it checks that gradients flow through the copied cache rows.
    weight = policy.model.model.layers[0].self_attn.k_proj.weight
    for name, prompts in layouts.items():
        rows = len(prompts)
        ids = torch.tensor(world.symbol_ids)[torch.randint(4, (rows, 5), generator=generator)]
        lengths = torch.tensor([5, 0, 3, 5][:rows])
        batched = policy.score(prompts, ids, lengths)
        total = batched.token_logprobs.sum() + batched.eos_logprobs.sum()
        batched_grad = torch.autograd.grad(total, [weight])[0]
        alone_grad = torch.zeros_like(weight)
        for row in range(rows):
            steps = policy.step_logprobs([prompts[row]], ids[row : row + 1], lengths[row : row + 1])
            alone = scores_from_steps(
                steps, ids[row : row + 1], lengths[row : row + 1], policy.eos_token_id
            )
            for a, b in (
                (batched.token_logprobs[row], alone.token_logprobs[0]),
                (batched.eos_logprobs[row], alone.eos_logprobs[0]),
            ):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
            total = alone.token_logprobs.sum() + alone.eos_logprobs.sum()
            alone_grad += torch.autograd.grad(total, [weight])[0]
        torch.testing.assert_close(batched_grad, alone_grad, rtol=1e-4, atol=1e-5, msg=name)
