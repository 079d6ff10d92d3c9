"""Data safety and bad input, round three: a save never removes a file it did not write, a
diverged fit is never saved as if it were fine, every setting is checked when a run starts (and
only settings that apply are recorded), and a command line refuses in one line.

Each test is one case of the round's list; docs/errors.md has a row for each.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file

from experiments import geometric_mixture
from experiments.cli import DEBUG_ENV, parse_config, run_command
from experiments.common import to_jsonable
from experiments.evaluation import claim_checkpoint_root
from experiments.run_outputs import output_set, prepare_output_dir
from gfn_spin import GeometricMixture
from gfn_spin.data import UnknownTokenWarning
from samplers import AncestralSampler, GFlowNetSampler
from samplers.gflownet import GFlowNetConfig
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.pairs import load_pairs
from selfplay.run_directory import MANIFEST, RunDirectory

ROOT = Path(__file__).resolve().parent.parent
TINY = {"max_new_tokens": 7, "prompts_per_step": 2, "samples_per_prompt": 2, "warmup_steps": 1}
RUN = {"max_examples": 32, "batch_size": 16, "progress": False}
USER_FILES = {"notes.txt": "my notes", "draft.tmp": "a draft", "data/mine.csv": "a,b\n1,2\n"}


def _target_and_init(world) -> tuple[GeometricMixture, object]:
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    return GeometricMixture([world.base, shifted], [0.5, 0.5]), shifted


def _gflownet(world, **overrides) -> GFlowNetSampler:
    return GFlowNetSampler(*_target_and_init(world), **{**TINY, **overrides})


def _add_user_files(folder: Path) -> dict[str, bytes]:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return {name: (folder / name).read_bytes() for name in USER_FILES}


def _kept(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / n).is_file() and (folder / n).read_bytes() == b for n, b in files.items())


# -- data loss: a save replaces only its own files --------------------------------------------


def test_a_save_keeps_files_a_user_added_to_its_folder(world, tmp_path):
    sampler = _gflownet(world, parametrization="residual")
    folder = sampler.save(tmp_path / "gfn")
    files = _add_user_files(folder)
    sampler.save(folder)
    assert _kept(folder, files)
    GFlowNetSampler.load(folder, *_target_and_init(world))  # the save itself is whole


def test_a_rerun_of_a_study_keeps_a_users_file_in_its_adapter_folder(world, tmp_path):
    """What the main job does per α (fit_sampler saves into the staged output set), twice."""
    root = prepare_output_dir(tmp_path / "out", tool="tests.study")
    sampler = _gflownet(world, parametrization="residual")

    def run(alphas: list[str]) -> None:
        with output_set(root) as staging:
            for alpha in alphas:
                sampler.save(staging / f"gflownet_alpha_{alpha}")
            (staging / "results.json").write_text("{}")

    run(["0_5"])
    files = _add_user_files(root / "gflownet_alpha_0_5")
    run(["0_5"])
    assert _kept(root / "gflownet_alpha_0_5", files)
    GFlowNetSampler.load(root / "gflownet_alpha_0_5", *_target_and_init(world))
    run([])  # a run that no longer writes that folder removes its own files only
    assert _kept(root / "gflownet_alpha_0_5", files)
    assert sorted(p.name for p in (root / "gflownet_alpha_0_5").iterdir()) == ["data", "draft.tmp", "notes.txt"]  # fmt: skip


def test_a_newer_checkpoint_keeps_a_users_file_in_the_older_one(world, tmp_path):
    prompts = world.train_prompts[:4]
    _gflownet(world).fit(prompts, steps=2, checkpoint_dir=tmp_path, progress=False)
    files = _add_user_files(tmp_path / "step_0000002")
    _gflownet(world).fit(prompts, steps=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert _kept(tmp_path / "step_0000002", files)
    assert sorted(p.name for p in (tmp_path / "step_0000002").iterdir()) == ["data", "draft.tmp", "notes.txt"]  # fmt: skip
    assert (tmp_path / "step_0000003" / "trainer_state.pt").is_file()


def test_an_adapter_name_that_is_a_path_is_refused(world, tmp_path):
    user = tmp_path / "user"
    files = _add_user_files(user)
    (user / "adapter_config.json").write_text('{"mine": true}')
    files["adapter_config.json"] = b'{"mine": true}'
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    for name in (str(user), "../user", "a/b", "", "1x", "x" * 101):
        with pytest.raises(ValueError, match="not a plain identifier|characters; use at most"):
            policy.add_adapter(name)
    with pytest.raises(ValueError, match="not a plain identifier"):
        policy.load_adapter(tmp_path, str(user))
    with pytest.raises(ValueError, match="not a plain identifier"):
        GFlowNetConfig(adapter_name=str(user))
    assert _kept(user, files) and sorted(p.name for p in user.iterdir()) == sorted(["adapter_config.json", "data", "draft.tmp", "notes.txt"])  # fmt: skip


@pytest.mark.parametrize("kind", ["no tensors", "integer tensors"])
def test_an_adapter_file_without_lora_weights_is_refused(world, tmp_path, kind):
    """Found by the fuzz pass: peft loads such a file and leaves the adapter untrained."""
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    policy.add_adapter("x").save_pretrained(tmp_path / "adapter")
    folder = next((tmp_path / "adapter").rglob("adapter_config.json")).parent
    weights = folder / "adapter_model.safetensors"
    tensors = {k: v.long() for k, v in load_file(weights).items()} if kind != "no tensors" else {}
    save_file(tensors, weights)
    fresh = world.load_policy("base", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        fresh.load_adapter(folder, "x")


def test_the_main_jobs_checkpoint_dir_follows_the_rule_of_fit(world, tmp_path):
    """A folder holding a user's files is refused by both, before anything is written."""
    folder = tmp_path / "mine"
    files = _add_user_files(folder)
    with pytest.raises(FileExistsError, match="not a gfn-spin run folder"):
        claim_checkpoint_root(folder)
    with pytest.raises(FileExistsError, match="not a gfn-spin run folder"):
        _gflownet(world).fit(world.train_prompts[:2], steps=1, checkpoint_dir=folder)
    argv = ["--quick", "--output-dir", str(tmp_path / "out"), "--checkpoint-dir", str(folder)]
    with pytest.raises(FileExistsError, match="checkpoint_dir=.*not a gfn-spin run folder"):
        geometric_mixture.main(argv)
    assert _kept(folder, files) and sorted(p.name for p in folder.iterdir()) == ["data", "draft.tmp", "notes.txt"]  # fmt: skip


# -- silent-wrong results ----------------------------------------------------------------------


def test_an_iterate_edited_after_the_run_wrote_it_is_refused_on_resume(world, tmp_path):
    config = AlphaSpinConfig(output_dir=str(tmp_path / "run"), alpha=1.0, iterations=1, **RUN)
    AlphaSpinTrainer(config, world=world, evaluate=lambda p: {}).train()
    weights = next((tmp_path / "run" / "iterates" / "iter_1").rglob("*.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
    longer = AlphaSpinConfig(output_dir=str(tmp_path / "run"), alpha=1.0, iterations=2, **RUN)
    with pytest.raises(ValueError, match=r"iterates/iter_1 differs from what the run wrote"):
        AlphaSpinTrainer(longer, world=world, evaluate=lambda p: {}).train()
    (tmp_path / "run" / "data" / "iteration_0.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"data/iteration_0.parquet differs from what the run"):
        AlphaSpinTrainer(longer, world=world, evaluate=lambda p: {}).train()
    (tmp_path / "run" / "data" / "iteration_0.parquet").unlink()
    with pytest.raises(ValueError, match=r"step data_0 as done, but data/iteration_0.parquet is missing"):  # fmt: skip
        AlphaSpinTrainer(longer, world=world, evaluate=lambda p: {}).train()


@pytest.mark.parametrize("split", ["test", "bogus"])
def test_a_dataset_split_that_does_not_apply_is_refused(tmp_path, split):
    rows = {"prompt": ["a b"] * 4, "response": ["c d"] * 4}
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": "a b", "response": "c d"}) + "\n" for _ in range(4)))  # fmt: skip
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    for source in (jsonl, tmp_path / "one"):
        assert len(load_pairs(source)) == 4  # the default split reads them
        with pytest.raises(ValueError, match=rf"dataset_split='{split}' does not apply"):
            load_pairs(source, split=split)
    with pytest.raises(ValueError, match=rf"dataset_split='{split}' is not a split"):
        load_pairs(tmp_path / "dict", split=split)


@pytest.mark.parametrize(
    "flags", [["--max-new-tokens", "1000000"], ["--prompts-file", "prompts.txt"]]
)
def test_real_model_flags_on_the_tiny_world_are_refused(tmp_path, flags):
    (tmp_path / "prompts.txt").write_text("a b\nc d\n")
    flags = [str(tmp_path / f) if f.endswith(".txt") else f for f in flags]
    with pytest.raises(ValueError, match=rf"{flags[0]} applies to real models"):
        geometric_mixture.main(["--quick", "--output-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_an_empty_prompt_is_refused_by_samplers_as_by_datasets(world):
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    for prompts in ([""], ["a b", "   "], [[]]):
        with pytest.raises(ValueError, match="empty; every prompt must hold text"):
            AncestralSampler(policy, max_new_tokens=3).sample(prompts, 1, generator=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        load_pairs({"prompt": ["a b", "  "], "response": ["a", "b"]})


def test_a_prompt_with_unknown_words_warns_once(world):
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    with pytest.warns(UnknownTokenWarning, match=r"'a zebra' holds text this tokenizer cannot"):
        policy.encode_prompts(["a zebra"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownTokenWarning)
        policy.encode_prompts(["b giraffe", "a b"])  # once per tokenizer, not per prompt
        world.load_policy("base", device="cpu").encode_prompts(["a b"])  # known words: silent


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora_alpha", 0.0),
        ("lora_alpha", math.nan),
        ("max_grad_norm", math.nan),
        ("max_grad_norm", -1.0),
        ("eval_every", -1),
        ("checkpoint_every", -1),
        ("learning_rate", math.inf),
        ("subtb_lambda", math.nan),
        ("weight_decay", math.nan),
        ("reward_temperature_start", math.inf),
        ("reward_temperature_end", math.nan),
    ],
)
def test_gflownet_settings_that_train_nothing_or_diverge_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} must be"):
        GFlowNetConfig(**{field: value})


@pytest.mark.parametrize(
    "flag", ["subtb_lambda", "weight_decay", "reward_temperature_start", "learning_rate"]
)
def test_a_nested_gflownet_flag_is_refused_when_the_run_starts(flag):
    """Before the run builds anything (not after iteration 1 has trained)."""
    value = "inf" if flag == "reward_temperature_start" else "nan"
    argv = ["--sampler", "gflownet", f"--gflownet.{flag}", value]
    with pytest.raises(ValueError, match=rf"{flag}={value} must be a finite number"):
        parse_config(AlphaSpinConfig, argv)


# -- tracebacks ----------------------------------------------------------------------------------


def test_a_command_line_refusal_is_one_line_and_the_traceback_is_behind_debug(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["--alphas", "2", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        run_command(geometric_mixture.main, argv)
    error = capsys.readouterr().err.strip()
    assert exited.value.code == 1 and "\n" not in error and "Traceback" not in error
    assert "alphas=[2.0] has values outside [0, 1]" in error and "--debug" in error
    with pytest.raises(ValueError, match="outside"):
        run_command(geometric_mixture.main, [*argv, "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="outside"):
        run_command(geometric_mixture.main, argv)


def test_the_installed_command_prints_one_line(tmp_path):
    """The real ``python -m`` entry, end to end."""
    command = [sys.executable, "-m", "experiments.train_alpha_spin", "--learning-rate", "inf"]
    done = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("experiments.train_alpha_spin: error: learning_rate=inf")


def test_a_non_utf8_jsonl_is_refused_with_a_value_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a b", "response": "c d"}\n{"prompt": "a \xff b", "response": "c"}\n')  # fmt: skip
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(line 2"):
        load_pairs(path)


# -- the GFlowNet fit: divergence, checkpoints read back, settings recorded --------------------


@pytest.mark.parametrize("parametrization", ["residual", "lora"])
def test_a_diverged_fit_stops_and_names_the_step(world, tmp_path, parametrization):
    sampler = _gflownet(world, parametrization=parametrization, learning_rate=1e30)
    with pytest.raises(FloatingPointError, match=r"not finite after step \d+ of 3.*learning_rate"):
        sampler.fit(world.train_prompts[:4], steps=3, checkpoint_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("step_*"))  # nothing diverged was saved


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (999, r"says step 999, but it is in the checkpoint of step 2"),
        ("abc", r"metrics.json' is corrupted \(step is 'abc', not an integer\)"),
        (-1, r"says step -1"),
        (1.5, r"step is 1.5, not an integer"),
        (None, r"step is None"),
    ],
)
def test_a_metrics_step_that_no_checkpoint_backs_is_refused(world, tmp_path, step, message):
    prompts = world.train_prompts[:4]
    _gflownet(world).fit(prompts, steps=2, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "step_0000002" / "metrics.json"
    log = json.loads(path.read_text())
    if step is None:
        del log["step"]
    else:
        log["step"] = step
    path.write_text(json.dumps(log))
    resumed = _gflownet(world)
    with pytest.raises(ValueError, match=message):
        resumed.fit(prompts, steps=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.state.step == 0


@pytest.mark.parametrize("damage", ["missing keys", "a tensor"])
def test_a_trainer_state_of_another_shape_is_refused(world, tmp_path, damage):
    prompts = world.train_prompts[:4]
    _gflownet(world).fit(prompts, steps=2, checkpoint_dir=tmp_path, progress=False)
    state = tmp_path / "step_0000002" / "trainer_state.pt"
    torch.save({"optimizer": {}} if damage == "missing keys" else torch.zeros(3), state)
    resumed = _gflownet(world)
    with pytest.raises(
        ValueError, match=r"trainer_state.pt. is corrupted .*it lacks .*delete that"
    ):
        resumed.fit(prompts, steps=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.state.step == 0


@pytest.mark.parametrize("parametrization", ["residual", "lora"])
def test_lora_weights_of_another_shape_get_a_clear_message(world, tmp_path, parametrization):
    prompts = world.train_prompts[:4]
    _gflownet(world, parametrization=parametrization).fit(
        prompts, steps=2, checkpoint_dir=tmp_path, progress=False
    )
    step = tmp_path / "step_0000002"
    weights = next(step.glob("*.safetensors"))
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(weights).items()}, weights)  # fmt: skip
    message = r"differ in name or shape from this sampler's: \d+ tensor"
    with pytest.raises(ValueError, match=message):
        _gflownet(world, parametrization=parametrization).fit(
            prompts, steps=3, checkpoint_dir=tmp_path, resume=True, progress=False
        )
    with pytest.raises(ValueError, match=message):
        GFlowNetSampler.load(step, *_target_and_init(world))


def test_fit_steps_must_be_an_integer(world):
    with pytest.raises(ValueError, match=r"steps=2.5 must be an integer >= 0"):
        _gflownet(world).fit(world.train_prompts[:2], steps=2.5, progress=False)


def test_only_applied_gflownet_settings_are_offered_and_recorded():
    """The run sets the opponent's length cap, adapter name and seed itself."""
    with pytest.raises(SystemExit):
        parse_config(AlphaSpinConfig, ["--sampler", "gflownet", "--gflownet.max-new-tokens", "40"])
    recorded = AlphaSpinConfig(sampler="gflownet").to_dict()["gflownet"]
    assert not {"max_new_tokens", "adapter_name", "seed"} & set(recorded)
    assert AlphaSpinConfig.from_dict(AlphaSpinConfig(sampler="gflownet").to_dict()).gflownet
    results = to_jsonable(geometric_mixture.GeometricMixtureConfig())["gflownet"]
    assert not {"max_new_tokens", "adapter_name", "seed"} & set(results)


def test_a_run_recorded_with_the_derived_gflownet_settings_still_resumes(world, tmp_path):
    """Manifests written before the derived settings were left out hold them."""
    config = AlphaSpinConfig(output_dir=str(tmp_path / "run"), **RUN)
    trainer = AlphaSpinTrainer(config, world=world, evaluate=lambda p: {})
    run = RunDirectory(tmp_path / "run", trainer.identity, PartialState(cpu=True))
    run.complete("eval_0", {"iteration": 0, "metrics": {}})
    run.close()
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    manifest["identity"]["config"]["gflownet"].update(max_new_tokens=7, adapter_name="gflownet", seed=0)  # fmt: skip
    (tmp_path / "run" / MANIFEST).write_text(json.dumps(manifest))
    RunDirectory(tmp_path / "run", trainer.identity, PartialState(cpu=True)).close()


def test_an_alpha_spin_run_whose_gflownet_opponent_diverges_stops(world, tmp_path):
    config = AlphaSpinConfig(
        output_dir=str(tmp_path / "run"), alpha=0.5, iterations=2, sampler="gflownet",
        gflownet=GFlowNetConfig(steps=3, learning_rate=1e30, parametrization="residual"), **RUN,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"not finite after step"):
        AlphaSpinTrainer(config, world=world, evaluate=lambda p: {}).train()
    # π_1's opponent is π_0 itself; π_2's is the first GFlowNet, which diverged: not saved.
    assert not (tmp_path / "run" / "opponents" / "gflownet_1").exists()
