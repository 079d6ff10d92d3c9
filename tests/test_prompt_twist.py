"""The prompt-reading twist (gfn_spin.prompt_twist), each path against another computation.

- Teacher-forced scores of a padded batch equal the step-by-step decoding path (start/advance,
  what sampling and enumeration use) and a per-state recomputation from each row's own unpadded
  prompt, run through the components' models directly.
- The training batch built from a rollout's recorded states equals the one built by teacher
  forcing the same responses (replayed responses), and the density's enumeration sums to one.
"""

from __future__ import annotations

import torch

from gfn_spin import GeometricMixture
from gfn_spin.adapters import route
from gfn_spin.exact import exact_distribution
from gfn_spin.prompt_twist import PromptAttentionTwistHead, PromptTwistedLocalProduct
from gfn_spin.samples import ancestral_sample, pad_responses
from gfn_spin.scores import weighted_logsum
from gfn_spin.twisted_local_product import TwistedLocalProduct, head_inputs
from samplers import GFlowNetSampler
from samplers.gflownet import StateRecorder
from tests.stepping import forced_and_decoded

L = 7


def _randomize(head: PromptAttentionTwistHead, seed: int = 0) -> None:
    """Move the zero-initialized output layer, so that the twist (and any error in what it
    reads) shows in the density."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in head.mlp.out.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def _twisted(world):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    local = target.local_product()
    torch.manual_seed(0)
    head = PromptAttentionTwistHead(
        TwistedLocalProduct.in_features(local), target.vocab_size, width=16, attention=16
    )
    _randomize(head)
    return local, PromptTwistedLocalProduct(local, head)


def _rows(world):
    """Prompts of 2, 3 and 4 symbols (so a batch is padded), with responses of several lengths."""
    prompts = [next(p for p in world.train_prompts if len(p) == n) for n in (4, 5, 6)]
    rows = [p for p in prompts for _ in range(2)]
    symbols = world.symbol_ids
    responses = [
        tuple(symbols[(i + k) % 4] for k in range(n)) for i, n in enumerate((0, 3, 7, 1, 5, 2))
    ]
    ids, lengths = pad_responses(responses, L, world.base.pad_token_id)
    return rows, ids, lengths


def test_scores_match_decoding_and_each_row_alone(world):
    local, twisted = _twisted(world)
    rows, ids, lengths = _rows(world)
    with torch.no_grad():
        forced, decoded = forced_and_decoded(twisted, rows, ids, lengths)
        for b, prompt in enumerate(rows):
            # The prompt's hidden states from the models themselves, unpadded, read through the
            # weights each component reads: the session's world models carry the adapters other
            # tests trained (peft keeps one of them active), which the policies route
            # around but a bare model call would add in.
            hidden = []
            for c in local.components:
                with route(c.model, c.adapter):
                    out = c.model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
                hidden.append(out.hidden_states[-1][0].float())
            memory = torch.cat(hidden, dim=-1)
            outputs = [
                c.step_logprobs_and_features([prompt], ids[b : b + 1], lengths[b : b + 1])
                for c in local.components
            ]
            mask = torch.ones(1, len(prompt), dtype=torch.bool)
            for k in range(int(lengths[b]) + 1):
                features = head_inputs([o[1][0, k] for o in outputs])[None]
                twist = twisted.head(features, memory[None], mask)[0]
                steps = weighted_logsum([o[0][0, k] for o in outputs], local.weights)
                expected = torch.log_softmax(steps + twist, dim=-1)
                assert torch.allclose(forced[b, k], expected, atol=1e-4)
                assert torch.allclose(decoded[b, k], expected, atol=1e-4)
    # The twist moves q_loc by far more than the tolerance (a head ignored would fail above).
    assert (forced - local.step_logprobs(rows, ids, lengths)).abs().nan_to_num().max() > 0.1


def test_training_batch_from_a_rollout_equals_teacher_forcing(world):
    sampler = GFlowNetSampler(
        GeometricMixture([world.base, world.shifted], [0.5, 0.5]),
        world.shifted,
        max_new_tokens=L,
        parametrization="prompt_twist",
        prompt_attention=16,
    )
    form = sampler.weights
    _randomize(form.head)
    prompts = [next(p for p in world.train_prompts if len(p) == n) for n in (4, 6)]
    recorder = StateRecorder(form.rollout_reader(), L)
    with torch.no_grad():
        samples = ancestral_sample(
            form.policy, prompts, 6, max_new_tokens=L, generator=1, on_state=recorder
        )
        rows = [p for p in prompts for _ in range(6)]
        ids, lengths = samples.response_ids, samples.lengths
        group = torch.tensor([i // 6 for i in range(12)])
        batches = [
            form.training_batch(sampler.target, rows, ids, lengths, group, recorded)
            for recorded in (recorder.values, None)
        ]
        scores = [form.scores(b) for b in batches]
        law = exact_distribution(form.policy, prompts[0], L)
    assert torch.allclose(batches[0].log_reward, batches[1].log_reward, atol=1e-4)
    assert torch.allclose(scores[0].sequence_logprob(), scores[1].sequence_logprob(), atol=1e-4)
    assert torch.allclose(scores[0].sequence_logprob(), samples.log_q, atol=1e-4)
    assert abs(float(torch.logsumexp(law.logprobs, 0))) < 1e-6
