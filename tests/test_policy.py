"""Policy: token scores against HF's own logits, padding invariance, adapters, loading, prompts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from gfn_spin import Policy
from gfn_spin.adapters import default_lora_config, route
from gfn_spin.data import encode_example, uses_chat_template
from gfn_spin.samples import ancestral_sample
from worlds.toy import numbered_tokenizer


def _responses(rows: list[list[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])


@pytest.fixture(scope="module")
def raw_policy(world):
    """The base model without a response-vocabulary restriction (HF's plain softmax)."""
    return Policy(world.base.model, world.tokenizer)


def test_token_scores_equal_hf_log_softmax(world, raw_policy):
    prompts = world.eval_prompts[:3]
    rows = [[5, 6, 7], [], [8, 8, 8, 8, 8, 8, 8]]
    width = 7
    ids, lengths = _responses(rows, width, world.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = raw_policy.score(prompts, ids, lengths)
    eos = world.tokenizer.eos_token_id
    for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        full = torch.tensor([prompt + row])
        # Through the adapter the policy reads (none): the session's shared model may carry
        # adapters other tests added, which a bare call would apply.
        with torch.no_grad(), route(world.base.model, world.base.adapter):
            logp = torch.log_softmax(world.base.model(input_ids=full).logits[0].float(), -1)
        for k in range(width):
            state = len(prompt) - 1 + k
            expected_token = logp[state, row[k]] if k < len(row) else torch.tensor(0.0)
            torch.testing.assert_close(
                scores.token_logprobs[b, k], expected_token, atol=1e-5, rtol=0
            )
        for k in range(width + 1):
            state = len(prompt) - 1 + k
            expected_eos = logp[state, eos] if k <= len(row) and k < width else torch.tensor(0.0)
            torch.testing.assert_close(scores.eos_logprobs[b, k], expected_eos, atol=1e-5, rtol=0)


def test_scores_do_not_depend_on_batch_composition(world):
    policy = world.base
    short, long_prompt = world.eval_prompts[0], max(world.eval_prompts, key=len)
    ids, lengths = _responses([[5, 6], [7, 8, 5, 6, 7, 8, 5], []], 7, policy.pad_token_id)
    with torch.no_grad():
        alone = policy.score([short], ids[:1], lengths[:1])
        mixed = policy.score([short, long_prompt, long_prompt], ids, lengths)
    torch.testing.assert_close(mixed.token_logprobs[:1], alone.token_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.eos_logprobs[:1], alone.eos_logprobs, atol=1e-5, rtol=0)


def test_incremental_decoding_matches_teacher_forcing(world):
    """start/advance with left padding and the KV cache give the teacher-forced scores."""
    policy = world.base
    prompts = [world.eval_prompts[0], max(world.eval_prompts, key=len)]
    tokens = torch.tensor([[5, 6, 7], [8, 8, 5]])
    with torch.no_grad():
        state = policy.start(prompts)
        stepwise = [state.next_logprobs]
        for k in range(tokens.shape[1]):
            state = policy.advance(state, tokens[:, k])
            stepwise.append(state.next_logprobs)
        forced = policy.step_logprobs(prompts, tokens, torch.tensor([3, 3]))
    torch.testing.assert_close(torch.stack(stepwise, 1), forced[:, :4], atol=1e-5, rtol=0)


def test_prefix_terminal_logprobs(world, prompt):
    policy = world.base
    ids, lengths = _responses([[5, 6, 7]], 7, policy.pad_token_id)
    with torch.no_grad():
        scores = policy.score([prompt], ids, lengths)
        for k in range(4):
            prefix_ids, prefix_len = _responses([[5, 6, 7][:k]], 7, policy.pad_token_id)
            whole = policy.log_prob([prompt], prefix_ids, prefix_len)
            torch.testing.assert_close(
                scores.prefix_terminal_logprobs()[0, k], whole[0], atol=1e-5, rtol=0
            )
    assert torch.isinf(scores.prefix_terminal_logprobs()[0, 4:]).all()


def test_prompts_as_ids_are_used_exactly_and_strings_are_tokenized(world):
    policy = world.base
    ids = [1, 5, 6, 4]
    assert policy.encode_prompts([ids]) == [ids]
    assert policy.encode_prompts(["a b"]) == [ids]
    # The tiny world's chat template spells the plain encoding, so its results do not depend
    # on the default (the chat template whenever the tokenizer has one).
    assert policy.chat_template
    plain = Policy(policy.model, world.tokenizer, chat_template=False)
    assert plain.encode_prompts(["a b"]) == policy.encode_prompts(["a b"]) == [ids]
    with pytest.raises(TypeError, match="not a str"):
        policy.encode_prompts("a b")


def test_one_rule_encodes_string_prompts_for_the_library_and_self_play(world):
    plain = numbered_tokenizer(8)
    assert not uses_chat_template(plain) and uses_chat_template(world.tokenizer)
    assert not uses_chat_template(world.tokenizer, False)
    with pytest.raises(ValueError, match="no chat template"):
        uses_chat_template(plain, True)
    templated = copy.deepcopy(world.tokenizer)
    templated.chat_template = "{% for m in messages %}[BOS] b {{ m['content'] }} =>{% endfor %}"
    policy = Policy(world.base.model, templated)
    assert policy.encode_prompts(["a"]) == [encode_example(templated, "a")[0]]
    assert policy.encode_prompts(["a"]) == [templated("b a")["input_ids"]]
    assert Policy(world.base.model, templated, chat_template=False).encode_prompts(["a"]) == [
        templated("a")["input_ids"]
    ]


def test_sampling_is_seeded_and_respects_the_cap(world, prompt):
    first = world.base.sample([prompt], 64, max_new_tokens=3, generator=7)
    again = ancestral_sample(world.base, [prompt], 64, max_new_tokens=3, generator=7)
    assert torch.equal(first.response_ids, again.response_ids)
    assert int(first.lengths.max()) <= 3
    assert (first.lengths == 3).any(), "some draws should reach the forced stop at the cap"
    assert first.stats["tokens"] > 0


def test_adapters_share_weights_and_base_view_ignores_them(world, prompt):
    policy = world.load_policy("base")
    ids, lengths = _responses([[5, 6, 7], [8]], 7, policy.pad_token_id)
    with torch.no_grad():
        before = policy.log_prob([prompt, prompt], ids, lengths)
    trained = policy.add_adapter("iter1", default_lora_config(rank=4))
    with torch.no_grad():
        for name, param in trained.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    base_view = trained.with_adapter(None)
    with torch.no_grad():
        torch.testing.assert_close(policy.log_prob([prompt, prompt], ids, lengths), before)
        torch.testing.assert_close(base_view.log_prob([prompt, prompt], ids, lengths), before)
        assert not torch.allclose(trained.log_prob([prompt, prompt], ids, lengths), before)
    # Scoring through other views must not change which weights are trainable.
    flags = {n: p.requires_grad for n, p in trained.model.named_parameters()}
    assert any(flags.values())
    second = trained.with_adapter(None).add_adapter("iter2", default_lora_config(rank=4))
    with torch.no_grad():
        second.log_prob([prompt], ids[:1], lengths[:1])
        base_view.log_prob([prompt], ids[:1], lengths[:1])
    for name, param in trained.model.named_parameters():
        if ".iter1." in name:
            assert param.requires_grad == flags[name], name
    with pytest.raises(ValueError, match="not loaded"):
        trained.with_adapter("missing")


def test_adapter_save_and_load_round_trip(world, prompt, tmp_path):
    policy = world.load_policy("base")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trained = policy.add_adapter("iter1", default_lora_config(rank=4))
    with torch.no_grad():
        for name, param in trained.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.3)
    trained.save_pretrained(tmp_path / "iter1")
    with warnings.catch_warnings(record=True) as seen_loading:
        warnings.simplefilter("always")
        fresh = Policy.from_pretrained(
            world.directory / "base",
            adapter=tmp_path / "iter1",
            allowed_token_ids=world.symbol_ids,
            device="cpu",
        )
    # peft reads transformers' deprecated is_gradient_checkpointing when it wraps a model:
    # a warning its user can do nothing about, silenced where the toolkit wraps.
    assert not [w for w in seen + seen_loading if issubclass(w.category, FutureWarning)]
    ids, lengths = _responses([[5, 6, 7]], 7, policy.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.log_prob([prompt], ids, lengths), trained.log_prob([prompt], ids, lengths)
        )


def test_from_pretrained_local_directory_and_missing_path(world, tmp_path):
    loaded = Policy.from_pretrained(world.directory / "base", device="cpu")
    assert isinstance(
        loaded.model, type(AutoModelForCausalLM.from_pretrained(world.directory / "base"))
    )
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        Policy.from_pretrained(tmp_path / "does-not-exist")


def test_tokenizer_without_eos_is_refused_and_missing_pad_falls_back(world):
    tokenizer = world.tokenizer.__class__.from_pretrained(world.directory / "base")
    tokenizer.pad_token = None
    policy = Policy(world.base.model, tokenizer)
    assert policy.pad_token_id == policy.eos_token_id
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        Policy(world.base.model, tokenizer)


def test_prompt_longer_than_context_is_refused(world):
    too_long = [1] + [5] * 40 + [4]
    with pytest.raises(ValueError, match="context"):
        ancestral_sample(world.base, [too_long], 1, max_new_tokens=4)


def test_lora_targets_cover_gpt2_conv1d_layers():
    """GPT-2 projections are transformers' Conv1D, not nn.Linear: LoRA must still reach them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gfn_spin.adapters import lora_target_modules

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=1)
    )
    assert lora_target_modules(model, output_layer=True) == ["c_attn", "c_fc", "c_proj", "lm_head"]
    assert lora_target_modules(model, output_layer=False) == "all-linear"
