"""GFlowNetSampler: checked against enumeration, hooks on the model, and a resumed run.

Each test builds its own copy of π_t (``world.load_policy``), because adding an adapter wraps
the model in place and the session's ``world.shifted`` is shared with other tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gfn_spin import ArithmeticMixture, GeometricMixture, LocalProduct
from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.scores import position_mask
from samplers import GFlowNetSampler, ImportanceResampler, SMCSampler
from samplers.gflownet import (
    PARAMETRIZATIONS,
    GFlowNetConfig,
    GFlowNetTrainer,
    latest_checkpoint,
)
from samplers.replay import ReplayBuffer
from samplers.weighting import model_tokens
from tests.containers import tensors

L = 7
FAST = {"prompts_per_step": 4, "samples_per_prompt": 4, "warmup_steps": 1}


def _setup(world, alpha: float = 0.5):
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [1 - alpha, alpha])
    return shifted, target


def _batch(world, prompt, count: int = 6, seed: int = 0):
    from gfn_spin.samples import ancestral_sample

    samples = ancestral_sample(world.base, [prompt], count, max_new_tokens=L, generator=seed)
    return [prompt] * count, samples.response_ids, samples.lengths


def test_target_is_not_trivial(world):
    """≥ 10^4 responses per prompt, and the α = 0.5 target is neither component.

    The geometric mixtures p_α ∝ base^(1−α)·π_t^α are an exponential family in α, so
    ``KL(p_α‖base)`` grows strictly with α (its derivative is ``α·Var_{p_α}[log π_t − log
    base]``, zero only where π_t = base) and ``KL(p_α‖π_t)`` falls strictly to 0 at α = 1.
    Checked on α ∈ {0, 0.25, 0.5} (and mirrored), with α = 0 (and 1) as the control that
    reads 0: the target sits strictly between two different policies. The tests that fit
    toward it compare exact divergences (no noise), so a strict gap is what they need; a
    chosen TV floor would add nothing derived."""
    prompts = sorted(world.eval_prompts, key=len)
    for prompt in (prompts[0], prompts[-1]):
        base = exact_distribution(world.base, prompt, L)
        shifted = exact_distribution(world.shifted, prompt, L)
        assert base.responses == shifted.responses
        assert len(base.responses) >= 10**4
        target = torch.log_softmax(0.5 * base.logprobs + 0.5 * shifted.logprobs, 0)
        # The shortcut above is the geometric mixture itself (checked against its enumeration).
        mixture = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
        direct = exact_distribution(mixture, prompt, L)
        assert torch.allclose(direct.logprobs, target, atol=1e-9)

        laws = {
            alpha: torch.log_softmax((1 - alpha) * base.logprobs + alpha * shifted.logprobs, 0)
            for alpha in (0.0, 0.25, 0.5, 0.75, 1.0)
        }
        from_base = [divergences(laws[a], base.logprobs)["kl_pq"] for a in (0.0, 0.25, 0.5)]
        from_shifted = [divergences(laws[a], shifted.logprobs)["kl_pq"] for a in (1.0, 0.75, 0.5)]
        for kls in (from_base, from_shifted):
            assert abs(kls[0]) < 1e-12  # the control: the component itself
            assert kls[0] < kls[1] < kls[2], kls


@pytest.mark.parametrize("parametrization", ["lora", "residual"])
def test_components_are_never_affected_by_the_adapter(world, parametrization):
    """π_t is both the init policy and a target component: training must not move the target."""
    shifted, target = _setup(world)
    prompt = world.eval_prompts[0]
    rows, ids, lengths = _batch(world, prompt)
    with torch.no_grad():
        before_target = target.log_prob(rows, ids, lengths)
        before_shifted = shifted.log_prob(rows, ids, lengths)
    sampler = GFlowNetSampler(
        target,
        shifted,
        max_new_tokens=L,
        parametrization=parametrization,
        learning_rate=1e-2,
        **FAST,
    )
    with torch.no_grad():
        before_policy = sampler.policy.log_prob(rows, ids, lengths)
    sampler.fit(world.train_prompts[:8], steps=5, progress=False)
    with torch.no_grad():
        after_policy = sampler.policy.log_prob(rows, ids, lengths)
        assert torch.equal(target.log_prob(rows, ids, lengths), before_target)
        assert torch.equal(shifted.log_prob(rows, ids, lengths), before_shifted)
    assert not torch.allclose(after_policy, before_policy, atol=1e-4)  # the adapter did train
    # Scoring the frozen components never flips the adapter's trainability either.
    assert all(p.requires_grad for p in sampler.trainable_parameters)


@pytest.mark.parametrize("parametrization", ["lora", "residual"])
def test_adapter_stacks_on_an_init_that_reads_an_adapter(world, tmp_path, parametrization):
    """π_t is a LoRA iterate (as in α-SPIN): the GFlowNet starts from it and leaves it alone."""
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        iterate = shifted.add_adapter("iter_1")
        with torch.no_grad():  # a nonzero iterate, so that reading it or not makes a difference
            for name, param in iterate.model.named_parameters():
                if ".iter_1." in name:
                    param.add_(0.1 * torch.randn_like(param))
                    param.requires_grad_(False)
    iterate_weights = {n: p.clone() for n, p in iterate.model.named_parameters() if ".iter_1." in n}
    target = GeometricMixture([world.base, iterate], [0.5, 0.5])
    rows, ids, lengths = _batch(world, world.eval_prompts[0])
    with torch.no_grad():
        before_iterate = iterate.log_prob(rows, ids, lengths)
        assert not torch.allclose(before_iterate, shifted.log_prob(rows, ids, lengths), atol=1e-3)
    sampler = GFlowNetSampler(
        target, iterate, max_new_tokens=L, parametrization=parametrization, **FAST
    )
    assert sampler.adapter_policy.adapter == ("iter_1", sampler.config.adapter_name)
    start = iterate if parametrization == "lora" else target.local_product()
    with torch.no_grad():  # the new adapter starts at zero: the policy starts at its init
        torch.testing.assert_close(
            sampler.policy.log_prob(rows, ids, lengths), start.log_prob(rows, ids, lengths)
        )
    sampler.fit(world.train_prompts[:8], steps=5, progress=False)
    with torch.no_grad():
        assert torch.equal(iterate.log_prob(rows, ids, lengths), before_iterate)
        moved = sampler.policy.log_prob(rows, ids, lengths) - start.log_prob(rows, ids, lengths)
    assert moved.abs().max() > 1e-4  # the stacked adapter did train
    for name, param in iterate.model.named_parameters():
        if name in iterate_weights:
            assert torch.equal(param, iterate_weights[name]), name
    with pytest.raises(ValueError, match="stacked adapters"):
        sampler.adapter_policy.save_pretrained(tmp_path / "stacked")
    assert not (tmp_path / "stacked").exists()


def _model_calls(sampler, models, prompts) -> list[tuple[bool, int]]:
    """(gradients enabled, input width) of every forward of ``models`` in one training step."""
    calls: list[tuple[bool, int]] = []

    def record(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append((torch.is_grad_enabled(), ids.shape[1]))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in models]
    try:
        sampler.train_step(prompts)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_twist_training_step_runs_the_models_without_gradients(world):
    """The twist form learns from what the rollout computed: with one head update per rollout
    every model call is a no-grad decoding call (one prefill per distinct prompt, then one
    token at a time); a stored batch used again adds no model pass at all (its step scores
    come from its stored features through the LM heads), and never a gradient in a model."""
    shifted, target = _setup(world)
    calls, heads = {}, {}
    for updates in (1, 2):
        sampler = GFlowNetSampler(
            target,
            shifted,
            max_new_tokens=L,
            parametrization="twist",
            twist_updates=updates,
            **FAST,
        )
        before = [p.detach().clone() for p in sampler.head.parameters()]
        models = (shifted.model, world.base.model)
        calls[updates] = _model_calls(sampler, models, world.train_prompts[:4])
        heads[updates] = any(
            not torch.equal(a, b) for a, b in zip(before, sampler.head.parameters(), strict=True)
        )
    assert heads == {1: True, 2: True}
    decoding, more = calls[1], calls[2]
    assert not any(grad for grad, _ in more), more
    # Two prefills (one per component), then single tokens only: no teacher-forced pass.
    assert len(decoding) > 2 and all(width > 1 for _, width in decoding[:2]), decoding
    assert all(width == 1 for _, width in decoding[2:]), decoding
    # The same rollout (same seed), and nothing more for the stored batch.
    assert more == decoding


def test_training_step_carries_no_gradient_through_sampling(world):
    """Only the teacher-forced pass runs with gradients; decoding never does."""
    shifted, target = _setup(world)
    sampler = GFlowNetSampler(
        target, shifted, max_new_tokens=L, parametrization="residual", explore_prob=1.0, **FAST
    )
    calls = _model_calls(sampler, (shifted.model, world.base.model), world.train_prompts[:4])
    with_grad = [width for grad, width in calls if grad]
    # The teacher-forced pass: the batch's distinct prompts (the 4 samples of a prompt share
    # one prefill), then every response at once; never one token at a time.
    assert len(with_grad) == 2, calls
    assert with_grad[1] >= L and min(with_grad) > 1, calls
    assert sum(1 for c in calls if c[1] == 1) >= 1  # incremental decoding happened, without grad


def test_residual_policy_starts_at_the_local_product_and_is_normalized(world):
    shifted, target = _setup(world)
    sampler = GFlowNetSampler(target, shifted, max_new_tokens=L, parametrization="residual")
    prompt = world.eval_prompts[1]
    local = exact_distribution(LocalProduct([world.base, shifted], [0.5, 0.5]), prompt, L)
    with torch.no_grad():  # a nonzero adapter, so that the correction term is exercised
        for param in sampler.trainable_parameters:
            param.add_(0.05 * torch.randn_like(param))
    residual = exact_distribution(sampler.policy, prompt, L)
    assert abs(residual.log_z) < 1e-5  # normalized: the enumerated mass is one
    assert divergences(local.logprobs, residual.logprobs)["tv"] > 1e-3
    # Teacher-forced scores agree with the step-by-step density used for sampling.
    index = residual.index()
    rows, ids, lengths = _batch(world, prompt, 8)
    with torch.no_grad():
        scored = sampler.policy.log_prob(rows, ids, lengths).double()
    keys = [tuple(r[:n].tolist()) for r, n in zip(ids, lengths.tolist(), strict=True)]
    expected = residual.logprobs[[index[k] for k in keys]]
    assert torch.allclose(scored, expected, atol=1e-4)
    with torch.no_grad():  # back to a zero adapter: exactly the local product
        for name, param in shifted.model.named_parameters():
            if "lora_B" in name:
                param.zero_()
    again = exact_distribution(sampler.policy, prompt, L)
    assert torch.allclose(again.logprobs, local.logprobs, atol=1e-5)


def _fit_divergences(world, fit_alpha: float, prompt, reference) -> tuple[dict, dict, list]:
    """Exact divergences of ``reference`` (log-probs) to the GFlowNet's law before and after a
    short fit toward the geometric mixture at ``fit_alpha``, from π_t, on one prompt."""
    shifted, target = _setup(world, fit_alpha)
    sampler = GFlowNetSampler(
        target,
        shifted,
        max_new_tokens=L,
        parametrization="lora",
        learning_rate=3e-3,
        eval_every=20,
        eval_samples=16,
        prompts_per_step=1,
        samples_per_prompt=32,
        warmup_steps=5,
        seed=0,
    )
    before = divergences(reference, exact_distribution(sampler.policy, prompt, L).logprobs)
    metrics = sampler.fit([prompt], steps=60, progress=False)
    after = divergences(reference, exact_distribution(sampler.policy, prompt, L).logprobs)
    return before, after, metrics


def test_adafactor_fits_the_twist_with_a_checkpoint_the_size_of_its_weights(world, tmp_path):
    """With ``optimizer="adafactor"`` the twist fit still lowers the exact TV to the target
    (enumerated: the direction is the check), and its optimizer state is a row and a column per
    weight matrix: under a tenth of the head's weights, where AdamW's is twice them."""
    prompt = world.eval_prompts[0]
    shifted, target = _setup(world)
    exact = exact_distribution(target, prompt, L).logprobs
    sampler = GFlowNetSampler(
        target, shifted, max_new_tokens=L, parametrization="twist", optimizer="adafactor",
        learning_rate=1e-2, **FAST,
    )  # fmt: skip
    before = divergences(exact, exact_distribution(sampler.policy, prompt, L).logprobs)
    sampler.fit([prompt], steps=40, progress=False)
    after = divergences(exact, exact_distribution(sampler.policy, prompt, L).logprobs)
    assert after["tv"] < 0.8 * before["tv"]
    weights = sum(p.numel() for p in sampler.weights.trainable_parameters)
    moments = sum(t.numel() for t in tensors(sampler.optimizer.state_dict()["state"]))
    assert moments < weights / 10


def test_fit_moves_the_policy_toward_the_target(world):
    """A short fit on one prompt lowers the exact TV and KL to the geometric mixture
    (enumerated, so no noise: the direction alone is the check). The control, the same fit
    toward α = 1.5 (past π_t, away from the α = 0.5 mixture), must not lower them: a decrease
    that any fit would show is not evidence of fitting the target."""
    prompt = world.eval_prompts[0]
    exact = exact_distribution(_setup(world)[1], prompt, L).logprobs
    before, after, metrics = _fit_divergences(world, 0.5, prompt, exact)
    assert after["tv"] < before["tv"] and after["kl_pq"] < before["kl_pq"]
    assert metrics[-1]["step"] == 60 and "ess_fraction" in metrics[-1] and "loss" in metrics[-1]
    control_before, control_after, _ = _fit_divergences(world, 1.5, prompt, exact)
    assert control_before == before  # the same init
    assert control_after["tv"] >= control_before["tv"]
    assert control_after["kl_pq"] >= control_before["kl_pq"]


def test_sample_has_exact_log_q_and_serves_as_proposal(world):
    shifted, target = _setup(world)
    sampler = GFlowNetSampler(target, shifted, max_new_tokens=L)
    prompts = world.eval_prompts[:2]
    samples = sampler.sample(prompts, 5, generator=3)
    assert len(samples) == 10 and samples.log_q is not None
    with torch.no_grad():
        rows = [prompts[i] for i in samples.prompt_index.tolist()]
        scored = sampler.policy.log_prob(rows, samples.response_ids, samples.lengths)
        assert torch.allclose(samples.log_q, scored, atol=1e-4)
        assert torch.allclose(
            samples.log_target, target.log_prob(rows, samples.response_ids, samples.lengths)
        )
    assert len(samples.stats["ess"]) == 2 and len(samples.stats["log_z"]) == 2
    assert samples.stats["tokens"] > 0
    again = sampler.sample(prompts, 5, generator=3)
    assert torch.equal(again.response_ids, samples.response_ids)
    assert sampler.policy.normalized
    sir = ImportanceResampler(target, sampler.policy, 4, max_new_tokens=L).sample(prompts, 3)
    smc = SMCSampler(target, 8, proposal=sampler.policy, max_new_tokens=L).sample(prompts, 2)
    assert len(sir) == 6 and len(smc) == 4


@pytest.mark.parametrize("parametrization", ["lora", "residual"])
def test_save_and_load_round_trip(world, tmp_path, parametrization):
    shifted, target = _setup(world)
    sampler = GFlowNetSampler(
        target,
        shifted,
        max_new_tokens=L,
        parametrization=parametrization,
        learning_rate=1e-2,
        **FAST,
    )
    sampler.fit(world.train_prompts[:4], steps=3, progress=False)
    path = sampler.save(tmp_path / "gfn")
    assert (path / "adapter_config.json").is_file()
    assert (path / "adapter_model.safetensors").is_file()
    assert (
        json.loads((path / "gflownet_config.json").read_text())["parametrization"]
        == parametrization
    )
    fresh, fresh_target = _setup(world)
    loaded = GFlowNetSampler.load(path, fresh_target, fresh)
    assert loaded.config == sampler.config
    rows, ids, lengths = _batch(world, world.eval_prompts[2])
    with torch.no_grad():
        assert torch.allclose(
            loaded.policy.log_prob(rows, ids, lengths), sampler.policy.log_prob(rows, ids, lengths)
        )
    # The peft-format adapter also loads as a plain policy adapter (LoRA parametrization),
    # through from_pretrained(adapter=...), and HF generate serves it (one pass per token).
    if parametrization == "lora":
        plain = world.load_policy("shifted", device="cpu", dtype=torch.float32)
        reader = plain.load_adapter(path, "gfn")
        served = world.load_policy("shifted", device="cpu", dtype=torch.float32, adapter=path)
        with torch.no_grad():
            for policy in (reader, served):
                assert torch.allclose(
                    policy.log_prob(rows, ids, lengths),
                    sampler.policy.log_prob(rows, ids, lengths),
                    atol=1e-5,
                )
            prompt = torch.tensor([world.eval_prompts[2]])
            greedy = served.model.generate(
                prompt, max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(prompt)
            )[0, -1]
            first = sampler.policy.start([world.eval_prompts[2]]).next_logprobs[0]
            # generate reads the full vocabulary; the policy masks non-symbols to -inf.
            logits = served.model(prompt).logits[0, -1]
            assert int(greedy) == int(logits.argmax())
            assert torch.allclose(
                torch.log_softmax(served._masked(logits[None]), -1)[0], first, atol=1e-5
            )


@pytest.mark.parametrize(
    ("parametrization", "optimizer"),
    [("residual", "adamw"), ("twist", "adamw"), ("twist", "adafactor")],
)
def test_interrupted_fit_resumes_to_the_same_result(
    world, tmp_path, monkeypatch, parametrization, optimizer
):
    """Checkpoints are atomic; an interrupted fit resumed from one equals an uninterrupted fit
    (for the twist form, its buffer of stored batches is part of the checkpoint; with
    Adafactor, its factored moments)."""
    config = GFlowNetConfig(
        max_new_tokens=L,
        checkpoint_every=2,
        replay_prob=0.5,
        learning_rate=1e-2,
        parametrization=parametrization,
        optimizer=optimizer,
        twist_updates=3,
        **FAST,
    )
    prompts = world.train_prompts[:6]
    shifted, target = _setup(world)
    reference = GFlowNetSampler(target, shifted, config)
    reference.fit(prompts, steps=6, progress=False)

    shifted2, target2 = _setup(world)
    interrupted = GFlowNetSampler(target2, shifted2, config)
    original = GFlowNetTrainer.train_step
    count = {"n": 0}

    def flaky(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GFlowNetTrainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(prompts, steps=6, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(GFlowNetTrainer, "train_step", original)
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    shifted3, target3 = _setup(world)
    resumed = GFlowNetSampler(target3, shifted3, config)
    resumed.fit(prompts, steps=6, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.state.step == 6
    rows, ids, lengths = _batch(world, world.eval_prompts[0])
    with torch.no_grad():
        assert torch.allclose(
            resumed.policy.log_prob(rows, ids, lengths),
            reference.policy.log_prob(rows, ids, lengths),
            atol=1e-5,
        )
    assert [m["loss"] for m in resumed.metrics] == pytest.approx(
        [m["loss"] for m in reference.metrics], rel=1e-4
    )


def test_bad_settings_fail_before_any_work(world):
    shifted, target = _setup(world)
    with pytest.raises(ValueError, match="parametrization"):
        GFlowNetSampler(target, shifted, max_new_tokens=L, parametrization="mlp")
    with pytest.raises(ValueError, match="residual"):
        GFlowNetSampler(world.base, shifted, max_new_tokens=L, parametrization="residual")
    assert GFlowNetSampler(target, shifted, max_new_tokens=L).parametrization == "twist"
    history = GeometricMixture(
        [world.base, ArithmeticMixture([world.base, shifted], [0.5, 0.5])], [0.5, 0.5]
    )
    assert (
        GFlowNetSampler(history, shifted, max_new_tokens=L, adapter_name="h").parametrization
        == "residual"
    )
    auto = GFlowNetSampler(world.base, shifted, max_new_tokens=L, adapter_name="other")
    assert auto.parametrization == "lora"  # a policy target has no local product
    with pytest.raises(ValueError, match="explore_temperature"):
        GFlowNetConfig(explore_temperature=(2.0, 0.5))
    with pytest.raises(ValueError, match="loss='db' must be one of"):
        GFlowNetConfig(loss="db")
    with pytest.raises(ValueError, match="termination_gradient='none' must be one of"):
        GFlowNetConfig(termination_gradient="none")
    with pytest.raises(ValueError, match="twist_updates=0 must be"):
        GFlowNetConfig(twist_updates=0)
    with pytest.raises(TypeError, match="every component must be a gfn_spin.Policy"):
        GFlowNetSampler(history, shifted, max_new_tokens=L, parametrization="twist")
    with pytest.raises(ValueError, match="teacher must be a normalized density"):
        auto.fit(world.train_prompts[:2], steps=1, teacher=target, progress=False)
    with pytest.raises(ValueError, match="resume"):
        auto.fit(world.train_prompts, resume=True)
    with pytest.raises(FileNotFoundError):
        GFlowNetSampler.load("/nonexistent/dir", target, shifted)


def test_replay_buffer_keeps_the_best_distinct_responses():
    import random

    buffer = ReplayBuffer(capacity=2)
    buffer.add(
        [[1], [1], [1], [1], [2]],
        [(5,), (6,), (5,), (7,), (5,)],
        [-3.0, -1.0, -3.0, -2.0, float("-inf")],
    )
    assert buffer.prompts() == [(1,)]
    assert set(buffer.sample([1], 50, random.Random(0))) == {(6,), (7,)}
    restored = ReplayBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.state_dict() == buffer.state_dict()


def test_a_fresh_fit_refuses_a_checkpoint_dir_holding_another_fit(world, tmp_path):
    """Starting afresh into a folder with a fit's checkpoints would replace them: refused,
    naming the folder and the two ways on; the earlier checkpoint is left as it was."""
    shifted, target = _setup(world)
    config = GFlowNetConfig(max_new_tokens=L, **FAST)
    GFlowNetSampler(target, shifted, config).fit(
        world.train_prompts[:4], steps=1, checkpoint_dir=tmp_path, progress=False
    )
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "step_0000001").iterdir()}
    other = GFlowNetSampler(target, shifted, config, learning_rate=1e-2, adapter_name="other")
    with pytest.raises(ValueError, match="already holds a GFlowNet fit.*resume=True.*new"):
        other.fit(world.train_prompts[:4], steps=2, checkpoint_dir=tmp_path, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "step_0000001").iterdir()}
    assert after == before


def _doc_example() -> str:
    """The code block of docs/gflownet.md's "Adding a parametrization" section."""
    text = (Path(__file__).parents[1] / "docs" / "gflownet.md").read_text()
    section = text.split("### Adding a parametrization", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_new_parametrization_is_one_class_that_fits_saves_and_loads(world, tmp_path):
    """The docs' example form, run as written: registered by its class alone, it fits (its
    weights move, the loss stays finite), and saves and loads like the built-in forms."""
    namespace: dict = {}
    exec(compile(_doc_example(), "docs/gflownet.md", "exec"), namespace)
    name = namespace["LinearTwist"].name
    try:
        shifted, target = _setup(world)
        sampler = GFlowNetSampler(
            target, shifted, max_new_tokens=L, parametrization=name, steps=3, **FAST
        )
        assert isinstance(sampler.weights, namespace["LinearTwist"])
        before = {k: v.clone() for k, v in sampler.weights.state_dict().items()}
        metrics = sampler.fit(world.train_prompts[:4], progress=False, log_every=1)
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
        after = sampler.weights.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        sampler.save(tmp_path / "saved")
        assert (tmp_path / "saved" / "linear_twist.safetensors").is_file()
        loaded = GFlowNetSampler.load(tmp_path / "saved", target, world.load_policy("shifted"))
        for key, value in loaded.weights.state_dict().items():
            assert torch.equal(value, after[key])
    finally:
        PARAMETRIZATIONS.pop(name, None)


def test_nothing_a_twist_fit_keeps_across_steps_scales_with_the_vocabulary(world, tmp_path):
    """The batch buffer keeps token ids, lengths, rewards, groups and the components' features:
    no tensor with a vocabulary-sized dimension, in memory or in a checkpoint, whose trainer
    state is then the head's two Adam moments plus the features and a few bytes per stored
    state."""
    shifted, target = _setup(world)
    vocab = target.vocab_size
    # The check means something only if no other dimension is the vocabulary's.
    assert vocab not in (L, L + 1, 16) and all(c.hidden_size != vocab for c in target.components)
    sampler = GFlowNetSampler(
        target, shifted, max_new_tokens=L, parametrization="twist", twist_updates=2, steps=3, **FAST
    )
    sampler.fit(world.train_prompts[:4], progress=False, checkpoint_dir=tmp_path / "fit")
    kept = list(tensors(sampler.trainer.state_dict()["batches"]))
    assert len(sampler.trainer.batches) == 3 and kept
    assert [t.shape for t in kept if vocab in t.shape] == []
    checkpoint = latest_checkpoint(tmp_path / "fit")
    saved = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert [t.shape for t in tensors(saved["batches"]) if vocab in t.shape] == []
    weights = (checkpoint / "twist_head.safetensors").stat().st_size
    # Per stored state: its token id (8 bytes), its reward (4), every component's features
    # (4 bytes each), and the serialization's overhead per tensor and per prompt row (well
    # under 1 KiB per row of 8 states).
    rows = 3 * FAST["prompts_per_step"] * FAST["samples_per_prompt"]
    width = sum(c.hidden_size for c in target.components)
    bound = 2 * weights + rows * (L + 1) * (12 + 4 * width) + rows * 1024
    assert (checkpoint / "trainer_state.pt").stat().st_size < bound


def test_a_stored_twist_batch_is_rescored_from_its_features_as_by_teacher_forcing(world):
    """A kept batch's step scores, recomputed through each component's LM head from its
    features, equal those of a teacher-forced pass (the components are frozen); a kept batch
    without features (the fallback for heads that scale their logits) is teacher-forced."""
    shifted, target = _setup(world)
    sampler = GFlowNetSampler(
        target, shifted, max_new_tokens=L, parametrization="twist", steps=1, **FAST
    )
    sampler.fit(world.train_prompts[:4], progress=False)
    form, (stored,) = sampler.trainer.parametrization, sampler.trainer.batches._batches[:1]
    assert set(stored.inputs) == {"features"}
    from_features = form.restored(stored).inputs["steps"]
    forced, _ = form.policy.component_outputs(stored.rows, stored.response_ids, stored.lengths)
    fallback = form.restored(stored.without_inputs()).inputs["steps"]
    # The states a response visits (s_0..s_len); a rollout records nothing past them.
    visited = position_mask(stored.lengths + 1, L + 1)
    for mine, teacher, other in zip(from_features, forced, fallback, strict=True):
        mine, teacher, finite = mine[visited], teacher[visited], torch.isfinite(teacher[visited])
        assert torch.equal(torch.isfinite(mine), finite) and torch.equal(other[visited], teacher)
        # float32 rounding of the same matrix product, taken in another order
        assert (mine[finite] - teacher[finite]).abs().max() < 1e-5


@pytest.mark.parametrize("form", ["twist", "residual"])
def test_draws_read_log_target_while_decoding(world, form):
    """A policy on the target's local product draws with log q and log G̃ equal to teacher-forced
    scoring (float32 rounding of a 7-token sum: 1e-4), and sampling costs only the decoding's
    model tokens: the counters advance by stats.tokens, with no second scoring pass (which
    would add the components' tokens of every draw again)."""
    # Fresh copies: the residual form puts a LoRA adapter on its init policy's model, which
    # must not be the session's shared world.shifted (later tests read it).
    base, shifted = world.load_policy("base"), world.load_policy("shifted")
    target = GeometricMixture([base, shifted], [0.5, 0.5])
    prompts = [list(p) for p in world.eval_prompts[:2]]
    sampler = GFlowNetSampler(
        target,
        shifted,
        max_new_tokens=world.max_new_tokens,
        parametrization=form,
        adapter_name=f"draws_{form}",
        steps=3,
        prompts_per_step=2,
        samples_per_prompt=2,
    )
    sampler.fit(prompts, progress=False)
    before = model_tokens(target, sampler.policy)
    samples = sampler.sample(prompts, 6, generator=0)
    assert model_tokens(target, sampler.policy) - before == samples.stats.tokens
    rows = [prompts[i] for i in samples.prompt_index.tolist()]
    with torch.no_grad():
        log_q = sampler.policy.log_prob(rows, samples.response_ids, samples.lengths)
        log_target = target.log_prob(rows, samples.response_ids, samples.lengths)
    torch.testing.assert_close(samples.log_q, log_q, atol=1e-4, rtol=0)
    torch.testing.assert_close(samples.log_target, log_target, atol=1e-4, rtol=0)


def test_sir_over_a_twist_gflownet_reads_its_weights_while_decoding(world):
    """SIR with a twist GFlowNet's policy as proposal takes the decoding path: the chosen draws'
    log G̃ equal teacher-forced scoring (1e-4), and it costs the candidates' decoding alone,
    where the scoring path adds a pass of the components over every candidate."""
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    prompts = [list(p) for p in world.eval_prompts[:2]]
    cap = world.max_new_tokens
    gfn = GFlowNetSampler(target, world.shifted, max_new_tokens=cap, adapter_name="sir_over")
    decoding = ImportanceResampler(target, gfn.policy, 4, max_new_tokens=cap)
    scoring = ImportanceResampler(target, gfn.policy, 4, max_new_tokens=cap, weights_from="scoring")
    assert decoding.weights_from == "decoding"
    samples = decoding.sample(prompts, 3, generator=0)
    rows = [prompts[i] for i in samples.prompt_index.tolist()]
    with torch.no_grad():
        log_target = target.log_prob(rows, samples.response_ids, samples.lengths)
    torch.testing.assert_close(samples.log_target, log_target, atol=1e-4, rtol=0)
    assert samples.stats.tokens < scoring.sample(prompts, 3, generator=0).stats.tokens
