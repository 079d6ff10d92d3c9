"""The tiny world: exact task table, determinism, a weak base, a far shifted policy."""

from __future__ import annotations

import math
import re

import pytest
import torch

from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.samples import pad_responses
from worlds.toy import ToyWorldConfig, build_world, shifted_echo_task


def _length_law(config: ToyWorldConfig, num_symbols: int) -> torch.Tensor:
    """The response length's law from the task's construction alone: each prompt symbol adds 0,
    1 or 2 tokens (skip, keep, double), the noise 0 or 1, and the cap L keeps the first L."""
    skip = 1 - config.keep_prob - config.double_prob
    law = torch.tensor([1.0], dtype=torch.float64)
    steps = [[skip, config.keep_prob, config.double_prob]] * num_symbols
    for step in [*steps, [1 - config.noise_prob, config.noise_prob]]:
        law = torch.nn.functional.conv1d(
            law.view(1, 1, -1),
            torch.tensor(step, dtype=torch.float64).flip(0).view(1, 1, -1),
            padding=len(step) - 1,
        ).view(-1)
    cap = config.max_new_tokens
    return torch.cat([law[:cap], law[cap:].sum().view(1)]) if len(law) > cap else law


def test_task_table_is_a_distribution_with_entropy_and_varied_lengths(world):
    """The table's length law is the one the construction gives (a convolution of the per-symbol
    and noise laws, cut at L), and its entropy exceeds that length law's: H(Y) ≥ H(|Y|) for any
    function of Y, with equality only if one response per length, so the strict inequality says
    the task is random beyond its lengths (a bound derived from the config, not a chosen 1.0)."""
    for prompt in world.eval_prompts:
        table = world.task.table(prompt)
        assert sum(table.values()) == pytest_approx(1.0)
        assert all(len(r) <= world.max_new_tokens for r in table)
        symbols = sum(t in world.symbol_ids for t in prompt)
        expected = _length_law(world.config, symbols)
        lengths = torch.zeros(world.max_new_tokens + 1, dtype=torch.float64)
        for response, p in table.items():
            lengths[len(response)] += p
        assert torch.allclose(lengths[: len(expected)], expected, rtol=0, atol=1e-12)
        assert float(lengths[len(expected) :].sum()) == 0.0
        entropy = -sum(p * math.log(p) for p in table.values() if p > 0)
        length_entropy = -float((expected * expected.clamp_min(1e-300).log()).sum())
        assert entropy > length_entropy + 1e-9
        assert len({len(r) for r in table}) >= 3


def pytest_approx(value: float):
    return pytest.approx(value, abs=1e-12)


def test_task_table_matches_hand_computed_probabilities(world):
    # Prompt "a b" (two distinct symbols), defaults keep 0.7, skip 0.15, double 0.15, noise 0.25
    # (a uniform symbol of 4). By hand:
    #   ()      only by skipping both, no noise:               0.15² · 0.75
    #   (a, b)  keep both, no noise, or keep a, skip b, noise b: 0.7² · 0.75 + 0.7 · 0.15 · 0.25/4
    #   (b, a)  skip a, keep b, noise a:                       0.15 · 0.7 · 0.25/4
    a, b = world.tokenizer.convert_tokens_to_ids(["a", "b"])
    table = world.task.table(world.tokenizer("a b")["input_ids"])
    assert table[()] == pytest.approx(0.15**2 * 0.75, rel=1e-12)
    assert table[(a, b)] == pytest.approx(0.7**2 * 0.75 + 0.7 * 0.15 * 0.25 / 4, rel=1e-12)
    assert table[(b, a)] == pytest.approx(0.15 * 0.7 * 0.25 / 4, rel=1e-12)
    #   (b, b, a) skip a, double b, noise a:                   0.15 · 0.15 · 0.25/4
    assert table[(b, b, a)] == pytest.approx(0.15 * 0.15 * 0.25 / 4, rel=1e-12)


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
    # Better than the uniform policy (what SFT must achieve) ...
    assert kl_base < kl_uniform, (kl_base, kl_uniform)
    # ... and worse than p_data: it leaks mass off the task's support, and the evaluator's exact
    # KL(p_data ‖ π) is at least −log π(support) (data processing onto {support, rest}).
    bounds = []
    for prompt in world.eval_prompts:
        support = list(world.task.table(prompt))
        ids, lengths = pad_responses(support, world.max_new_tokens, world.tokenizer.pad_token_id)
        with torch.no_grad():
            logp = world.base.log_prob([prompt] * len(support), ids, lengths).double()
        bounds.append(-float(torch.logsumexp(logp, 0)))
    bound = sum(bounds) / len(bounds)
    assert kl_base >= bound - 1e-6, (kl_base, bound)


def test_shifted_policy_is_far_from_the_base(world, prompt):
    base = exact_distribution(world.base, prompt, world.max_new_tokens)
    shifted = exact_distribution(world.shifted, prompt, world.max_new_tokens)
    # Fine-tuning moved the shifted policy toward the shifted task and away from the task: each
    # policy is closer (exact KL from the task's table) to the task it was trained on last.
    support = base.responses
    data = world.task.log_prob_on(prompt, base)
    shifted_data = world.shifted_task.log_prob_on(prompt, base)
    assert shifted.responses == support
    kl = {
        (task, name): divergences(table, dist.logprobs)["kl_pq"]
        for task, table in (("task", data), ("shifted task", shifted_data))
        for name, dist in (("base", base), ("shifted", shifted))
    }
    assert kl["task", "base"] < kl["task", "shifted"], kl
    assert kl["shifted task", "shifted"] < kl["shifted task", "base"], kl


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
    # The empty response has one path (skip every symbol, no noise): skip^m · (1 − noise).
    m = sum(1 for t in prompt if t in ids)
    assert base[()] == pytest.approx(0.15**m * 0.75, rel=1e-12)
    assert style[()] == pytest.approx((1 - 0.45 - 0.4) ** m * (1 - 0.45), rel=1e-12)


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
