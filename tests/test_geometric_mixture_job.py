"""The main job end to end with a tiny budget: table, results.json, plot, log, --help."""

from __future__ import annotations

import json

import pytest

from experiments import geometric_mixture
from experiments.common import build_parser, field_docs


def test_main_job_smoke(world, tmp_path, capsys):
    out = tmp_path / "run"
    results = geometric_mixture.main(
        [
            "--output-dir", str(out),
            "--world-cache", str(world.directory.parent),
            "--alphas", "0.5",
            "--gfn-steps", "4",
            "--num-eval-prompts", "2",
            "--draws", "8",
            "--sir-candidates", "4",
            "--smc-particles", "4",
            "--gfn-sir-candidates", "2",
            "--progress", "false",
        ]
    )  # fmt: skip
    names = [row["name"] for row in results["rows"]]
    assert names == [
        "ancestral π_t",
        "local product",
        "SIR K=4",
        "SMC N=4",
        "GFlowNet",
        "SIR(GFlowNet) K=2",
    ]
    for row in results["rows"]:
        assert 0.0 <= row["tv"] <= 1.0 and row["kl"] >= 0.0
        assert 0.0 <= row["ess_fraction"] <= 1.0 + 1e-9
        assert row["tokens_per_draw"] > 0 and row["draws_per_second"] > 0
        assert (row["measure"] == "exact") == (row["noise_floor_tv"] is None)
    # π_t's exact TV to the α = 0.5 mixture is far from zero (the target is not trivial).
    assert results["rows"][0]["tv"] > 0.15
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["alphas"] == [0.5]
    assert saved["environment"]["packages"]["torch"]
    assert "commit" in saved["environment"]["git"]
    assert (out / "error_vs_cost.png").stat().st_size > 0
    assert "GFlowNet" in (out / "run.log").read_text()
    assert (out / "gflownet_alpha_0_5" / "adapter_model.safetensors").is_file()
    assert "SIR(GFlowNet) K=2" in capsys.readouterr().out


def test_every_flag_is_documented():
    docs = field_docs(geometric_mixture.GeometricMixtureConfig)
    parser = build_parser(geometric_mixture.GeometricMixtureConfig)
    flags = [a for a in parser._actions if a.dest != "help"]
    assert flags and all(docs.get(a.dest) for a in flags)
    text = parser.format_help()
    assert "--gfn-parametrization" in text and "--seed" in text and "--device" in text


def test_bad_flags_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="--base"):
        geometric_mixture.main(["--output-dir", str(tmp_path), "--model", "x"])
    with pytest.raises(ValueError, match="draws"):
        geometric_mixture.main(["--output-dir", str(tmp_path), "--draws", "0"])
    with pytest.raises(ValueError, match="does not apply with --model"):
        geometric_mixture.main(
            ["--output-dir", str(tmp_path), "--model", "x", "--base", "y", "--world", "seed=1"]
        )
    with pytest.raises(ValueError, match="bad ToyWorldConfig setting 'sft_steps=many'"):
        geometric_mixture.main(["--output-dir", str(tmp_path), "--world", "sft_steps=many"])
    with pytest.raises(SystemExit):
        geometric_mixture.main(["--no-such-flag"])


def test_real_model_path_reports_ess_and_elbo_gap(world, tmp_path):
    """--model/--base take local paths (or hub names): no enumeration, estimates instead."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b\nc d a\nb b c d\nd a\n")
    results = geometric_mixture.main(
        [
            "--output-dir", str(tmp_path / "real"),
            "--model", str(world.directory / "shifted"),
            "--base", str(world.directory / "base"),
            "--prompts-file", str(prompts),
            "--max-new-tokens", "5",
            "--alphas", "0.9",
            "--gfn-steps", "2",
            "--draws", "4",
            "--sir-candidates", "2",
            "--smc-particles", "4",
            "--gfn-sir-candidates", "2",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = {row["name"]: row for row in results["rows"]}
    assert all(row["measure"] == "estimated" and row["tv"] is None for row in rows.values())
    assert rows["GFlowNet"]["elbo_gap"] is not None
    assert rows["SMC N=4"]["log_z"] is not None
    assert all(0.0 <= row["ess_fraction"] <= 1.0 + 1e-9 for row in rows.values())
