"""The GFlowNet fit data parallel under ``accelerate launch``: 2 CPU processes (gloo) end with
identical weights, and match one process with the same global batch up to float tolerance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from gfn_spin import GeometricMixture
from gfn_spin.samples import ancestral_sample
from samplers import GFlowNetSampler
from samplers.gflownet.trainer import StateRecorder
from tests.launch import LAUNCH, run_two_and_one

SCRIPT = Path(__file__).with_name("run_gflownet_fit.py")
L = 7
BATCH = {"prompts_per_step": 4, "samples_per_prompt": 4}  # the global batch: 16 responses
LEARNING_RATE = 2e-3
CONFIGS = [
    # The twist head is the prepared module: each process backpropagates its share of the rows.
    {"parametrization": "twist", "twist_updates": 2, "replay_prob": 0.3},
    # LoRA's forward runs inside a Policy: every process takes the whole batch's step.
    {"parametrization": "lora"},
]
COMMON = {"max_new_tokens": L, "steps": 3, "warmup_steps": 1, "learning_rate": LEARNING_RATE}


def test_twist_shares_sum_to_the_whole_batch_gradient(world):
    """Each process backpropagates the loss through its rows only; averaged over processes
    (what the prepared head does), those gradients are the one-process gradient."""
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(target, shifted, max_new_tokens=L, parametrization="twist", **BATCH)
    trainer = sampler.trainer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the head starts at zero twist; move it so every weight has gradient
        for param in sampler.trainable_parameters:
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    prompts = [list(p) for p in world.train_prompts[:4]]
    recorder = StateRecorder(sampler.weights.rollout_reader(), L)
    samples = ancestral_sample(
        sampler.policy, prompts, 4, max_new_tokens=L, generator=0, on_state=recorder
    )
    rows = [p for p in prompts for _ in range(4)]
    group = torch.arange(len(prompts) * 4) // 4
    stored = sampler.weights.training_batch(
        target, rows, samples.response_ids, samples.lengths, group, recorder.values
    )

    def gradient(processes: int, rank: int) -> list[torch.Tensor]:
        trainer.accelerator = SimpleNamespace(num_processes=processes, process_index=rank)
        _, share = trainer.batch_loss(stored, 1.0)
        return torch.autograd.grad(share, sampler.trainable_parameters)

    whole = gradient(1, 0)
    shares = [gradient(2, rank) for rank in (0, 1)]
    # float32 sums over the batch's B·(L+1) states in another order: each gradient entry may
    # differ by about that many roundings of its largest term.
    states = len(samples.lengths) * (L + 1)
    for one, first, second in zip(whole, *shares, strict=True):
        averaged = (first + second) / 2
        atol = states * torch.finfo(torch.float32).eps * one.abs().max()
        torch.testing.assert_close(averaged, one, rtol=0, atol=float(atol))
        assert not torch.equal(first, second)  # the shares are different rows


def test_a_fit_inside_an_accumulating_run_steps_every_time_and_keeps_its_setting(world):
    """accelerate keeps one gradient state per process: a GFlowNet fit inside an α-SPIN run
    that accumulates over 2 batches (and stands mid-cycle) still takes every step, the same
    ones as a fit on its own, and leaves the run's setting as it found it."""

    def fit() -> list[torch.Tensor]:
        shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
        target = GeometricMixture([world.base, shifted], [0.5, 0.5])
        sampler = GFlowNetSampler(target, shifted, **COMMON, **BATCH, parametrization="twist")
        sampler.fit(world.train_prompts[:16], progress=False)
        return [p.detach().clone() for p in sampler.trainable_parameters]

    alone = fit()
    outer = Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        with outer.accumulate():
            assert not outer.sync_gradients  # mid-cycle: an optimizer step here is skipped
        inside = fit()
        assert outer.gradient_accumulation_steps == 2
    finally:
        outer.gradient_accumulation_steps = 1
    for mine, theirs in zip(inside, alone, strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.slow  # two launches of the accelerate CLI, a minute on 2 busy CPU cores
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_cpu_processes_match_single_process(world, tmp_path):
    configs = json.dumps([{**COMMON, **BATCH, **c} for c in CONFIGS])
    dp, single = run_two_and_one(
        SCRIPT, str(world.directory.parent), configs, tmp_path, port=29519, timeout=300
    )
    rank0, rank1 = (torch.load(dp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    alone = torch.load(single / "rank0.pt", weights_only=True)
    for config, dp, other, one in zip(CONFIGS, rank0, rank1, alone, strict=True):
        assert dp["weights"].keys() == other["weights"].keys() == one["weights"].keys()
        for name, value in dp["weights"].items():
            # Both ranks apply the same all-reduced gradient: bitwise the same weights.
            assert torch.equal(value, other["weights"][name]), (config, name)
            assert not torch.equal(value, dp["initial"][name]), (config, name)  # it trained
            # Against one process the gradients differ by float32 summation order only. Adam
            # scales each entry's step to about the learning rate and keeps a relative gradient
            # error relative, so the weights differ by a tiny fraction of one step, while a
            # wrong share of rows changes the steps by their whole size: allow 1% of one step.
            torch.testing.assert_close(
                value, one["weights"][name], rtol=0, atol=0.01 * LEARNING_RATE
            )
        assert len(dp["metrics"]) == len(one["metrics"]) == COMMON["steps"]
        for ours, theirs in zip(dp["metrics"], one["metrics"], strict=True):
            assert ours["source"] == theirs["source"]
            for key in ("loss", "log_reward", "empty_fraction"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (config, key)


@pytest.mark.slow  # one launch of the accelerate CLI
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_a_refused_checkpoint_dir_stops_every_process(world, tmp_path):
    """Only the main process claims checkpoint_dir; when it refuses a user's folder, the other
    process stops by itself and says why, rather than wait for it at the first checkpoint
    (torchrun tears the group down when one process fails; a launcher that does not would
    hang). The user's folder is left as it was."""
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("a user's file")
    configs = json.dumps([{**COMMON, **BATCH, **CONFIGS[0]}])
    command = [
        *LAUNCH, "--main_process_port", "29521", str(SCRIPT), str(world.directory.parent),
        str(tmp_path / "out"), configs, str(foreign),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "could not claim checkpoint_dir" in done.stdout + done.stderr  # the other rank
    assert (foreign / "mine.txt").read_text() == "a user's file"
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]
