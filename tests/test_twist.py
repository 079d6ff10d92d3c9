"""The twisted local product and token-level distillation, each against another computation.

- The twisted density starts exactly at the local product, and its teacher-forced scores equal
  the step-by-step decoding path (start/advance) and a per-state recomputation from the
  components' own outputs.
- It is a normalized density: its enumeration sums to one, and the first-token marginal of
  that enumeration is q_loc·e^h/Σ from the head's output h.
- The distillation loss equals a double loop over rows and states, and its expectation under
  the teacher equals the sequence-level KL(teacher ‖ student) computed by enumeration.
"""

from __future__ import annotations

import pytest
import torch

from gfn_spin import GeometricMixture
from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.samples import ancestral_sample
from gfn_spin.scores import weighted_logsum
from gfn_spin.twisted_local_product import TwistedLocalProduct, TwistHead, head_inputs
from objectives.distill import distillation_loss
from samplers import GFlowNetSampler
from samplers.gflownet import StateRecorder
from tests.stepping import forced_and_decoded

L = 7


def _twisted(world, alpha: float = 0.5, seed: int = 0, scale: float = 1.0):
    """A twisted local product whose head is random (non-zero output layer)."""
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    local = target.local_product()
    torch.manual_seed(seed)
    head = TwistHead(TwistedLocalProduct.in_features(local), target.vocab_size, width=16)
    with torch.no_grad():
        head.out.weight.normal_(0, scale)
        head.out.bias.normal_(0, scale)
    return target, local, TwistedLocalProduct(local, head)


def _batch(density, prompt, count: int = 6, seed: int = 0):
    samples = ancestral_sample(density, [prompt], count, max_new_tokens=L, generator=seed)
    return [prompt] * count, samples.response_ids, samples.lengths


def test_zero_head_is_the_local_product(world, prompt):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    local = target.local_product()
    head = TwistHead(TwistedLocalProduct.in_features(local), target.vocab_size)
    twisted = TwistedLocalProduct(local, head)
    rows, ids, lengths = _batch(local, prompt)
    with torch.no_grad():
        assert torch.allclose(
            twisted.step_logprobs(rows, ids, lengths),
            local.step_logprobs(rows, ids, lengths),
            atol=1e-5,
        )


def test_teacher_forced_scores_match_decoding_and_a_per_state_recomputation(world, prompt):
    _, local, twisted = _twisted(world)
    rows, ids, lengths = _batch(twisted, prompt)
    with torch.no_grad():
        forced, decoded = forced_and_decoded(twisted, rows, ids, lengths)
        # Per state from the components' own teacher-forced outputs, one row and state at a time.
        outputs = [c.step_logprobs_and_features(rows, ids, lengths) for c in local.components]
        # Scores from stored outputs (the head runs on valid states only) equal the full pass.
        stored = twisted.scores_from_outputs(
            ([o[0] for o in outputs], [o[1] for o in outputs]), ids, lengths
        )
        full = twisted.score(rows, ids, lengths)
        assert torch.allclose(stored.token_logprobs, full.token_logprobs, atol=1e-5)
        assert torch.allclose(stored.eos_logprobs, full.eos_logprobs, atol=1e-5)
        for b in range(len(rows)):
            for k in range(int(lengths[b]) + 1):
                steps = [o[0][b, k] for o in outputs]
                hidden = [o[1][b, k] for o in outputs]
                logits = weighted_logsum(steps, local.weights) + twisted.head(head_inputs(hidden))
                expected = torch.log_softmax(logits, dim=-1)
                assert torch.allclose(forced[b, k], expected, atol=1e-4)
                assert torch.allclose(decoded[b, k], expected, atol=1e-4)


def test_twisted_density_is_normalized_and_its_first_step_is_q_loc_times_e_h(world, prompt):
    """The enumerated law sums to one, and its first-token marginal is q_loc·e^h/Σ with h the
    head's output at s_0 (the responses' first tokens, EOS for the empty response). The head's
    twist must move q_loc by more than that check's tolerance: otherwise a head ignored by the
    density would pass it too."""
    _, local, twisted = _twisted(world)
    rows, ids, lengths = _batch(twisted, prompt, count=1)
    with torch.no_grad():
        mine = exact_distribution(twisted, prompt, L)
        outputs = [c.step_logprobs_and_features(rows, ids, lengths) for c in local.components]
        q_loc = torch.log_softmax(weighted_logsum([o[0][0, 0] for o in outputs], local.weights), -1)
        h = twisted.head(head_inputs([o[1][0, 0] for o in outputs]))
        expected = torch.softmax(q_loc + h, -1).double()
    assert abs(float(torch.logsumexp(mine.logprobs.double(), 0))) < 1e-4
    first = torch.tensor(
        [r[0] if r else twisted.eos_token_id for r in mine.responses], dtype=torch.long
    )
    marginal = torch.zeros_like(expected).index_add_(0, first, mine.logprobs.double().exp())
    tolerance = 1e-4
    assert torch.allclose(marginal, expected, atol=tolerance)
    assert not torch.allclose(expected, q_loc.double().exp(), atol=tolerance)


def test_distillation_loss_matches_a_double_loop():
    torch.manual_seed(0)
    batch, width, vocab = 3, 4, 5
    teacher = torch.log_softmax(torch.randn(batch, width + 1, vocab, dtype=torch.float64), -1)
    student = torch.log_softmax(torch.randn(batch, width + 1, vocab, dtype=torch.float64), -1)
    teacher[0, :, 2] = float("-inf")  # a token the teacher forbids contributes nothing
    teacher[0] = torch.log_softmax(teacher[0], -1)
    lengths = torch.tensor([0, 2, width])
    expected = 0.0
    for b in range(batch):
        for k in range(min(int(lengths[b]), width - 1) + 1):
            for v in range(vocab):
                p = float(teacher[b, k, v].exp())
                if p > 0:
                    expected += p * float(teacher[b, k, v] - student[b, k, v])
    value = distillation_loss(teacher, student, lengths)
    assert abs(float(value) - expected / batch) < 1e-12


def test_distillation_expectation_is_the_sequence_kl(world, prompt):
    """Σ_y T(y) · loss(y) = KL(T‖S) exactly, both enumerated over every response."""
    _, _, teacher = _twisted(world, seed=1)
    student = world.shifted
    with torch.no_grad():
        t = exact_distribution(teacher, prompt, L)
        s = exact_distribution(student, prompt, L)
        ids = torch.full((len(t.responses), L), 0, dtype=torch.long)
        for i, response in enumerate(t.responses):
            ids[i, : len(response)] = torch.tensor(response, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in t.responses])
        rows = [prompt] * len(t.responses)
        t_steps = teacher.step_logprobs(rows, ids, lengths).double()
        s_steps = student.step_logprobs(rows, ids, lengths).double()
        # Per-row losses: distillation_loss of one row at a time is its per-row value.
        per_row = torch.stack(
            [
                distillation_loss(t_steps[i : i + 1], s_steps[i : i + 1], lengths[i : i + 1])
                for i in range(len(rows))
            ]
        )
    expectation = float((t.logprobs.double().exp() * per_row).sum())
    kl = divergences(t.logprobs.double(), s.logprobs.double())["kl_pq"]
    # Both sides are float64 sums of float32 model outputs over ~2·10^4 responses.
    assert expectation == pytest.approx(kl, rel=1e-3, abs=1e-4)


def test_twist_sampler_saves_and_loads_its_head(world, prompt, tmp_path):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(
        target,
        world.shifted,
        max_new_tokens=L,
        parametrization="twist",
        steps=3,
        prompts_per_step=2,
        samples_per_prompt=2,
        warmup_steps=1,
    )
    sampler.fit(world.train_prompts[:4], progress=False)
    sampler.save(tmp_path / "twist")
    loaded = GFlowNetSampler.load(tmp_path / "twist", target, world.shifted)
    rows, ids, lengths = _batch(target.local_product(), prompt)
    with torch.no_grad():
        assert torch.equal(
            sampler.policy.step_logprobs(rows, ids, lengths),
            loaded.policy.step_logprobs(rows, ids, lengths),
        )
    with torch.no_grad():
        next(loaded.head.parameters()).fill_(float("nan"))
    loaded.save(tmp_path / "broken")
    with pytest.raises(ValueError, match="non-finite"):
        GFlowNetSampler.load(tmp_path / "broken", target, world.shifted)


def test_recorded_rollout_states_equal_teacher_forced_passes(world, prompt):
    """What the training steps keep from a rollout (component scores and features, a teacher's
    log-probs) equals a teacher-forced pass over the drawn responses at every visited state."""

    _, local, twisted = _twisted(world)
    recorder = StateRecorder(lambda state: state.component_outputs(), L)
    teacher = StateRecorder(lambda state: [state.next_logprobs], L)

    def both(step, rows, state):
        recorder(step, rows, state)
        teacher(step, rows, state)

    with torch.no_grad():
        samples = ancestral_sample(
            twisted, [prompt], 12, max_new_tokens=L, generator=3, on_state=both
        )
        rows, ids, lengths = [prompt] * 12, samples.response_ids, samples.lengths
        steps, features = twisted.component_outputs(rows, ids, lengths)
        forced = twisted.step_logprobs(rows, ids, lengths)
    visited = torch.arange(L + 1)[None, :] <= torch.minimum(lengths, torch.tensor(L - 1))[:, None]
    assert bool((lengths > 0).any()) and bool((lengths < L).any())
    for got, want in zip(recorder.values, [*steps, *features], strict=True):
        assert torch.allclose(got[visited], want[visited], atol=1e-4)
        assert bool((got[~visited] == 0).all())
    assert torch.allclose(teacher.values[0][visited], forced[visited], atol=1e-4)
