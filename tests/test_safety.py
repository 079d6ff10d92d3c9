"""Security and data safety: no code runs from a checkpoint or a model folder, no user file is
deleted or overwritten, one run per folder at a time, and a run's outputs appear as one set.

Every test here fails without the guard it names (see docs/errors.md for the rows).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from datasets import Dataset
from safetensors.torch import load_file, save_file

from experiments import train_alpha_spin
from experiments.common import (
    output_set,
    prepare_output_dir,
    read_prompts_file,
    setup_logging,
    split_train_eval,
)
from gfn_spin import GeometricMixture, Policy
from gfn_spin.io import DIRECTORY_MARKER, LOCK_FILE, RUN_MARKER, DirectoryInUseError
from samplers import GFlowNetSampler
from samplers.gflownet import TRAINER_STATE
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.run_directory import MANIFEST, RUN_TOOL, RunDirectory

ROOT = Path(__file__).resolve().parent.parent
L = 7
TINY = {"prompts_per_step": 2, "samples_per_prompt": 2, "warmup_steps": 1}
RUN = {"max_examples": 32, "batch_size": 16, "progress": False}


class _WritesMarker:
    """Unpickling this object calls ``Path.write_text(marker, "ran")``: code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _malicious_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as stream:
        pickle.dump({"optimizer": _WritesMarker(marker)}, stream)


def _gflownet(world) -> GFlowNetSampler:
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    return GFlowNetSampler(target, shifted, max_new_tokens=L, **TINY)


def _user_files(folder: Path) -> dict[str, str]:
    """A few files a user keeps in ``folder`` (names a careless glob would match)."""
    files = {
        "notes.tmp": "mine",
        "paper.tex": "\\documentclass{article}",
        "data/raw.tmp": "mine too",
        "iterates/my_adapter/README": "hand-made",
        "deep/a/b.tmp": "deep",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def _unchanged(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / n).is_file() and (folder / n).read_text() == t for n, t in files.items())


# -- 1. no code runs from files a user hands over ---------------------------------------------


def test_malicious_gflownet_trainer_state_does_not_run(world, tmp_path):
    sampler = _gflownet(world)
    checkpoint = sampler.save_checkpoint(tmp_path / "ck")
    marker = tmp_path / "pwned"
    _malicious_pickle(checkpoint / TRAINER_STATE, marker)
    resumed = _gflownet(world)
    with pytest.raises(
        ValueError, match=rf"{TRAINER_STATE}' holds objects other than tensors.*could run code"
    ):
        resumed.fit(world.train_prompts[:4], steps=2, checkpoint_dir=tmp_path / "ck", resume=True)
    assert not marker.exists()
    assert resumed.state.step == 0


def test_malicious_pickled_model_and_adapter_weights_do_not_run(world, tmp_path):
    """A ``pytorch_model.bin`` / ``adapter_model.bin`` that runs code when unpickled."""
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    world.base.save_pretrained(model_dir)
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            (model_dir / name).unlink()
    _malicious_pickle(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match="could not load name_or_path=.*corrupted"):
        Policy.from_pretrained(model_dir, device="cpu")
    assert not marker.exists()

    adapter_dir = tmp_path / "adapter"
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    policy.add_adapter("x").save_pretrained(adapter_dir)
    for weights in adapter_dir.rglob("adapter_model.safetensors"):
        weights.unlink()
        _malicious_pickle(weights.with_suffix(".bin"), marker)
    folder = next(adapter_dir.rglob("adapter_config.json")).parent
    fresh = world.load_policy("base", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="not a plain tensor file.*refused for safety"):
        fresh.load_adapter(folder, "x")
    assert not marker.exists()


def test_a_gflownet_checkpoint_with_non_finite_weights_is_refused(world, tmp_path):
    checkpoint = _gflownet(world).save_checkpoint(tmp_path / "ck")
    weights = next(checkpoint.glob("*.safetensors"))
    save_file({k: torch.full_like(v, math.nan) for k, v in load_file(weights).items()}, weights)
    resumed = _gflownet(world)
    with pytest.raises(ValueError, match="holds non-finite values .* retrain"):
        resumed.fit(world.train_prompts[:4], steps=2, checkpoint_dir=tmp_path / "ck", resume=True)
    with pytest.raises(ValueError, match="holds non-finite values"):
        GFlowNetSampler.load(checkpoint, resumed.target, resumed.init)
    assert resumed.state.step == 0


def test_a_checkpoint_dir_of_another_fit_is_never_replaced(world, tmp_path):
    _gflownet(world).fit(world.train_prompts[:4], steps=1, checkpoint_dir=tmp_path, progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = _gflownet(world)
    with pytest.raises(
        ValueError, match=r"already holds a GFlowNet fit .*resume=True \(--resume\)"
    ):
        other.fit(world.train_prompts[:4], steps=1, checkpoint_dir=tmp_path, progress=False)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before and other.state.step == 0


def test_no_other_path_unpickles_user_files():
    """Every ``torch.load`` in the package reads with ``weights_only=True``; no pickle module."""
    offenders = []
    for package in ("gfn_spin", "samplers", "objectives", "experiments"):
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                loads = "torch.load(" in code and "weights_only=True" not in code
                if loads or "import pickle" in code or "pickle.load" in code or "dill" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
                if "trust_remote_code=True" in code or "weights_only=False" in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# -- 2. nothing a user wrote is deleted --------------------------------------------------------


def test_a_foreign_non_empty_folder_is_refused_and_left_alone(world, tmp_path):
    folder = tmp_path / "project"
    files = _user_files(folder)
    config = AlphaSpinConfig(output_dir=str(folder), **RUN)
    trainer = AlphaSpinTrainer(config, world=world, evaluate=lambda policy: {})
    with pytest.raises(FileExistsError, match="is not empty .* not a gfn-spin run folder"):
        trainer.train()
    with pytest.raises(FileExistsError, match="output_dir=.*project.*choose a new or empty"):
        prepare_output_dir(folder)
    with pytest.raises(FileExistsError, match="not a gfn-spin run folder"):
        train_alpha_spin.main(["--output-dir", str(folder), "--max-examples", "32"])
    assert _unchanged(folder, files)
    assert sorted(p.name for p in folder.iterdir()) == ["data", "deep", "iterates", "notes.tmp",
                                                         "paper.tex"]  # fmt: skip


def test_a_run_folder_of_another_tool_is_refused(world, tmp_path):
    out = prepare_output_dir(tmp_path / "study", tool="experiments.geometric_mixture")
    (out / "results.json").write_text("{}")
    trainer = AlphaSpinTrainer(
        AlphaSpinConfig(output_dir=str(out), **RUN), world=world, evaluate=lambda p: {}
    )
    with pytest.raises(FileExistsError, match="is a run folder of experiments.geometric_mixture"):
        trainer.train()
    with pytest.raises(FileExistsError, match="not of experiments.sampler_ablation"):
        prepare_output_dir(out, tool="experiments.sampler_ablation")
    assert sorted(p.name for p in out.iterdir()) == [
        ".gfn-spin-run.json",
        LOCK_FILE,
        "results.json",
    ]


def test_output_dir_dot_in_a_project_is_refused(tmp_path, monkeypatch):
    files = _user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match=r"output_dir='\.' is not empty"):
        prepare_output_dir(".")
    assert _unchanged(tmp_path, files)
    assert not (tmp_path / RUN_MARKER).exists() and not (tmp_path / LOCK_FILE).exists()


def test_a_resumed_run_removes_only_its_own_leftovers(world, tmp_path):
    """Temporaries named as the run's writers name them, and unlisted ``iter_N`` folders, go;
    any other file (even ``*.tmp`` in the run's own subfolders) stays."""
    trainer = AlphaSpinTrainer(
        AlphaSpinConfig(output_dir=str(tmp_path), **RUN), world=world, evaluate=lambda p: {}
    )
    manifest = {"identity": trainer.identity, "done": ["eval_0"], "records": []}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    files = _user_files(tmp_path)
    kept = {
        "opponents/gflownet_0/gflownet_config.json": "{}",  # a finished save: the warm start
        "opponents/my_gflownet.abcd1234.tmp/README": "not a name the run writes",
        "opponents/gflownet_1.short.tmp/README": "not a temporary name of the run's writers",
    }
    for name, text in kept.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files |= kept
    own = [
        "manifest.json.ab12cd34.tmp",
        "data/iteration_0.parquet.Zx_9k2Lq.tmp",
        "iterates/iter_1/adapter_config.json",  # unlisted: written just before a kill
        "iterates/iter_2.k3j4l5m6.tmp/adapter_config.json",
        "opponents/gflownet_1.Ab3_x9Zq.tmp/gflownet_config.json",  # a kill during sampler.save
        "opponents/gflownet_0.old.p0q1r2s3.tmp/gflownet_config.json",  # ... while replacing
    ]
    for name in own:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("partial")
    # The unlisted iterate was published whole, with the list of the files its save wrote.
    listing = {"files": ["adapter_config.json"], "complete": True}
    (tmp_path / "iterates" / "iter_1" / DIRECTORY_MARKER).write_text(json.dumps(listing))
    run = RunDirectory(tmp_path, trainer.identity, PartialState(cpu=True))
    run.close()
    assert _unchanged(tmp_path, files)
    assert not any((tmp_path / name).exists() for name in own)
    assert not (tmp_path / "iterates" / "iter_1").exists()


def test_save_pretrained_refuses_a_folder_holding_files(world, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    policy = world.load_policy("base", device="cpu", dtype=torch.float32)
    with pytest.raises(FileExistsError, match="directory=.* is not empty; save_pretrained"):
        policy.add_adapter("x").save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "mine"
    policy.with_adapter("x").save_pretrained(tmp_path / "fresh")  # a new folder is fine
    assert (tmp_path / "fresh" / "adapter_config.json").is_file() or any(
        (tmp_path / "fresh").rglob("adapter_config.json")
    )


# -- 4. one run per folder at a time -------------------------------------------------------


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the lock of ``tmp_path / "run"`` (a run in progress)."""
    folder = tmp_path / "run"
    folder.mkdir()
    script = (
        "import sys, time; from gfn_spin.io import claim_run_directory; "
        f"claim_run_directory(sys.argv[1], tool={RUN_TOOL!r}); print('locked', flush=True); "
        "time.sleep(120)"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        yield folder
    finally:
        other.kill()
        other.wait()


def test_a_second_run_on_a_locked_folder_is_refused(world, held_lock):
    before = sorted(os.listdir(held_lock))
    with pytest.raises(DirectoryInUseError, match="output_dir=.* is in use by another run"):
        prepare_output_dir(held_lock, tool=RUN_TOOL)
    config = AlphaSpinConfig(output_dir=str(held_lock), **RUN)
    trainer = AlphaSpinTrainer(config, world=world, evaluate=lambda policy: {})
    with pytest.raises(DirectoryInUseError, match="wait for that run to finish"):
        trainer.train()
    assert sorted(os.listdir(held_lock)) == before == sorted([LOCK_FILE, RUN_MARKER])


def test_the_lock_is_released_when_the_other_run_ends(tmp_path):
    folder = tmp_path / "run"
    script = "import sys; from gfn_spin.io import claim_run_directory; claim_run_directory(sys.argv[1], tool='t')"
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True, cwd=ROOT)
    assert prepare_output_dir(folder, tool="t") == folder  # the first process ended: free again


# -- 9. a run's outputs are one set ----------------------------------------------------------


def _study(folder: Path, alphas: list[float], *, fail: bool = False) -> None:
    """What a study does with :func:`output_set`: a log, one adapter folder per α, results."""
    root = prepare_output_dir(folder, tool="tests.study")
    with output_set(root) as staging:
        log = setup_logging(staging, "tests.study", append=False)
        log.info("alphas %s", alphas)
        for alpha in alphas:
            (staging / f"gflownet_alpha{alpha:g}").mkdir()
            (staging / f"gflownet_alpha{alpha:g}" / "w").write_text(str(alpha))
        if fail:
            raise RuntimeError("killed mid-run")
        (staging / "results.json").write_text(json.dumps({"alphas": alphas}))
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_reusing_an_output_folder_replaces_the_whole_set(tmp_path):
    out = tmp_path / "out"
    _study(out, [0.5, 0.95])
    _study(out, [0.5])
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["gflownet_alpha0.5", "results.json", "run.log"]
    log = (out / "run.log").read_text()
    assert "alphas [0.5]" in log and "0.95" not in log
    # A run that fails leaves the last complete set as it was.
    with pytest.raises(RuntimeError):
        _study(out, [0.8], fail=True)
    assert json.loads((out / "results.json").read_text()) == {"alphas": [0.5]}
    assert not (out / "gflownet_alpha0.8").exists()
    _study(out, [0.8])
    assert not [p for p in out.iterdir() if p.name.startswith(".run-outputs")]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "gflownet_alpha0.8",
        "results.json",
        "run.log",
    ]


def test_an_output_set_never_replaces_a_file_it_did_not_write(tmp_path):
    out = prepare_output_dir(tmp_path / "out", tool="tests.study")
    (out / "results.json").write_text("a user's file, put there after the folder was claimed")
    with pytest.raises(FileExistsError, match=r"already holds \['results.json'\]"):
        with output_set(out) as staging:
            (staging / "results.json").write_text("{}")
    assert (out / "results.json").read_text().startswith("a user's file")


def test_a_prompts_file_too_small_to_split_is_refused(tmp_path):
    path = tmp_path / "prompts.txt"
    for text, count in (("only one prompt\n", 1), ("\n  \n", 0)):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"prompts_file holds {count} prompt\(s\)"):
            read_prompts_file(path)
    path.write_bytes("caf\xe9\nb\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_prompts_file(path)
    with pytest.raises(FileNotFoundError, match="prompts_file=.*none.txt' is not a file"):
        read_prompts_file(tmp_path / "none.txt")
    path.write_text("p1\np2\n\np3\np4\np5\n")
    train, held_out = split_train_eval(read_prompts_file(path))
    assert train == ["p1", "p2", "p3", "p4"] and held_out == ["p5"]


def test_a_changed_dataset_is_refused_on_resume(world, tmp_path):
    rows = {"prompt": ["a b", "c d"] * 16, "response": ["a b", "c d"] * 16}
    config = AlphaSpinConfig(output_dir=str(tmp_path / "run"), **RUN)
    first = AlphaSpinTrainer(config, world=world, dataset=Dataset.from_dict(rows))
    run = RunDirectory(tmp_path / "run", first.identity, PartialState(cpu=True))
    run.complete("eval_0", {"iteration": 0, "metrics": {}})
    run.close()
    rows["response"][3] = "d c"  # one response edited between the runs
    second = AlphaSpinTrainer(config, world=world, dataset=Dataset.from_dict(rows))
    with pytest.raises(ValueError, match="dataset's content differs from the run's"):
        second.train()
    assert json.loads((tmp_path / "run" / MANIFEST).read_text())["done"] == ["eval_0"]


def test_nonsense_metrics_json_is_rewritten_from_the_manifest(world, tmp_path):
    trainer = AlphaSpinTrainer(
        AlphaSpinConfig(output_dir=str(tmp_path), **RUN), world=world, evaluate=lambda p: {}
    )
    run = RunDirectory(tmp_path, trainer.identity, PartialState(cpu=True))
    run.complete("eval_0", {"iteration": 0, "metrics": {"kl": 1.0}})
    run.close()
    for nonsense in ("{not json", '"a string"', "[1, 2]"):
        (tmp_path / "metrics.json").write_text(nonsense)
        RunDirectory(tmp_path, trainer.identity, PartialState(cpu=True)).close()
        assert json.loads((tmp_path / "metrics.json").read_text()) == [
            {"iteration": 0, "metrics": {"kl": 1.0}}
        ]
