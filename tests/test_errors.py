"""Bad inputs get one clear error, naming the argument and the fix, before any expensive work.

One test per row of ``docs/errors.md`` that no other test file covers (rows already covered
elsewhere name their test in the table). "Before any work" is checked where it is cheap to:
no model tokens evaluated, no optimizer step taken, no output written.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from experiments import alpha_spin as alpha_spin_study
from experiments import geometric_mixture
from experiments.common import prepare_output_dir
from gfn_spin import (
    ArithmeticMixture,
    GeometricMixture,
    LocalProduct,
    Policy,
)
from gfn_spin.io import write_json_atomic
from gfn_spin.samples import ancestral_sample
from samplers import (
    AncestralSampler,
    ExactSampler,
    GFlowNetSampler,
    ImportanceResampler,
    SMCSampler,
)
from samplers.gflownet import GFlowNetConfig
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.pairs import load_pairs

L = 7
TINY = {"prompts_per_step": 2, "samples_per_prompt": 2, "warmup_steps": 1}


def _gflownet(world, **overrides) -> GFlowNetSampler:
    """A GFlowNet sampler on its own copy of π_t (adding an adapter wraps the model in place)."""
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    return GFlowNetSampler(target, shifted, max_new_tokens=L, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def saved_checkpoint(world, tmp_path_factory):
    """A checkpoint folder of a 1-step fit (shared read-only; tests copy it before damaging it)."""
    root = tmp_path_factory.mktemp("gfn_checkpoint")
    _gflownet(world).fit(world.train_prompts[:4], steps=1, checkpoint_dir=root, progress=False)
    return root / "step_0000001"


@pytest.fixture
def a_file(tmp_path):
    """A regular file: any directory path under it cannot be created (works as root too)."""
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


# -- α, h, weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, 1.0001, math.nan, math.inf])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha=.* must be a number in \[0, 1\]"):
        AlphaSpinConfig(alpha=alpha)


@pytest.mark.parametrize("weights", [[math.inf, 1.0], [0.5, -math.inf], [math.nan, 0.5]])
def test_non_finite_weights_are_refused_by_every_mixture(world, weights):
    for mixture in (ArithmeticMixture, GeometricMixture, LocalProduct):
        with pytest.raises(ValueError, match="weights must be finite"):
            mixture([world.base, world.shifted], weights)


# -- counts and length caps ---------------------------------------------------------------------


def test_max_new_tokens_below_one_is_refused_everywhere(world, prompt):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    before = world.base.tokens_evaluated
    for cap in (0, -3):
        with pytest.raises(ValueError, match=rf"max_new_tokens={cap} must be a positive integer"):
            AncestralSampler(world.base, max_new_tokens=cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            ImportanceResampler(target, None, 4, max_new_tokens=cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            SMCSampler(target, 4, max_new_tokens=cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            ExactSampler(target, cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            GFlowNetConfig(max_new_tokens=cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            AlphaSpinConfig(max_new_tokens=cap)
        with pytest.raises(ValueError, match="max_new_tokens"):
            ancestral_sample(world.base, [prompt], 1, max_new_tokens=cap)
    assert world.base.tokens_evaluated == before


def test_sampling_temperature_and_top_p_are_checked(world, prompt):
    with pytest.raises(ValueError, match="temperature=0"):
        ancestral_sample(world.base, [prompt], 1, max_new_tokens=3, temperature=0)
    with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
        ancestral_sample(world.base, [prompt], 1, max_new_tokens=3, top_p=0)


def test_empty_prompt_list_for_ancestral_and_gflownet(world):
    sampler = _gflownet(world)
    with pytest.raises(ValueError, match="prompts is empty"):
        AncestralSampler(world.base, max_new_tokens=3).sample([], 1)
    with pytest.raises(ValueError, match="prompts is empty"):
        sampler.fit([], steps=2, progress=False)
    with pytest.raises(ValueError, match="num_samples=0"):
        sampler.sample(world.eval_prompts[:1], 0)
    assert sampler.state.step == 0


# -- models, tokenizers, data -----------------------------------------------------------------


def test_missing_model_path_through_the_trainer(world, tmp_path):
    config = AlphaSpinConfig(model=str(tmp_path / "no-model"), output_dir=str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="name_or_path=.*no-model.*save_pretrained"):
        AlphaSpinTrainer(config, world=world)
    assert not (tmp_path / "run").exists()


def test_tokenizer_without_pad_is_handled_not_refused(world, prompt):
    tokenizer = world.tokenizer.__class__.from_pretrained(world.directory / "base")
    tokenizer.pad_token = None
    policy = Policy(world.base.model, tokenizer, allowed_token_ids=world.symbol_ids)
    assert policy.pad_token_id == policy.eos_token_id
    samples = AncestralSampler(policy, max_new_tokens=4).sample([prompt, prompt[:-1]], 3)
    with torch.no_grad():
        scores = policy.log_prob(
            [prompt] * 3 + [prompt[:-1]] * 3, samples.response_ids, samples.lengths
        )
        reference = world.base.log_prob(
            [prompt] * 3 + [prompt[:-1]] * 3, samples.response_ids, samples.lengths
        )
    torch.testing.assert_close(scores, reference)  # PAD is only ever masked


def test_empty_dataset_is_refused(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "response": []})
    with pytest.raises(ValueError, match="the dataset has no rows"):
        load_pairs(empty)
    with pytest.raises(ValueError, match="no rows; check the source, split and max_examples"):
        load_pairs(Dataset.from_dict({"prompt": ["a"], "response": ["b"]}), max_examples=0)


def test_dataset_file_with_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("a b\n")
    with pytest.raises(ValueError, match=r"dataset=.*pairs.txt.*suffix '.txt'.*\.jsonl"):
        load_pairs(str(path))


def test_unknown_names_in_configs():
    for field, value in (("weighting", "mean"), ("lr_decay", "step"), ("parametrization", "x")):
        with pytest.raises(ValueError, match=rf"{field}='{value}' must be"):
            GFlowNetConfig(**{field: value})
    for field, value in (("proposal", "prior"), ("optimizer", "adam"), ("lr_decay", "step")):
        with pytest.raises(ValueError, match=rf"{field}='{value}' must be one of"):
            AlphaSpinConfig(**{field: value})
    with pytest.raises(ValueError, match=r"unknown GFlowNetConfig fields \['stepz'\]"):
        GFlowNetConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match=r"unknown AlphaSpinConfig fields \['alfa'\]"):
        AlphaSpinConfig.from_dict({"alfa": 0.5})


def test_max_grad_norm_has_one_rule_in_both_configs():
    """None disables clipping in both trainers; 0, a negative or an infinite norm is refused."""
    assert GFlowNetConfig(max_grad_norm=None).max_grad_norm is None
    assert AlphaSpinConfig(max_grad_norm=None).max_grad_norm is None
    for value in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"max_grad_norm=.* must be a finite number > 0"):
            GFlowNetConfig(max_grad_norm=value)
        with pytest.raises(ValueError, match=r"max_grad_norm=.* must be a finite number > 0"):
            AlphaSpinConfig(max_grad_norm=value)


# -- checkpoints and run directories ----------------------------------------------------------


def _weights_file(checkpoint: Path) -> str:
    """The trainable weights a saved GFlowNet holds (its parametrization names the file)."""
    return next(path.name for path in checkpoint.glob("*.safetensors"))


def test_gflownet_load_from_a_directory_missing_files(world, saved_checkpoint, tmp_path):
    for missing in (_weights_file(saved_checkpoint), "gflownet_config.json"):
        broken = tmp_path / missing
        shutil.copytree(saved_checkpoint, broken)
        (broken / missing).unlink()
        shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
        target = GeometricMixture([world.base, shifted], [0.5, 0.5])
        with pytest.raises(
            FileNotFoundError, match=rf"lacks \['{missing}'\].*GFlowNetSampler.save"
        ):
            GFlowNetSampler.load(broken, target, shifted)


@pytest.mark.parametrize("name", ["weights", "gflownet_config.json"])
def test_gflownet_load_from_truncated_files(world, saved_checkpoint, tmp_path, name):
    name = _weights_file(saved_checkpoint) if name == "weights" else name
    broken = tmp_path / "broken"
    shutil.copytree(saved_checkpoint, broken)
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2])
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    with pytest.raises(ValueError, match=rf"{name}' is corrupted or truncated.*delete that folder"):
        GFlowNetSampler.load(broken, target, shifted)


def test_gflownet_resume_with_a_different_config_is_refused(world, saved_checkpoint, tmp_path):
    shutil.copytree(saved_checkpoint, tmp_path / saved_checkpoint.name)
    sampler = _gflownet(world, learning_rate=0.5, subtb_lambda=0.9)
    with pytest.raises(ValueError, match="different configuration.*learning_rate.*subtb_lambda"):
        sampler.fit(world.train_prompts[:4], steps=3, checkpoint_dir=tmp_path, resume=True)
    assert sampler.state.step == 0
    # Settings that do not change the steps already taken may differ.
    same = _gflownet(world, checkpoint_every=5)
    same.fit(world.train_prompts[:4], steps=1, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert same.state.step == 1


def test_alpha_spin_run_with_a_corrupted_manifest_is_refused(world, tmp_path):
    for text in ('{"identity": {"config"', "[]"):
        (tmp_path / "manifest.json").write_text(text)
        config = AlphaSpinConfig(output_dir=str(tmp_path), max_examples=32, batch_size=16)
        trainer = AlphaSpinTrainer(config, world=world, evaluate=lambda policy: {})
        with pytest.raises(ValueError, match="corrupted manifest.json.*delete the run directory"):
            trainer.train()
        assert not (tmp_path / "data").exists()


def test_output_directories_under_a_regular_file(world, a_file):
    message = r"cannot be a directory: '.*a_file' is a file; choose another"
    with pytest.raises(NotADirectoryError, match="output_dir=.*" + message):
        prepare_output_dir(a_file / "out")
    with pytest.raises(NotADirectoryError, match="output_dir=.*" + message):
        geometric_mixture.main(["--output-dir", str(a_file / "out"), "--progress", "false"])
    config = AlphaSpinConfig(output_dir=str(a_file / "run"), max_examples=32, batch_size=16)
    with pytest.raises(NotADirectoryError, match="output_dir=.*" + message):
        AlphaSpinTrainer(config, world=world, evaluate=lambda policy: {}).train()
    sampler = _gflownet(world)
    with pytest.raises(NotADirectoryError, match="checkpoint_dir=.*" + message):
        sampler.fit(world.train_prompts[:4], steps=3, checkpoint_dir=a_file / "ck")
    assert sampler.state.step == 0  # refused before training, not when saving at the end
    with pytest.raises(NotADirectoryError, match=message):
        sampler.save(a_file / "adapter")
    with pytest.raises(NotADirectoryError, match=message):
        write_json_atomic({}, a_file / "results.json")
    assert a_file.read_text() == "not a directory"


# -- experiments' CLIs ------------------------------------------------------------------------


def test_study_flags_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "study"
    with pytest.raises(ValueError, match="seeds=0 must be a positive integer"):
        alpha_spin_study.main(["--output-dir", str(out), "--seeds", "0"])
    with pytest.raises(SystemExit):  # a Literal field: argparse refuses the choice
        alpha_spin_study.main(["--output-dir", str(out), "--sampler", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device.*use cpu, cuda"):
        alpha_spin_study.main(["--output-dir", str(out), "--device", "gpu0"])
    assert not out.exists()


def test_main_job_missing_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts_file=.*is not a file"):
        geometric_mixture.main(
            ["--output-dir", str(tmp_path), "--prompts-file", str(tmp_path / "none.txt")]
        )
    assert not (tmp_path / "results.json").exists()


def test_every_row_of_the_table_names_existing_tests():
    """docs/errors.md: ≥ 25 rows, each naming at least one test that exists."""
    root = Path(__file__).resolve().parent
    rows = [line for line in (root.parent / "docs" / "errors.md").read_text().splitlines()]
    rows = [line for line in rows if re.match(r"^\| \d+ \|", line)]
    assert len(rows) >= 25
    for row in rows:
        named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row.rsplit("|", 2)[-2])
        assert named, row
        for file, test in named:
            assert re.search(rf"^def {test}\(", (root / file).read_text(), re.M), (file, test)
