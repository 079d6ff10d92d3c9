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
    scoring = ImportanceResampler(target, None, 8, max_new_tokens=4)
    assert fast._unscored is not None
    scoring._unscored = None  # the generic path: decode, then score every candidate
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
    # state columns to the LM head; both prompt-length cases (one length: a view; mixed: a
    # gather) must give the scores, and gradients, of the full log-softmax path.
    policy = world.load_policy("shifted")
    generator = torch.Generator().manual_seed(0)
    same = [world.eval_prompts[0]] * 3
    mixed = [world.eval_prompts[0], max(world.eval_prompts, key=len), world.eval_prompts[0]]
    for prompts in (same, mixed):
        ids = torch.tensor(world.symbol_ids)[torch.randint(4, (3, 5), generator=generator)]
        lengths = torch.tensor([5, 0, 3])
        lean = policy.score(prompts, ids, lengths)
        full = scores_from_steps(
            policy.step_logprobs(prompts, ids, lengths), ids, lengths, policy.eos_token_id
        )
        for a, b in (
            (lean.token_logprobs, full.token_logprobs),
            (lean.eos_logprobs, full.eos_logprobs),
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        grads = []
        for scores in (lean, full):
            total = scores.token_logprobs.sum() + scores.eos_logprobs.sum()
            grads.append(torch.autograd.grad(total, [policy.model.lm_head.weight])[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
