"""The many-prompt world: its split, and its enumerated law checked by teacher forcing."""

from __future__ import annotations

import pytest
import torch

from gfn_spin.exact import exact_distribution
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.samples import pad_responses
from worlds.many_prompt import ManyPromptConfig, build_many_prompt_world

# Few SFT steps: these tests check the construction and the exactness of the law, which hold
# for any weights; the measured worlds use the defaults.
QUICK = {"sft_examples": 256, "sft_steps": 8, "shift_steps": 8}


@pytest.fixture(scope="module", params=["overlap", "stress"])
def many(request, tmp_path_factory):
    config = ManyPromptConfig(preset=request.param, **QUICK)
    return build_many_prompt_world(config, cache_dir=tmp_path_factory.mktemp("many"))


def test_split_is_fixed_disjoint_and_covers_every_prompt(many):
    fit = {tuple(p) for p in many.fit_prompts}
    new = {tuple(p) for p in many.new_prompts}
    assert len(new) == many.config.num_new_prompts == len(many.new_prompts)
    assert not fit & new
    assert len(fit | new) == 4**5 + 4**6 >= 4096
    # Neither policy was trained on a new prompt.
    sft = set(many.world.sft_data["prompt"])
    decoded = many.world.tokenizer.batch_decode(many.new_prompts, skip_special_tokens=True)
    assert not sft & {t.replace("=>", "").strip() for t in decoded}


def test_enumerated_mixture_law_matches_teacher_forcing(many):
    """The enumeration (KV cache, level by level) against full teacher-forced passes of every
    response through each component, normalized by a log-sum-exp over the enumerated set."""
    world = many.world
    prompt = many.new_prompts[3]
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    law = exact_distribution(target, prompt, many.max_new_tokens)
    assert len(law.responses) == sum(4**k for k in range(many.max_new_tokens + 1))
    ids, lengths = pad_responses(law.responses, many.max_new_tokens, world.base.pad_token_id)
    rows = [prompt] * len(law.responses)
    with torch.no_grad():
        logp = sum(
            0.5 * c.log_prob(rows, ids, lengths).double() for c in (world.base, world.shifted)
        )
    reference = logp - torch.logsumexp(logp, 0)
    # float32 log-softmax: relative error 2^-24 per entry, |log p| < 50 per token, 7 factors
    # per component and response: about 50 · 7 · 2 · 6e-8 < 5e-5 per log-probability.
    assert (law.logprobs - reference).abs().max().item() < 5e-5
    assert abs(law.log_z - float(torch.logsumexp(logp, 0))) < 5e-5


def test_policies_read_the_whole_prompt(many):
    """Changing only the first prompt symbol changes the law of the response's last step: the
    models attend to the whole prompt (full attention, no bounded context)."""
    world = many.world
    prompt = next(p for p in many.new_prompts if len(p) == 8)  # [BOS], 6 symbols, =>
    other = list(prompt)
    symbols = world.symbol_ids
    other[1] = symbols[(symbols.index(prompt[1]) + 1) % len(symbols)]
    response = torch.tensor([[prompt[2], prompt[3], prompt[4], prompt[5], prompt[6]]])
    with torch.no_grad():
        steps = [
            world.base.step_logprobs([p], response, torch.tensor([5]))[0, 5]
            for p in (prompt, other)
        ]
    allowed = symbols + [world.base.eos_token_id]
    assert (steps[0][allowed] - steps[1][allowed]).abs().max().item() > 1e-3
