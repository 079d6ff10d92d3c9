"""The α-SPIN GFlowNet opponent warm-started from the previous iteration's fit: it starts from
those weights, is deterministic under a seed, falls back to a cold start (with a logged
reason) when the shapes differ, and a killed run resumed from its folder ends as an
uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gfn_spin import GeometricMixture
from gfn_spin.samples import ancestral_sample
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler
from selfplay import AlphaSpinConfig
from selfplay.opponents import fit_opponent_gflownet

SMALL = {
    "max_new_tokens": 7,
    "prompts_per_step": 4,
    "samples_per_prompt": 4,
    "warmup_steps": 1,
    "learning_rate": 1e-2,
    "twist_width": 16,
    "twist_depth": 1,
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "steps": 3,
}


@pytest.fixture(scope="module")
def setting(world):
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    return target, shifted, [list(p) for p in world.train_prompts[:8]]


def sampler(setting, name: str, **fields) -> GFlowNetSampler:
    target, init, _ = setting
    return GFlowNetSampler(target, init, GFlowNetConfig(**{**SMALL, **fields}), adapter_name=name)


def weights(s: GFlowNetSampler) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in s.weights.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_q(s: GFlowNetSampler, prompts: list[list[int]], draws) -> torch.Tensor:
    rows = [prompts[i] for i in draws.prompt_index.tolist()]
    return s.policy.log_prob(rows, draws.response_ids, draws.lengths)


@pytest.mark.parametrize("form", ["twist", "lora"])
def test_warm_start_begins_from_the_previous_weights(setting, form, tmp_path):
    prompts = setting[2]
    previous = sampler(setting, f"prev_{form}", parametrization=form, seed=1)
    previous.fit(prompts, 3, progress=False)
    before = weights(previous)
    if form == "lora":  # a fresh adapter's B matrices are zero: the fit moved them
        assert any(v.abs().sum() > 0 for k, v in before.items() if "lora_B" in k)

    warm = sampler(setting, f"warm_{form}", parametrization=form, seed=2)
    cold = weights(warm)
    warm.warm_start(previous)
    assert same(weights(warm), before) and not same(weights(warm), cold)
    # The first step's policy is the previous fit's policy, draw for draw.
    draws = ancestral_sample(
        previous.policy, prompts, 4, max_new_tokens=7, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(log_q(warm, prompts, draws), log_q(previous, prompts, draws))

    previous.save(tmp_path / "previous")
    from_folder = sampler(setting, f"folder_{form}", parametrization=form, seed=2)
    from_folder.warm_start(tmp_path / "previous")
    assert same(weights(from_folder), before)

    # Same seed, same source: the same warm fit, step for step.
    warm.fit(prompts, 3, progress=False)
    from_folder.fit(prompts, 3, progress=False)
    assert [m["loss"] for m in warm.metrics] == [m["loss"] for m in from_folder.metrics]
    assert same(weights(warm), weights(from_folder))
    assert not same(weights(warm), before)


def test_warm_start_refuses_other_shapes_and_late_calls(setting, tmp_path):
    prompts = setting[2]
    narrow = sampler(setting, "narrow", parametrization="twist", twist_width=8)
    with pytest.raises(ValueError, match="differ in name or shape"):
        sampler(setting, "wide", parametrization="twist").warm_start(narrow)
    lora = sampler(setting, "lora_src", parametrization="lora")
    with pytest.raises(ValueError, match="parametrization 'lora' differs"):
        sampler(setting, "twist_dst", parametrization="twist").warm_start(lora)
    started = sampler(setting, "started", parametrization="twist")
    started.fit(prompts, 1, progress=False)
    with pytest.raises(ValueError, match="must precede the fit"):
        started.warm_start(narrow)
    with pytest.raises(FileNotFoundError):
        sampler(setting, "nowhere", parametrization="twist").warm_start(tmp_path / "missing")


def test_mismatched_shape_falls_back_to_a_logged_cold_start(setting, caplog):
    prompts = setting[2]
    config = AlphaSpinConfig(gflownet_warm_start=True, gflownet_warm_steps=2)
    narrow = sampler(setting, "fallback_src", parametrization="twist", twist_width=8)
    fallback = sampler(setting, "fallback", parametrization="twist", seed=3)
    with caplog.at_level(logging.WARNING, logger="selfplay.opponents"):
        warm = fit_opponent_gflownet(config, fallback, prompts, narrow)
    assert not warm
    assert "cold start" in caplog.text and "differ in name or shape" in caplog.text
    # A cold fit: fresh weights and gflownet.steps, exactly as without a source.
    cold = sampler(setting, "fallback_cold", parametrization="twist", seed=3)
    fit_opponent_gflownet(config, cold, prompts, None)
    assert fallback.state.step == cold.state.step == SMALL["steps"]
    assert same(weights(fallback), weights(cold))


def test_warm_fit_takes_the_warm_steps(setting):
    prompts = setting[2]
    config = AlphaSpinConfig(gflownet_warm_start=True, gflownet_warm_steps=2)
    previous = sampler(setting, "steps_src", parametrization="twist")
    previous.fit(prompts, progress=False)
    warm = sampler(setting, "steps_warm", parametrization="twist")
    assert fit_opponent_gflownet(config, warm, prompts, previous)
    assert warm.state.step == 2
    rate = config.gflownet_warm_learning_rate
    assert warm.config.learning_rate == rate and warm.config.warmup_steps == 0
    # The first step at the warm peak (no warmup), the last one as the schedule says.
    assert warm.learning_rate(0, 2) == rate
    assert warm.metrics[-1]["lr"] == warm.learning_rate(1, 2) < rate
    off = sampler(setting, "steps_off", parametrization="twist")
    disabled = AlphaSpinConfig(gflownet_warm_start=False, gflownet_warm_steps=2)
    assert not fit_opponent_gflownet(disabled, off, prompts, previous)
    assert off.state.step == 3


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_warm_steps_must_be_a_count(value):
    with pytest.raises(ValueError, match="gflownet_warm_steps"):
        AlphaSpinConfig(gflownet_warm_steps=value)


SCRIPT = Path(__file__).with_name("run_alpha_spin.py")
RUN = {
    "alpha": 0.8,
    "history": 2,
    "sampler": "gflownet",
    "gflownet": {**SMALL, "steps": 6, "checkpoint_every": 0},
    "gflownet_warm_start": True,
    "gflownet_warm_steps": 3,
    "iterations": 3,
    "max_examples": 64,
    "batch_size": 16,
    "epochs": 1,
    "generation_chunk": 16,
}


def run_command(cache: Path, out: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), str(cache), str(out), json.dumps(RUN)]


def done_steps(out: Path) -> list[str]:
    try:
        return json.loads((out / "manifest.json").read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_killed_run_resumes_the_warm_start_from_its_folder(world, tmp_path):
    cache = world.directory.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    subprocess.run(run_command(cache, reference), check=True, env=env, capture_output=True)
    expected = torch.load(reference / "rank0.pt", weights_only=True)

    # Kill once iteration 1's opponent is saved and before iteration 2's data exist: the
    # resumed run must warm-start iteration 2 from the folder (nothing is left in memory).
    out = tmp_path / "killed"
    proc = subprocess.Popen(run_command(cache, out), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while "data_1" not in done_steps(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = done_steps(out)
    assert "data_1" in at_kill and "data_2" not in at_kill, at_kill
    resumed = subprocess.run(
        run_command(cache, out), check=True, env=env, capture_output=True, text=True
    )
    assert "cold start" not in resumed.stderr
    result = torch.load(out / "rank0.pt", weights_only=True)
    assert [r["metrics"] for r in result["records"]] == [r["metrics"] for r in expected["records"]]
    # The iterates' adapters (the killed run never rebuilt iteration 1's GFlowNet adapter).
    iterates = [
        {k: v for k, v in r["weights"].items() if "gflownet" not in k} for r in (result, expected)
    ]
    assert same(*iterates)
    for t in (1, 2):
        (saved,) = (reference / "opponents" / f"gflownet_{t}").glob("*.safetensors")
        resaved = out / "opponents" / f"gflownet_{t}" / saved.name
        assert resaved.read_bytes() == saved.read_bytes()
