"""Data parallel under ``accelerate launch``: 2 CPU processes (gloo) end with identical weights,
and match a single-process run with the same global batch up to float tolerance (gradient
accumulation included)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.launch import run_two_and_one

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
    dp, single = run_two_and_one(
        SCRIPT, str(world.directory.parent), json.dumps(CONFIG), tmp_path, port=29517, timeout=120
    )
    rank0, rank1 = (torch.load(dp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    alone = torch.load(single / "rank0.pt", weights_only=True)
    assert rank0["weights"].keys() == rank1["weights"].keys() == alone["weights"].keys()
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, alone["weights"][name], atol=1e-4, rtol=1e-4)
    for dp, one in zip(rank0["records"], alone["records"], strict=True):
        assert dp["metrics"].keys() == one["metrics"].keys()
        for key, value in dp["metrics"].items():
            assert value == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key
