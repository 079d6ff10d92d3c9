"""Bad inputs a careful but error-prone user gives: each is a clear error before any work (or a
correct behaviour), never a silent NaN, a silently reinterpreted row or a raw traceback.

Every test here fails without the check it names (see docs/errors.md for the rows).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file

import selfplay.iterate_training as training_module
from experiments import alpha_spin as alpha_spin_study
from experiments import train_alpha_spin
from experiments.common import check_alphas, world_config
from gfn_spin import GeometricMixture, Policy
from gfn_spin.devices import default_device, resolve_device
from gfn_spin.samples import ancestral_sample
from samplers import (
    AncestralSampler,
    ArithmeticMixtureSampler,
    GFlowNetSampler,
    ImportanceResampler,
    SMCSampler,
)
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.iteration_data import load_parquet, write_parquet
from selfplay.pairs import load_pairs
from selfplay.run_directory import MANIFEST, RunDirectory

RUN = {"max_examples": 32, "batch_size": 16, "progress": False}


def _trainer(world, tmp_path, dataset=None, **overrides) -> AlphaSpinTrainer:
    config = AlphaSpinConfig(output_dir=str(tmp_path / "run"), **{**RUN, **overrides})
    return AlphaSpinTrainer(config, world=world, dataset=dataset, evaluate=lambda policy: {})


def _pairs(count: int = 32, prompt: str = "a b", response: str = "a b") -> dict[str, list]:
    return {"prompt": [prompt] * count, "response": [response] * count}


# -- 5. float settings: finite and in range, before any work -----------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("learning_rate", 0.0),
        ("weight_decay", -5.0),
        ("weight_decay", math.nan),
        ("beta", math.inf),
        ("warmup_ratio", math.nan),
        ("warmup_ratio", 1.0),
        ("max_grad_norm", math.inf),
        ("max_grad_norm", 0.0),
    ],
)
def test_float_settings_must_be_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} must be"):
        AlphaSpinConfig(**{field: value})


def test_non_finite_learning_rate_on_the_command_line_is_refused_before_work(tmp_path):
    for flag, value in (("--learning-rate", "inf"), ("--beta", "nan")):
        with pytest.raises(ValueError, match=rf"{flag[2:].replace('-', '_')}=.* must be"):
            train_alpha_spin.main(["--output-dir", str(tmp_path / "run"), flag, value])
    assert not (tmp_path / "run").exists()


def test_a_run_whose_loss_diverges_stops_and_names_the_step(world, tmp_path):
    trainer = _trainer(
        world, tmp_path, alpha=1.0, iterations=1, epochs=1, optimizer="sgd",
        learning_rate=1e30, max_grad_norm=None,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"not finite at optimizer step 2 of 2"):
        trainer.train()
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert manifest["done"] == ["eval_0", "data_0"]
    assert not (tmp_path / "run" / "iterates").exists()


def test_a_run_whose_weights_become_non_finite_stops(world, tmp_path, monkeypatch):
    make_optimizer = training_module.make_optimizer

    def poisoned(config, parameters, total_steps):
        optimizer, scheduler = make_optimizer(config, parameters, total_steps)
        step = optimizer.step

        def step_then_nan(*args, **kwargs):
            step(*args, **kwargs)
            with torch.no_grad():
                parameters[0].view(-1)[0] = math.nan

        optimizer.step = step_then_nan
        return optimizer, scheduler

    monkeypatch.setattr(training_module, "make_optimizer", poisoned)
    trainer = _trainer(world, tmp_path, alpha=1.0, iterations=1, epochs=1)
    with pytest.raises(FloatingPointError, match=r"weights of π_1 became non-finite at .* step 1"):
        trainer.train()
    assert not (tmp_path / "run" / "iterates").exists()


# -- 6. data rows are text, named by row when they are not -------------------------------------


@pytest.mark.parametrize(
    ("prompts", "responses", "message"),
    [
        (["a b", None], ["a", "b"], r"row 1: prompt is None \(NoneType\)"),
        (["a b", "c"], ["a", None], r"row 1: response is None"),
        ([3, 4], ["a", "b"], r"row 0: prompt is 3 \(int\)"),
        (["a b", "  "], ["a", "b"], r"row 1: prompt is empty"),
    ],
)
def test_null_non_string_and_empty_fields_are_refused_by_row(prompts, responses, message):
    rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    with pytest.raises(ValueError, match=message):
        load_pairs(Dataset.from_list(rows))


def test_an_empty_response_is_kept_as_an_immediate_end():
    pairs = load_pairs(Dataset.from_dict({"prompt": ["a b"], "response": [""]}))
    assert pairs["response"] == [""]


def test_special_token_text_in_data_or_prompts_is_refused(world, tmp_path):
    rows = _pairs()
    rows["response"][5] = "a [EOS] b"
    with pytest.raises(ValueError, match=r"dataset's responses .* row 5 \('\[EOS\]'\)"):
        _trainer(world, tmp_path, dataset=Dataset.from_dict(rows))
    rows = _pairs()
    rows["prompt"][2] = "[BOS] a"
    with pytest.raises(ValueError, match=r"dataset's prompts .* row 2 \('\[BOS\]'\)"):
        _trainer(world, tmp_path, dataset=Dataset.from_dict(rows))
    with pytest.raises(ValueError, match=r"prompts\[1\] \('\[PAD\]'\)"):
        AncestralSampler(world.base, max_new_tokens=3).sample(["a b", "a [PAD]"])
    assert not (tmp_path / "run").exists()


# -- 7. saved adapters: truncated, non-finite or for another model -----------------------------


@pytest.fixture
def saved_adapter(world, tmp_path):
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    policy.add_adapter("x").save_pretrained(tmp_path / "adapter")
    folder = next((tmp_path / "adapter").rglob("adapter_config.json")).parent
    return folder, folder / "adapter_model.safetensors"


@pytest.mark.parametrize("damage", ["nan", "shape", "truncated"])
def test_a_damaged_adapter_is_refused_on_load(world, saved_adapter, damage):
    folder, weights = saved_adapter
    tensors = load_file(weights)
    if damage == "nan":
        save_file({k: torch.full_like(v, math.nan) for k, v in tensors.items()}, weights)
        message = "holds non-finite .* weights"
    elif damage == "shape":
        save_file({k: torch.zeros(v.shape[0] + 1, v.shape[1] + 3) for k, v in tensors.items()}, weights)  # fmt: skip
        message = (
            "could not be loaded as a LoRA adapter of this model .*size mismatch.* shapes differ"
        )
    else:
        weights.write_bytes(weights.read_bytes()[:100])
        message = "is corrupted or truncated"
    fresh = world.load_policy("base", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        fresh.load_adapter(folder, "x")
    with pytest.raises(ValueError, match=message):
        Policy.from_pretrained(world.directory / "base", adapter=folder, device="cpu")


# -- 8, 11. context: every sampler, and the α-SPIN messages ------------------------------------


def test_every_sampler_refuses_prompt_plus_cap_beyond_the_context(world, prompt):
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    cap = world.base.max_context - len(prompt) + 1  # one token too many
    samplers = [
        AncestralSampler(world.base, max_new_tokens=cap),
        ArithmeticMixtureSampler([world.base, shifted], [0.5, 0.5], max_new_tokens=cap),
        ImportanceResampler(target, target.local_product(), 2, max_new_tokens=cap),
        ImportanceResampler(target, world.base, 2, max_new_tokens=cap),
        GFlowNetSampler(target, shifted, max_new_tokens=cap),
    ]
    before = world.base.tokens_evaluated + shifted.tokens_evaluated
    for sampler in samplers:
        with pytest.raises(ValueError, match=rf"plus max_new_tokens={cap} exceeds .* context"):
            sampler.sample([prompt], 1)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        ancestral_sample(world.base, [prompt], 1, max_new_tokens=world.base.max_context)
    assert world.base.tokens_evaluated + shifted.tokens_evaluated == before


def test_smc_refuses_prompt_plus_cap_beyond_the_context(world, prompt):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    cap = world.base.max_context - len(prompt) + 1
    with pytest.raises(ValueError, match="context"):
        SMCSampler(target, 2, max_new_tokens=cap).sample([prompt], 1)


def test_alpha_spin_context_errors_name_the_setting_to_change(world, tmp_path):
    with pytest.raises(ValueError, match=r"max_new_tokens=100000 leaves no room.*--max-new-tokens"):
        _trainer(world, tmp_path, max_new_tokens=100000)
    long_prompts = Dataset.from_dict(_pairs(prompt=" ".join("abcd" * 10)))  # 40 symbols
    with pytest.raises(ValueError, match=r"lower --max-prompt-length to 25 or less"):
        _trainer(world, tmp_path, dataset=long_prompts)
    assert not (tmp_path / "run").exists()


# -- 10. a refused resume names only the settings that differ ---------------------------------


def test_a_refused_resume_names_only_the_differing_fields(world, tmp_path):
    first = _trainer(world, tmp_path, beta=2.0)
    run = RunDirectory(tmp_path / "run", first.identity, PartialState(cpu=True))
    run.complete("eval_0", {"iteration": 0, "metrics": {}})
    run.close()
    second = _trainer(world, tmp_path, beta=0.3, iterations=5)
    with pytest.raises(ValueError) as refused:
        second.train()
    message = str(refused.value)
    assert "beta (run has 2.0, now 0.3)" in message
    assert "learning_rate" not in message and "iterations (" not in message
    assert "A resume may change only output_dir, iterations, progress" in message


# -- 14. files, folders, worlds, ids, generators, devices -------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "is an empty file"),
        ("cut.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp', "could not be read"),
        ("latin1.csv", "prompt,response\nd\xe9j\xe0,vu\n".encode("latin-1"), "could not be read"),
        ("columnar.json", b'{"prompt": ["a", "b"], "response": ["c", "d"]}', r"row 0: prompt is \['a', 'b'\]"),
        ("types.jsonl", b'{"prompt": 1, "response": 2}\n', r"row 0: prompt is 1 \(int\)"),
    ],
)  # fmt: skip
def test_damaged_dataset_files_get_a_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_pairs(str(tmp_path / name))


def test_a_save_to_disk_folder_loads(tmp_path):
    Dataset.from_dict({"prompt": ["a b"], "response": ["b"]}).save_to_disk(tmp_path / "one")
    assert load_pairs(str(tmp_path / "one"))["response"] == ["b"]
    splits = DatasetDict({"test": Dataset.from_dict({"prompt": ["c"], "response": ["d"]})})
    splits.save_to_disk(tmp_path / "splits")
    assert load_pairs(str(tmp_path / "splits"), split="test")["prompt"] == ["c"]
    with pytest.raises(ValueError, match=r"dataset_split='train' is not a split .* \['test'\]"):
        load_pairs(str(tmp_path / "splits"))


def test_truncated_parquet_and_manifest_with_wrong_types(world, tmp_path):
    write_parquet({"x": list(range(100))}, tmp_path / "d.parquet")
    data = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "d.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"d.parquet' is corrupted or truncated"):
        load_parquet(tmp_path / "d.parquet")
    trainer = _trainer(world, tmp_path)
    for manifest in (
        {"identity": {}, "done": "eval_0", "records": []},
        {"identity": {}, "done": [], "records": [{"iteration": "0"}]},
        {"identity": [], "done": [], "records": []},
    ):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="corrupted manifest.json"):
            trainer.train()


@pytest.mark.parametrize("damage", ["truncated weights", "garbage tokenizer.json", "config.json"])
def test_a_damaged_model_folder_gets_a_clear_error(world, tmp_path, damage):
    world.base.save_pretrained(tmp_path / "model")
    world.tokenizer.save_pretrained(tmp_path / "model")
    if damage == "truncated weights":
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "config.json":
        (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", "hidden')
    else:
        (tmp_path / "model" / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ValueError, match="could not load name_or_path=.* corrupted, truncated"):
        Policy.from_pretrained(tmp_path / "model", device="cpu")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["sft_examples=0"], "sft_examples=0 must be an integer >= 1"),
        (["num_heads=3"], "num_heads=3 must divide hidden_size=64"),
        (["learning_rate=nan"], "learning_rate=nan must be a finite number > 0"),
        (["hidden_size=0"], "hidden_size=0 must be an integer >= 1"),
        (["num_layers=0"], "num_layers=0 must be an integer >= 1"),
        (["batch_size=-1"], "batch_size=-1 must be an integer >= 1"),
        (["prompt_lengths=0:2"], "prompt_lengths=(0, 2) must be positive integers"),
        (["num_eval_prompts=336"], "num_eval_prompts=336 leaves no train prompts"),
        (["prompt_lengths=20"], "so lengths stop at 8"),
        (["max_new_tokens=30"], "exceed the models' context of 32 tokens"),
    ],
)
def test_invalid_world_fields_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        world_config(settings)


def test_token_ids_generators_temperatures_and_devices_are_checked(world, prompt):
    sampler = AncestralSampler(world.base, max_new_tokens=3)
    before = world.base.tokens_evaluated
    with pytest.raises(ValueError, match=r"prompts\[1\] has token ids \[99\] outside .* \[0, 9\)"):
        sampler.sample([prompt, [1, 5, 99]])
    with pytest.raises(ValueError, match=r"token ids \[-1\] outside"):
        sampler.sample([[1, -1, 4]])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a string or a list of integer"):
        sampler.sample([[1, 5.5, 4]])
    for generator in ("x", 1.5, True):
        with pytest.raises(TypeError, match=r"generator=.* must be a torch.Generator, an integer"):
            sampler.sample([prompt], generator=generator)
    with pytest.raises(ValueError, match="is not a 64-bit seed"):
        sampler.sample([prompt], generator=2**70)
    for temperature in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match=r"temperature=.* must be a finite number > 0"):
            AncestralSampler(world.base, max_new_tokens=3, temperature=temperature)
    with pytest.raises(ValueError, match=r"top_p=nan must be in \(0, 1\]"):
        ancestral_sample(world.base, [prompt], 1, max_new_tokens=3, top_p=math.nan)
    assert world.base.tokens_evaluated == before
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        AlphaSpinConfig(device="gpu0")


def test_device_flags_refuse_devices_this_machine_lacks(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device (none here)
    with pytest.raises(ValueError, match=rf"device='{missing}' is not available here"):
        AlphaSpinConfig(device=missing)
    with pytest.raises(ValueError, match=rf"device='{missing}' is not available here"):
        alpha_spin_study.main(["--output-dir", str(tmp_path / "study"), "--device", missing])
    assert resolve_device("auto") == resolve_device(None) == default_device()
    assert resolve_device("cpu") == torch.device("cpu")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    ("alphas", "message"),
    [
        ([1.5], r"alphas=\[1.5\] has values outside \[0, 1\]: \[1.5\]"),
        ([-0.1, 0.5], r"values outside \[0, 1\]: \[-0.1\]"),
        ([math.nan], r"values outside \[0, 1\]: \[nan\]"),
        ([0.5, 0.95, 0.5], r"repeats \[0.5\]: give each α once"),
        ([], "alphas is empty"),
    ],
)
def test_study_alphas_are_in_the_unit_interval_and_distinct(alphas, message):
    with pytest.raises(ValueError, match=message):
        check_alphas(alphas)
    assert check_alphas([0, 0.5, 1]) == (0.0, 0.5, 1.0)
