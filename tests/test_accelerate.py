"""Data parallel under ``accelerate launch``: 2 CPU processes (gloo) end with identical weights,
and match a single-process run with the same global batch up to float tolerance (gradient
accumulation included); with the opponent probe on (main process, broadcast), every rank
records the same figures."""

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


#: α < 1 with a SIR opponent and the opponent probe, which runs on the main process and is
#: broadcast: every rank records the same figures, those of a single process.
PROBED = {**CONFIG, "alpha": 0.8, "sampler": "importance", "num_candidates": 4, "probe_prompts": 2}


@pytest.mark.slow  # two launches of the accelerate CLI: over a minute on 2 CPU cores
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
@pytest.mark.parametrize(
    ("config", "port"), [(CONFIG, 29517), (PROBED, 29518)], ids=["exact", "probed"]
)
def test_two_cpu_processes_match_single_process(world, tmp_path, config, port):
    dp, single = run_two_and_one(
        SCRIPT, str(world.directory.parent), json.dumps(config), tmp_path, port=port, timeout=120
    )
    rank0, rank1 = (torch.load(dp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [r["metrics"] for r in rank0["records"]] == [r["metrics"] for r in rank1["records"]]
    if config is PROBED:
        assert rank0["records"][2]["metrics"]["opponent/kl_bound_se"] > 0
    alone = torch.load(single / "rank0.pt", weights_only=True)
    assert rank0["weights"].keys() == rank1["weights"].keys() == alone["weights"].keys()
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        torch.testing.assert_close(value, alone["weights"][name], atol=1e-4, rtol=1e-4)
    for dp, one in zip(rank0["records"], alone["records"], strict=True):
        assert dp["metrics"].keys() == one["metrics"].keys()
        for key, value in dp["metrics"].items():
            assert value == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key
