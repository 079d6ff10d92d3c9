"""The real-model job (experiments.real_model) end to end on the tiny world, with a tiny budget:
one table per sampler, results.json, the plot and the log; bad settings stop with one line."""

from __future__ import annotations

import json

import pytest

from experiments import real_model
from experiments.cli import parse_config, run_command


def test_real_model_job_on_the_tiny_world(default_cache, tmp_path, capsys):
    out = tmp_path / "run"
    results = real_model.main(
        [
            "--world", "tiny",
            "--output-dir", str(out),
            "--alphas", "0.5",
            "--max-new-tokens", "4",
            "--fit-prompts", "1",
            "--new-prompts", "1",
            "--reference-particles", "8",
            "--reference-runs", "2",
            "--particles", "4",
            "--runs", "2",
            "--draws", "4",
            "--gflownet.steps", "2",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = results["rows"]
    assert [(r["sampler"], r["prompts"]) for r in rows] == [
        ("local product", "fit"),
        ("local product", "new"),
        ("SIR K=4", "all"),
        ("SMC N=4", "all"),
        ("GFlowNet (twist)", "fit"),
        ("GFlowNet (twist)", "new"),
        ("twisted SMC N=4", "all"),
    ]
    for row in rows:
        measured = (
            "kl" if row["sampler"] in ("local product", "GFlowNet (twist)") else "log_z_error"
        )
        assert row[f"{measured}_se"] >= 0 and row["tokens_per_draw"] > 0
        # A value not above 2 SE (a KL below zero included) is flagged, never shown bare.
        value, se = row[measured], row[f"{measured}_se"]
        assert row[f"{measured}_resolved"] == (value > 2 * se)
    gfn = [r for r in rows if "GFlowNet" in r["sampler"] or "twisted" in r["sampler"]]
    # The fit is part of the cost of every draw made with the fitted GFlowNet.
    assert all(r["fit_tokens"] > 0 and r["fit_steps"] == 2 for r in gfn)
    assert all(r["tokens_per_draw"] > r["sampling_tokens_per_draw"] for r in gfn)
    table = capsys.readouterr().out
    assert table.count("== ") == 5 and "break-even vs SMC" in table
    unresolved = [r for r in rows if not r.get("kl_resolved", r.get("log_z_error_resolved"))]
    cells = [real_model._cell(r, "kl" if "kl" in r else "log_z_error") for r in unresolved]
    assert "not above 2 SE" in table
    assert all(c.startswith("(") and c in table for c in cells)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["config"]["world"] == "tiny" and len(saved["rows"]) == len(rows)
    assert (out / "real_model.png").stat().st_size > 0 and (out / "run.log").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "1"], "runs=1 must be >= 2"),
        (["--alphas", "1.5"], "outside [0, 1]"),
        (["--world", "tiny", "--pairs", "style"], "['style'] not in ['shifted']"),
    ],
)
def test_bad_settings_stop_with_one_line(default_cache, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run_command(
            real_model.main, ["--output-dir", str(tmp_path / "run"), "--progress", "false", *argv]
        )
    text = capsys.readouterr().err  # the world's model may print a loading bar first
    assert exit_info.value.code == 1 and "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert "error: " in last and message in last


def test_full_preset_and_flags():
    quick = parse_config(real_model.RealModelConfig, [])
    full = parse_config(real_model.RealModelConfig, ["--full", "--particles", "12"])
    assert full.reference_particles > quick.reference_particles
    assert full.gflownet.steps > quick.gflownet.steps and full.particles == 12
    assert quick.gflownet.parametrization == "twist"
