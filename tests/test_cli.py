"""Every experiment's CLI: --help documents each flag with its default; the common flags exist;
a tiny run writes a results JSON with the config, package versions and git commit, and a log.

The main job's tiny run is ``tests/test_geometric_mixture_job.py::test_main_job_smoke``.
"""

from __future__ import annotations

import json
import re

import pytest

from experiments import (
    alpha_spin,
    alpha_spin_real,
    amortization,
    geometric_mixture,
    large_models,
    real_model,
    sampler_ablation,
    sampler_sweep,
    torchgfn_baseline,
    train_alpha_spin,
)
from experiments.cli import parse_config

EXPERIMENTS = [
    geometric_mixture,
    sampler_ablation,
    sampler_sweep,
    amortization,
    torchgfn_baseline,
    large_models,
    alpha_spin,
    train_alpha_spin,
    real_model,
    alpha_spin_real,
]


def _help_entries(text: str) -> dict[str, str]:
    """Each ``--flag`` (every alias) -> its help text, from argparse output."""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            head, _, rest = line[2:].partition("  ")  # help starts after a wide gap
            current = re.findall(r"--[\w.-]+", head)
            for flag in current:
                entries[flag] = rest
        else:
            for flag in current:
                entries[flag] += " " + line.strip()
    entries.pop("--help", None)
    return entries


@pytest.mark.parametrize("module", EXPERIMENTS, ids=lambda m: m.__name__)
def test_help_documents_every_flag_with_its_default(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert {"--output-dir", "--seed"} <= set(entries), sorted(entries)
    if module is real_model:  # quick by default, --full for a GPU
        assert "--full" in entries
    elif module is not train_alpha_spin:  # one run, not a study: no --quick
        assert "--quick" in entries
    if module in (
        geometric_mixture,
        alpha_spin,
        train_alpha_spin,
        real_model,
        alpha_spin_real,
    ):  # the ablation runs on CPU
        assert "--device" in entries
    for flag, text in entries.items():
        described = re.sub(r"^\s*[A-Z_{}\[\],.\s-]*\s", "", text).split("(default:")[0]
        assert "(default:" in text, f"{module.__name__} {flag} shows no default"
        assert len(described.strip()) >= 5, f"{module.__name__} {flag} has no help text: {text!r}"


def test_alpha_spin_study_tiny_run_writes_results_and_log(default_cache, tmp_path):
    out = tmp_path / "study"
    argv = [
        "--output-dir", str(out), "--quick", "--seeds", "1", "--seed", "3",
        "--iterations", "1", "--max-examples", "32", "--epochs", "1", "--workers", "1",
        "--drift-prompts", "1", "--num-candidates", "2", "--device", "cpu", "--progress", "false",
    ]  # fmt: skip
    alpha_spin.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["device"] == "cpu"
    assert saved["config"]["quick"] is True
    environment = saved["environment"]
    assert environment["packages"]["torch"] and environment["packages"]["transformers"]
    assert {"commit", "dirty"} <= set(environment["git"])
    assert [run["seed"] for run in saved["runs"]] == [3] * len(saved["runs"])
    assert "runs on 1 workers" in (out / "run.log").read_text()
    assert (out / "results.md").is_file() and (out / "kl.png").stat().st_size > 0


def test_train_alpha_spin_tiny_run_writes_results_and_log(default_cache, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--output-dir", str(out), "--iterations", "1", "--max-examples", "32",
        "--batch-size", "16", "--epochs", "1", "--alpha", "1.0", "--seed", "2",
        "--device", "cpu", "--progress", "false",
    ]  # fmt: skip
    records = train_alpha_spin.main(argv)
    assert [r["iteration"] for r in records] == [0, 1]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["seed"] == 2 and saved["config"]["alpha"] == 1.0
    assert {"commit", "dirty"} <= set(saved["environment"]["git"])
    assert saved["environment"]["packages"]["peft"]
    assert "'iteration': 1" in (out / "run.log").read_text()


def test_flag_values_come_back_in_the_fields_own_types():
    """A union field (``history: int | str``) takes either member; tuples come back tuples."""
    parse = lambda *argv: parse_config(train_alpha_spin.AlphaSpinConfig, list(argv))  # noqa: E731
    assert parse("--history", "all").history == "all"
    assert parse("--history", "3").history == 3
    study = parse_config(alpha_spin.StudyConfig, ["--quick", "--seeds", "5"])
    assert study.seeds == 5 and study.iterations == alpha_spin.StudyConfig.QUICK["iterations"]
    sweep = parse_config(sampler_sweep.SweepConfig, ["--sir-candidates", "2", "8"])
    assert sweep.sweep_options.sir_candidates == (2, 8)


def test_alpha_spin_study_reruns_as_a_spawned_workers_main():
    """The α-SPIN study runs its seeds in a spawned worker pool, and each worker re-runs the
    launching module as ``__mp_main__`` in a fresh interpreter. There a string ``ClassVar``
    annotation in a dataclass body does not resolve, so dataclasses would take a ``QUICK`` dict
    for a field default and every worker would die (the pool then waits forever). Only a fresh
    interpreter shows it, hence the subprocess."""
    import subprocess
    import sys

    code = (
        "import runpy; "
        "ns = runpy.run_module('experiments.alpha_spin', run_name='__mp_main__', alter_sys=True); "
        "assert ns['StudyConfig'].QUICK"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
