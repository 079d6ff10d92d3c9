"""The tiny world: exact task table, determinism, a weak base, a far shifted policy."""

from __future__ import annotations

import math
import re

import pytest
import torch

from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.toyworld import ToyWorldConfig, build_world, shifted_echo_task


def test_task_table_is_a_distribution_with_entropy_and_varied_lengths(world):
    for prompt in world.eval_prompts:
        table = world.task.table(prompt)
        assert sum(table.values()) == pytest_approx(1.0)
        assert all(len(r) <= world.max_new_tokens for r in table)
        entropy = -sum(p * math.log(p) for p in table.values() if p > 0)
        assert entropy > 1.0
        assert len({len(r) for r in table}) >= 3


def pytest_approx(value: float):
    return pytest.approx(value, abs=1e-12)


def test_task_requires_reading_the_prompt(world):
    a, b = world.eval_prompts[0], world.eval_prompts[1]
    assert a != b
    assert world.task.table(a) != world.task.table(b)


def test_prompt_split_is_disjoint_and_sized(world):
    assert len(world.eval_prompts) == 16
    assert not {tuple(p) for p in world.eval_prompts} & {tuple(p) for p in world.train_prompts}
    assert all(len(column) == world.config.sft_examples for column in world.sft_data.values())
    assert set(world.sft_data) >= {"prompt", "response", "real"}


def test_base_is_weak_but_better_than_uniform(world):
    uniform = type(world.base)(
        _UniformModel(world.base.vocab_size), world.tokenizer, allowed_token_ids=world.symbol_ids
    )
    kl_base = world.kl_from_data(world.base)
    kl_uniform = world.kl_from_data(uniform)
    # "Clearly" better than uniform and clearly worse than p_data (whose KL is 0).
    assert kl_base < 0.5 * kl_uniform, (kl_base, kl_uniform)
    assert kl_base > 0.5, kl_base


def test_shifted_policy_is_far_from_the_base(world, prompt):
    base = exact_distribution(world.base, prompt, world.max_new_tokens)
    shifted = exact_distribution(world.shifted, prompt, world.max_new_tokens)
    assert divergences(base.logprobs, shifted.logprobs)["tv"] > 0.5


def test_build_is_deterministic_and_cached(world, tmp_path):
    again = build_world(ToyWorldConfig(), cache_dir=tmp_path)
    for (name, a), (_, b) in zip(
        world.base.model.state_dict().items(), again.base.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.eval_prompts == world.eval_prompts
    cached = build_world(ToyWorldConfig(), cache_dir=tmp_path)
    assert (tmp_path / ToyWorldConfig().key() / "world.json").exists()
    assert cached.directory == again.directory


def test_shift_rules_rotate_symbols_or_reweight_the_same_responses(world):
    ids, prompt = world.symbol_ids, world.eval_prompts[0]
    base = world.task.table(prompt)
    symbol = shifted_echo_task(ToyWorldConfig(), ids).table(prompt)
    style = shifted_echo_task(ToyWorldConfig(shift_rule="style"), ids).table(prompt)
    rotate = dict(zip(ids, ids[1:] + ids[:1], strict=True))
    assert symbol == {tuple(rotate[t] for t in r): pytest.approx(p) for r, p in base.items()}
    assert set(style) == set(base) and sum(style.values()) == pytest.approx(1.0)
    tv = 0.5 * sum(abs(style[r] - base[r]) for r in base)
    assert tv > 0.2, tv


def test_style_world_fine_tunes_toward_the_style_task(tmp_path):
    config = ToyWorldConfig(shift_rule="style", sft_examples=16, sft_steps=1, shift_steps=1)
    assert config.key() != ToyWorldConfig().key()
    small = build_world(config, cache_dir=tmp_path)
    prompt = small.eval_prompts[0]
    assert small.shifted_task.table(prompt) == shifted_echo_task(config, small.symbol_ids).table(
        prompt
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"shift_rule": "rotate"}, "shift_rule='rotate' must be one of"),
        ({"keep_prob": 0.9}, "keep_prob=0.9, double_prob=0.15"),
        ({"shifted_noise_prob": 1.5}, "shifted_noise_prob=1.5"),
    ],
)
def test_bad_world_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ToyWorldConfig(**settings)


class _UniformModel(torch.nn.Module):
    """A stand-in causal LM with constant logits (the uniform policy)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(1, vocab, bias=False)
        torch.nn.init.zeros_(self.head.weight)
        self.config = type("Config", (), {"max_position_embeddings": 64})()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, cache=None, logits_to_keep=0, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.head.out_features)
        return type("Out", (), {"logits": logits, "cache": _NoCache()})()


class _NoCache:
    def __iter__(self):
        return iter(())
