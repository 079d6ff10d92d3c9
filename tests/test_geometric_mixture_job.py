"""The main job end to end with a tiny budget: tables, results.json, plot, log, --help."""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import evaluation, geometric_mixture
from experiments.cli import build_parser, field_docs, parse_config
from gfn_spin.exact import divergences, exact_distribution, sir_output_law
from gfn_spin.mixtures import GeometricMixture
from tests.stats import tv_deviation_bound


def test_main_job_smoke(world, tmp_path, capsys):
    out = tmp_path / "run"
    results = geometric_mixture.main(
        [
            "--output-dir", str(out),
            "--world-cache", str(world.directory.parent),
            "--world-preset", "stress",
            "--alphas", "0.5",
            "--gflownet.steps", "4",
            "--onepass-steps", "2",
            "--num-eval-prompts", "2",
            "--draws", "8",
            "--sir-candidates", "4",
            "--smc-particles", "4",
            "--smc-runs", "3",
            "--smc-max-runs", "6",
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
        "GFlowNet one-pass",
        "SIR(GFlowNet) K=2",
    ]
    rows = {row["name"]: row for row in results["rows"]}
    measures = {name: row["measure"] for name, row in rows.items()}
    assert measures == {
        "ancestral π_t": "exact",
        "local product": "exact",
        "SIR K=4": "exact SIR law",
        "SMC N=4": "smc",
        "GFlowNet": "exact",
        "GFlowNet one-pass": "exact",
        "SIR(GFlowNet) K=2": "exact SIR law",
    }
    for row in results["rows"]:
        assert row["tokens_per_draw"] > 0 and row["draws_per_second"] > 0
        if row["measure"] == "smc":
            assert row["tv"] is None and row["kl"] is None
            continue
        assert 0.0 <= row["tv"] <= 1.0 and row["kl"] >= 0.0
        assert len(row["tv_per_prompt"]) == 2
    # SIR's exact law reaches the default rtol (its correctness: tests/test_sir_law.py).
    assert 0.0 < results["sir_law_precision"] <= 1e-8
    assert rows["SIR K=4"]["law_precision"] <= 1e-8
    # SMC: |Δlog Z| with its standard error from 3 to 6 runs per prompt; a mean is shown only
    # when its standard error is at most a quarter of it.
    smc = rows["SMC N=4"]
    assert smc["runs_per_prompt"] in (3, 6)
    assert smc["log_z_error_measured"] > 0 and smc["log_z_error_se"] > 0
    assert (smc["log_z_error"] is not None) == smc["floor_met"]
    # Ẑ is unbiased: the mean of Ẑ/Z over runs × prompts, Z enumerated, is 1 within 4 of its
    # standard errors, which shrink as 1/sqrt(runs) (a t statistic with P·(R−1) ≥ 4 degrees
    # of freedom exceeds 4 with probability below 2%). A log Z one nat too high fails it.
    assert abs(smc["z_ratio_mean"] - 1) <= 4 * smc["z_ratio_se"]
    # The exact rows against closed forms on the enumerations of the job's eval prompts (the
    # world's first two): TV, and ESS/N as N → ∞ = 1 / Σ_y p(y)²/q(y) from log w = log p − log q.
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    laws = {"ancestral π_t": world.shifted, "local product": target.local_product()}
    draws = 8 * len(world.eval_prompts[:2])
    for name, density in laws.items():
        tvs, fractions = [], []
        for prompt in world.eval_prompts[:2]:
            p = exact_distribution(target, prompt, world.max_new_tokens).logprobs
            q = exact_distribution(density, prompt, world.max_new_tokens).logprobs
            tvs.append(divergences(p, q)["tv"])
            fractions.append(float(torch.exp(-torch.logsumexp(2 * p - q, 0))))
        assert rows[name]["tv"] == pytest.approx(sum(tvs) / 2, rel=1e-6)
        assert rows[name]["ess_fraction"] == pytest.approx(sum(fractions) / 2, rel=1e-6)
    # The target is not trivial: π_t's exact TV to it exceeds how far the empirical TV of the
    # job's draws (8 per prompt) strays from its mean (McDiarmid, tests/stats.py).
    assert rows["ancestral π_t"]["tv"] > tv_deviation_bound(draws)
    # Total cost, fit included: each fitted row pays its training record's fit (the one-pass
    # form the GFlowNet's too), spread over the 2 × 8 draws it made; its match is SIR from the
    # local product with the smallest K as exact, checked here on exact laws K − 1 and K; its
    # break-even is where the running totals cross, n* = F / (P·(b − c)).
    record = results["training"][0]
    fits = {"GFlowNet": record["model_tokens"], "SIR(GFlowNet) K=2": record["model_tokens"]}
    fits["GFlowNet one-pass"] = record["model_tokens"] + record["onepass"]["model_tokens"]
    pairs = [
        (
            exact_distribution(target, prompt, world.max_new_tokens).logprobs,
            exact_distribution(target.local_product(), prompt, world.max_new_tokens).logprobs,
        )
        for prompt in world.eval_prompts[:2]
    ]

    def sir_tv(k: int) -> float:
        return sum(divergences(p, sir_output_law(q, p, k).logprobs)["tv"] for p, q in pairs) / 2

    for name, fit in fits.items():
        row = rows[name]
        assert row["fit_tokens"] == fit > 0 and row["fit_draws"] == draws
        assert row["total_tokens_per_draw"] == pytest.approx(row["tokens_per_draw"] + fit / draws)
        k = row["matched"]["num_candidates"]
        assert row["matched"]["tv"] == pytest.approx(sir_tv(k), abs=2e-6) and sir_tv(k) <= row["tv"]
        assert k == 1 or sir_tv(k - 1) > row["tv"]
        cost = row["matched"]["tokens_per_draw"]
        assert row["total_ratio"] == pytest.approx(row["total_tokens_per_draw"] / cost)
        saving = cost - row["tokens_per_draw"]
        expected = fit / (2 * saving) if saving > 0 else None
        assert row["break_even_draws_per_prompt"] == pytest.approx(expected)
    assert rows["SIR K=4"]["fit_tokens"] == 0 and "matched" not in rows["SIR K=4"]
    assert rows["SIR K=4"]["total_tokens_per_draw"] == rows["SIR K=4"]["tokens_per_draw"]
    assert results["world"] == ["shift_rule=symbol"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["alphas"] == [0.5]
    assert saved["environment"]["packages"]["torch"]
    assert "commit" in saved["environment"]["git"]
    assert (out / "error_vs_cost.png").stat().st_size > 0
    assert "GFlowNet" in (out / "run.log").read_text()
    assert (out / "gflownet_alpha_0_5" / "twist_head.safetensors").is_file()
    # The one-pass form is saved as a standard peft adapter (what HF generate serves).
    assert (out / "onepass_alpha_0_5" / "adapter_model.safetensors").is_file()
    assert (out / "onepass_alpha_0_5" / "adapter_config.json").is_file()
    printed = capsys.readouterr().out
    assert "SIR(GFlowNet) K=2" in printed and "SMC (no computable law)" in printed
    assert "relative precision" in printed
    assert "Total cost, fit included" in printed and saved["cost_table"] in printed


def test_every_flag_is_documented():
    docs = field_docs(geometric_mixture.GeometricMixtureConfig)
    parser = build_parser(geometric_mixture.GeometricMixtureConfig)
    flags = [a for a in parser._actions if a.dest != "help"]
    assert flags and all(a.help.strip() for a in flags)
    top = [a for a in flags if "." not in a.dest]
    assert all(docs.get(a.dest) for a in top)
    text = parser.format_help()
    assert "--gflownet.parametrization" in text and "--seed" in text and "--device" in text
    # the GFlowNet fields the job sets itself per α have no flag
    assert "--gflownet.adapter-name" not in text and "--gflownet.seed" not in text


def test_nested_gflownet_flags_and_quick():
    """--gflownet.<field> changes the job's recipe (its own defaults, not GFlowNetConfig's);
    --quick shrinks only what the command line leaves at its default."""
    parse = lambda *argv: parse_config(geometric_mixture.GeometricMixtureConfig, list(argv))  # noqa: E731
    default = parse()
    assert default == geometric_mixture.GeometricMixtureConfig()
    assert default.gflownet.steps == 200 and default.gflownet.explore_prob == 0.0
    changed = parse("--gflownet.steps", "9", "--gflownet.loss", "tb")
    assert (changed.gflownet.steps, changed.gflownet.loss) == (9, "tb")
    assert changed.gflownet.learning_rate == default.gflownet.learning_rate
    config = changed.gfn_config(0.5, 7)
    assert (config.steps, config.adapter_name, config.seed) == (9, "gflownet_alpha_0_5", 0)
    quick = parse("--quick", "--alphas", "0.3", "0.7")
    assert quick.alphas == (0.3, 0.7) and quick.gflownet.steps == 40
    assert (
        quick.num_eval_prompts == geometric_mixture.GeometricMixtureConfig.QUICK["num_eval_prompts"]
    )


def test_world_presets():
    """The default world overlaps; the stress world is one flag away; --world adds to either."""
    config = geometric_mixture.GeometricMixtureConfig()
    assert config.world_preset == "overlap"
    assert config.world_specs() == ("shift_rule=style", "sft_examples=8192")
    stress = geometric_mixture.GeometricMixtureConfig(world_preset="stress", world=("seed=1",))
    assert stress.world_specs() == ("shift_rule=symbol", "seed=1")


def test_stratified_standard_error_matches_a_direct_computation():
    values = torch.tensor([[1.0, 3.0, 2.0], [10.0, 14.0, 12.0]], dtype=torch.float64)
    mean, se = evaluation.stratified_mean(values)
    assert mean == pytest.approx(7.0)
    # var per prompt: 1 and 4 (unbiased); SE = sqrt((1 + 4) / 3) / 2.
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)


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
    with pytest.raises(SystemExit):  # a Literal field: argparse refuses the choice
        geometric_mixture.main(["--output-dir", str(tmp_path), "--world-preset", "easy"])
    with pytest.raises((ValueError, SystemExit)):  # the config's check, or a Literal choice
        geometric_mixture.main(["--output-dir", str(tmp_path), "--gflownet.loss", "db"])
    with pytest.raises(ValueError, match="smc_max_runs"):
        geometric_mixture.main(["--output-dir", str(tmp_path), "--smc-max-runs", "4"])
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
            "--gflownet.steps", "2",
            "--onepass-steps", "2",
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


class _Fitted(Exception):
    """Stops the job at its first GFlowNet fit (what the test checks happens before)."""


@pytest.mark.parametrize("choice", ["eval", "train"])
def test_gflownet_is_fit_on_the_prompts_gflownet_prompts_names(
    world, tmp_path, monkeypatch, choice
):
    seen = []

    def record(sampler, prompts, *args, **kwargs):
        seen.append([list(p) for p in prompts])
        raise _Fitted

    monkeypatch.setattr(geometric_mixture, "fit_sampler", record)
    with pytest.raises(_Fitted):
        geometric_mixture.main(
            [
                "--output-dir", str(tmp_path / "run"),
                "--world-cache", str(world.directory.parent),
                "--world-preset", "stress",
                "--num-eval-prompts", "3",
                "--gflownet-prompts", choice,
                "--progress", "false",
            ]
        )  # fmt: skip
    expected = world.eval_prompts[:3] if choice == "eval" else world.train_prompts
    assert seen == [[list(p) for p in expected]]
    with pytest.raises(SystemExit):  # a Literal field: argparse refuses other choices
        geometric_mixture.main(["--output-dir", str(tmp_path), "--gflownet-prompts", "all"])
