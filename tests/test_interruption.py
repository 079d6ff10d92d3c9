"""GFlowNet fits interrupted for real: SIGKILL at a random (seeded) point, then the same command
again, ends exactly where an uninterrupted fit ends; partial checkpoints are never loaded.

The α-SPIN counterpart (a killed run restarted) is ``tests/test_alpha_spin_resume.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gfn_spin import GeometricMixture
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler, latest_checkpoint

STEPS = 24
SCRIPT = f"""
import sys, time
import torch
torch.set_num_threads(1)
from gfn_spin import GeometricMixture
from gfn_spin.io import write_json_atomic
from worlds.toy import build_world
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler
cache, checkpoints, out = sys.argv[1:4]
world = build_world(cache_dir=cache)
shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
target = GeometricMixture([world.base, shifted], [0.5, 0.5])
config = GFlowNetConfig(
    max_new_tokens=7, checkpoint_every=1, prompts_per_step=4, samples_per_prompt=4,
    warmup_steps=1, learning_rate=1e-2, replay_prob=0.3, explore_prob=0.5,
)
sampler = GFlowNetSampler(target, shifted, config)
started = time.perf_counter()
sampler.fit(
    world.train_prompts[:8], steps={STEPS}, checkpoint_dir=checkpoints, resume=True,
    progress=False, log_every=1,
)
seconds = time.perf_counter() - started
draws = sampler.sample(world.eval_prompts[:2], 4, generator=0)
write_json_atomic(
    {{
        "losses": [m["loss"] for m in sampler.metrics],
        "steps": [m["step"] for m in sampler.metrics],
        "log_q": draws.log_q.tolist(),
        "responses": draws.responses(),
        "seconds": seconds,
    }},
    out,
)
"""


def test_sigkilled_gflownet_fit_resumes_to_the_uninterrupted_result(world, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def command(name: str) -> list[str]:
        cache = str(world.directory.parent)
        return [
            sys.executable,
            str(script),
            cache,
            str(tmp_path / name),
            str(tmp_path / f"{name}.json"),
        ]

    subprocess.run(command("reference"), check=True, env=env, capture_output=True)
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert expected["steps"] == list(range(1, STEPS + 1))

    rng = random.Random(os.environ.get("KILL_SEED", "0"))
    checkpoints = tmp_path / "killed"
    proc = subprocess.Popen(command("killed"), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while latest_checkpoint(checkpoints) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # Somewhere in the remaining training: mid-step, or mid-checkpoint write.
    time.sleep(rng.uniform(0.0, 0.7 * expected["seconds"]))
    killed_mid_fit = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = latest_checkpoint(checkpoints)
    assert killed_mid_fit and not (tmp_path / "killed.json").exists(), (
        "the fit ended before the kill"
    )

    subprocess.run(command("killed"), check=True, env=env, capture_output=True)
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert resumed["steps"] == expected["steps"], f"killed at {reached}"
    assert resumed["losses"] == pytest.approx(expected["losses"], rel=1e-5, abs=1e-7)
    assert resumed["responses"] == expected["responses"]
    assert resumed["log_q"] == pytest.approx(expected["log_q"], rel=1e-5, abs=1e-6)
    assert [
        p.name
        for p in checkpoints.iterdir()
        if not p.name.endswith(".tmp") and not p.name.startswith(".")
    ] == [f"step_{STEPS:07d}"]


def test_partial_and_truncated_checkpoints_are_never_loaded(world, tmp_path):
    """A temporary sibling (what a kill mid-write leaves) and an incomplete folder are skipped;
    a complete-looking but truncated one is refused with the fix, before any training."""

    def sampler() -> GFlowNetSampler:
        shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
        target = GeometricMixture([world.base, shifted], [0.5, 0.5])
        config = GFlowNetConfig(
            max_new_tokens=7, prompts_per_step=2, samples_per_prompt=2, warmup_steps=1
        )
        return GFlowNetSampler(target, shifted, config)

    prompts = world.train_prompts[:4]
    first = sampler()
    first.fit(prompts, steps=2, checkpoint_dir=tmp_path, progress=False)
    good = tmp_path / "step_0000002"
    # A kill during atomic_directory leaves "step_NNNNNNN.<random>.tmp": complete-looking files
    # under a temporary name, here claiming a later step.
    partial = tmp_path / "step_0000009.k3x_a1.tmp"
    shutil.copytree(good, partial)
    (partial / "metrics.json").write_text(json.dumps({"step": 9, "metrics": []}))
    incomplete = tmp_path / "step_0000008"  # no trainer state: not a finished checkpoint
    incomplete.mkdir()
    weights = first.weights.weights_file  # the trainable tensors' file of this parametrization
    shutil.copy(good / weights, incomplete)
    assert latest_checkpoint(tmp_path) == good

    resumed = sampler()
    resumed.fit(prompts, steps=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert resumed.state.step == 3  # continued from step 2: one more step, not from 8 or 9
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    assert partial.is_dir()  # never deleted as if it were a finished checkpoint

    truncated = latest_checkpoint(tmp_path) / weights
    truncated.write_bytes(truncated.read_bytes()[:100])
    refused = sampler()
    with pytest.raises(ValueError, match=f"{weights}' is corrupted or truncated"):
        refused.fit(prompts, steps=5, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert refused.state.step == 0
    (tmp_path / "step_0000003" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="trainer_state.pt' is corrupted or truncated"):
        sampler().fit(prompts, steps=5, checkpoint_dir=tmp_path, resume=True, progress=False)


class _Worker:
    """A data-parallel process other than the main one: the real accelerator's training
    machinery, with the rank and the barrier counted."""

    is_main_process = False

    def __init__(self, accelerator: object) -> None:
        self._accelerator = accelerator
        self.waits = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._accelerator, name)

    def wait_for_everyone(self) -> None:
        self.waits += 1


def test_only_the_main_process_writes_checkpoints_and_every_process_resumes(world, tmp_path):
    """A non-main process neither claims nor writes ``checkpoint_dir`` (it waits at each save
    for the main one), and resumes from the main process's checkpoint like it."""

    def sampler(main: bool) -> GFlowNetSampler:
        shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
        target = GeometricMixture([world.base, shifted], [0.5, 0.5])
        config = GFlowNetConfig(
            max_new_tokens=7, prompts_per_step=2, samples_per_prompt=2, checkpoint_every=1
        )
        built = GFlowNetSampler(target, shifted, config)
        if not main:
            built.trainer.accelerator = _Worker(built.trainer.accelerator)
        return built

    prompts = world.train_prompts[:4]
    worker = sampler(main=False)
    worker.fit(prompts, steps=2, checkpoint_dir=tmp_path / "fit", progress=False)
    assert not (tmp_path / "fit").exists()
    assert worker.trainer.accelerator.waits == 3  # after steps 1 and 2, and at the end

    main = sampler(main=True)
    main.fit(prompts, steps=2, checkpoint_dir=tmp_path / "fit", progress=False)
    resumed = sampler(main=False)
    resumed.fit(prompts, steps=3, checkpoint_dir=tmp_path / "fit", resume=True, progress=False)
    assert resumed.state.step == 3  # continued from the main process's step 2
    assert latest_checkpoint(tmp_path / "fit").name == "step_0000002"  # the worker wrote none
