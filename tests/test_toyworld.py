"""The tiny world: exact task table, determinism, a weak base, a far shifted policy."""

from __future__ import annotations

import math

import torch

from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.toyworld import ToyWorldConfig, build_world


def test_task_table_is_a_distribution_with_entropy_and_varied_lengths(world):
    for prompt in world.eval_prompts:
        table = world.task.table(prompt)
        assert sum(table.values()) == pytest_approx(1.0)
        assert all(len(r) <= world.max_new_tokens for r in table)
        entropy = -sum(p * math.log(p) for p in table.values() if p > 0)
        assert entropy > 1.0
        assert len({len(r) for r in table}) >= 3


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, abs=1e-12)


def test_task_requires_reading_the_prompt(world):
    a, b = world.eval_prompts[0], world.eval_prompts[1]
    assert a != b
    assert world.task.table(a) != world.task.table(b)


def test_prompt_split_is_disjoint_and_sized(world):
    assert len(world.eval_prompts) == 16
    assert not {tuple(p) for p in world.eval_prompts} & {tuple(p) for p in world.train_prompts}
    assert len(world.sft_dataset) == world.config.sft_examples
    assert set(world.sft_dataset.column_names) >= {"prompt", "response", "real"}


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
