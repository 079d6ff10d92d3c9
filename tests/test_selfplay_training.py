"""The α-SPIN training step moves the policy the right way, and the config survives JSON.

The step test: with π_ref = π_0 and π_θ = π_0 (a fresh LoRA iterate) every margin
``m = log-ratio(y) − log-ratio(y')`` is 0. One SGD step of size η on the sigmoid loss
``mean −log σ(β m)`` moves θ by ``η β/2 · ∇M`` (σ(0) = 1/2, M the mean margin), so to first
order M rises by ``η β/2 · ‖∇M‖² > 0``: the sign is derived, not observed. Training on the
same data with real and generated swapped must lower M instead, which is what a trainer that
confused the two would do.
"""

from __future__ import annotations

import json

import pytest
import torch

from gfn_spin.policy import Policy
from gfn_spin.samples import ancestral_sample
from objectives.spin import spin_metrics
from selfplay import AlphaSpinConfig
from selfplay.iterate_training import train_iterate
from selfplay.iterates import new_iterate
from selfplay.iteration_data import IterationData, encode_examples
from selfplay.trainer import make_accelerator

ROWS = 32


def iteration_data(world, base, *, swapped: bool) -> IterationData:
    """Real = the world's SFT responses, generated = draws of π_0, reference = π_0."""
    examples = encode_examples(
        {k: world.sft_data[k][:ROWS] for k in ("prompt", "response")},
        base.tokenizer,
        max_prompt_length=64,
        max_new_tokens=world.max_new_tokens,
        pad_token_id=base.pad_token_id,
    )
    with torch.no_grad():
        draws = ancestral_sample(
            base, examples.prompt_ids, 1, max_new_tokens=world.max_new_tokens, generator=0
        )
        generated_ids = torch.full_like(examples.real_ids, base.pad_token_id)
        generated_ids[:, : draws.response_ids.shape[1]] = draws.response_ids
        generated = (generated_ids, draws.lengths)
        real = (examples.real_ids, examples.real_lengths)
        if swapped:
            real, generated = generated, real
        ref_real = base.log_prob(examples.prompt_ids, *real).double()
        ref_generated = base.log_prob(examples.prompt_ids, *generated).double()
    return IterationData(examples.prompt_ids, *real, *generated, ref_real, ref_generated)


def mean_margin(policy, data: IterationData, beta: float) -> float:
    with torch.no_grad():
        real = policy.log_prob(data.prompt_ids, data.real_ids, data.real_lengths)
        generated = policy.log_prob(data.prompt_ids, data.generated_ids, data.generated_lengths)
    metrics = spin_metrics(
        real, generated, data.ref_real_logps, data.ref_generated_logps, beta=beta
    )
    return metrics["rewards/margins"] / beta


def one_step(world, tmp_path, *, swapped: bool) -> tuple[IterationData, float, float, Policy]:
    """(data, mean margin before, after, the trained policy) of one SGD step from π_0."""
    config = AlphaSpinConfig(
        output_dir=str(tmp_path),
        optimizer="sgd",
        learning_rate=1e-2,
        max_grad_norm=None,
        batch_size=ROWS,
        epochs=1,
        beta=2.0,
        progress=False,
        device="cpu",
    )
    base = world.load_policy("base", device="cpu", dtype=torch.float32)
    data = iteration_data(world, base, swapped=swapped)
    policy, parameters = new_iterate([base], config, 0)
    before = mean_margin(policy, data, config.beta)
    metrics = train_iterate(
        policy, parameters, data, config, iteration=0, accelerator=make_accelerator(config)
    )
    assert metrics["train/steps"] == 1
    return data, before, mean_margin(policy, data, config.beta), policy


def test_one_step_raises_the_real_minus_generated_margin(world, tmp_path):
    data, before, after, _ = one_step(world, tmp_path / "a", swapped=False)
    assert before == pytest.approx(0.0, abs=1e-5)  # π_θ = π_ref: every log-ratio is 0
    assert after > before


def test_training_on_swapped_pairs_lowers_the_margin(world, tmp_path):
    straight, _, _, _ = one_step(world, tmp_path / "a", swapped=False)
    _, before, _, policy = one_step(world, tmp_path / "b", swapped=True)
    assert before == pytest.approx(0.0, abs=1e-5)
    # The swapped run's policy, measured on the straight pairs: their margin went down.
    assert mean_margin(policy, straight, 2.0) < 0.0


def test_config_round_trips_through_json_with_the_nested_gflownet_config():
    config = AlphaSpinConfig(history="all", alpha=0.5, sampler="gflownet")
    config.gflownet.learning_rate = 5e-3
    back = AlphaSpinConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert back.to_dict() == config.to_dict()
    assert back.gflownet.steps == 200 and back.gflownet.learning_rate == 5e-3
