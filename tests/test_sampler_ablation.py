"""Smoke test of experiments.sampler_ablation: a tiny run writes its CSV, JSON, plot and log."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import sampler_ablation


def test_tiny_ablation_writes_outputs(world, tmp_path):
    out = tmp_path / "ablation"
    results = sampler_ablation.main(
        [
            "--output-dir", str(out),
            "--world-cache", str(world.directory.parent),
            "--num-eval-prompts", "1",
            "--draws", "8",
            "--sir-candidates", "2",
            "--smc-particles", "2",
            "--gfn-base", "steps=3", "prompts_per_step=2", "samples_per_prompt=2",
            "--gfn-variants", "subtb_lambda=0.9",
            "--torchgfn-steps", "2",
            "--large", "false",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = list(csv.DictReader((out / "ablation.csv").open(encoding="utf-8")))
    sections = {row["section"] for row in rows}
    assert sections == {"sweep", "torchgfn"}
    gflownet = [r for r in rows if r["name"].startswith("GFlowNet")]
    assert len(gflownet) == 2 and all(0.0 <= float(r["tv"]) <= 1.0 for r in gflownet)
    torchgfn = [r for r in rows if r["section"] == "torchgfn"]
    # equal numbers of target evaluations (scored responses) on both sides
    assert torchgfn[0]["target_evaluations"] == torchgfn[1]["target_evaluations"] == "8"
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert payload["config"]["draws"] == 8 and len(payload["rows"]) == len(results["rows"])
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "run.log").stat().st_size > 0


def test_bad_setting_is_rejected_before_work(tmp_path):
    with pytest.raises(ValueError, match="bad GFlowNet setting"):
        sampler_ablation.main(["--output-dir", str(tmp_path), "--gfn-variants", "nonsense=1"])
