"""Data parallel under ``accelerate launch``: 2 CPU processes (gloo) end with identical weights,
and match a single-process run with the same global batch up to float tolerance (gradient
accumulation included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("run_alpha_spin.py")

CONFIG = {
    "alpha": 1.0,
    "history": 2,
    "iterations": 2,
    "max_examples": 64,
    "batch_size": 8,
    "gradient_accumulation_steps": 2,
    "epochs": 1,
    "generation_chunk": 16,
}


@pytest.mark.slow  # two launches of the accelerate CLI: over a minute on 2 CPU cores
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_cpu_processes_match_single_process(world, tmp_path):
    script = SCRIPT
    cache = str(world.directory.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launcher needs MPI for several processes; --multi_gpu uses torchrun,
    # and the trainer asks accelerate for gloo on CPU.
    launch = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
    ]  # fmt: skip
    args = [str(script), cache, str(tmp_path / "dp"), json.dumps(CONFIG)]
    subprocess.run(launch + args, check=True, env=env, capture_output=True, timeout=120)
    single = [sys.executable, str(script), cache, str(tmp_path / "single"), json.dumps(CONFIG)]
    subprocess.run(single, check=True, env=env, capture_output=True, timeout=120)

    rank0, rank1 = (torch.load(tmp_path / "dp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    alone = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert rank0["weights"].keys() == rank1["weights"].keys() == alone["weights"].keys()
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, alone["weights"][name], atol=1e-4, rtol=1e-4)
    for dp, one in zip(rank0["records"], alone["records"], strict=True):
        assert dp["metrics"].keys() == one["metrics"].keys()
        for key, value in dp["metrics"].items():
            assert value == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key
