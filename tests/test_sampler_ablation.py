"""The sampler studies: a tiny run of all of them writes its CSV, JSON, plot and log; each study
runs alone; --quick; the oracle fit."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from experiments import amortization, large_models, sampler_ablation
from experiments.cli import parse_config
from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.mixtures import GeometricMixture
from samplers import GFlowNetSampler


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
            "--gflownet.steps", "3", "--gflownet.prompts-per-step", "2",
            "--gflownet.samples-per-prompt", "2",
            "--gfn-variants", "subtb_lambda=0.9",
            "--torchgfn-steps", "2",
            "--large-sir-candidates", "2",
            "--large-smc-particles", "2",
            "--large-draws", "2",
            "--large-gfn-steps", "2",
            "--large-reference-particles", "8",
            "--amortization", "true",
            "--amortization-steps", "2", "4",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = list(csv.DictReader((out / "ablation.csv").open(encoding="utf-8")))
    sections = {row["section"] for row in rows}
    assert sections == {"sweep", "torchgfn", "large", "amortization"}
    amortized = [(r["name"], r["train_steps"]) for r in rows if r["section"] == "amortization"]
    # The amortized fits are measured on eval and train prompts, the reference on its own prompts.
    oracle = "Likelihood fit on exact target draws (oracle) on train prompts"
    assert sorted(amortized) == sorted(
        (f"{fit}, TV on {on} prompts", steps)
        for fit, on in (
            ("GFlowNet fit on train prompts", "eval"),
            ("GFlowNet fit on train prompts", "train"),
            ("GFlowNet fit on eval prompts", "eval"),
            (oracle, "eval"),
            (oracle, "train"),
        )
        for steps in ("2", "4")
    )
    gflownet = [r for r in rows if r["section"] == "sweep" and r["name"].startswith("GFlowNet")]
    budgets = [r for r in rows if r["section"] == "sweep" and r["name"][:3] in ("SIR", "SMC")]
    assert len(budgets) == 2 and all(float(r["log_z_error"]) >= 0 for r in budgets)
    assert len(gflownet) == 2 and all(0.0 <= float(r["tv"]) <= 1.0 for r in gflownet)
    torchgfn = [r for r in rows if r["section"] == "torchgfn"]
    # equal numbers of target evaluations (scored responses) on both sides
    assert len(torchgfn) == 3 and {r["target_evaluations"] for r in torchgfn} == {"8"}
    large = {r["name"]: r for r in rows if r["section"] == "large"}
    assert set(large) == {
        "SIR K=2",
        "SMC N=2",
        "GFlowNet twist 0 steps",
        "GFlowNet twist 2 steps λ=1",
        "GFlowNet twist 2 steps λ=0.5",
    }
    assert all(float(r["ess_per_token"]) > 0 for r in large.values())
    for name in ("GFlowNet twist 0 steps", "GFlowNet twist 2 steps λ=0.5"):
        row = large[name]
        # KL = log Z − ELBO, with the two reference runs' gap beside it
        assert float(row["kl_q_target"]) == pytest.approx(
            float(large["GFlowNet twist 0 steps"]["kl_q_target"])
            + float(large["GFlowNet twist 0 steps"]["elbo"])
            - float(row["elbo"])
        )
        assert float(row["log_z_spread"]) > 0
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert payload["config"]["draws"] == 8 and len(payload["rows"]) == len(results["rows"])
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "run.log").stat().st_size > 0


def test_quick_keeps_sizes_given_on_the_command_line():
    config = parse_config(sampler_ablation.SamplerAblationConfig, ["--quick", "--draws", "5"])
    assert config.draws == 5 and config.num_eval_prompts == 2
    # every study's quick sizes apply to the umbrella, nested GFlowNet settings included
    assert config.gflownet.steps == 40 and config.torchgfn_steps == 60
    assert config.amortization_steps == (100, 300) and config.large_gfn_steps == 30
    given = parse_config(
        sampler_ablation.SamplerAblationConfig, ["--quick", "--gflownet.steps", "7"]
    )
    assert given.gflownet.steps == 7
    assert parse_config(sampler_ablation.SamplerAblationConfig, []).gflownet.steps == 200


@pytest.mark.parametrize(
    ("flag", "setting", "message"),
    [
        ("--gfn-variants", "nonsense=1", "bad GFlowNetConfig setting 'nonsense=1'"),
        ("--gfn-variants", "lora_rank=2.5", "2.5 is not an integer"),
        ("--world", "nonsense=1", "bad ToyWorldConfig setting 'nonsense=1'"),
        ("--world", "shift_rule=rotate", "shift_rule='rotate' must be one of"),
        ("--world", "shifted_keep_prob=0.7", "keep \\+ double <= 1"),
    ],
)
def test_bad_setting_is_rejected_before_work(tmp_path, flag, setting, message):
    with pytest.raises(ValueError, match=message):
        sampler_ablation.main(["--output-dir", str(tmp_path), flag, setting])


def test_likelihood_oracle_moves_the_policy_toward_the_target(world, prompt):
    """The oracle's steps lower the exact KL(target‖q) on the prompt it is fitted on."""
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(
        target,
        world.shifted,
        max_new_tokens=cap,
        parametrization="residual",
        prompts_per_step=1,
        samples_per_prompt=16,
        learning_rate=1e-3,
        warmup_steps=0,
        lr_decay="constant",
        adapter_name="oracle_test",
    )
    exact = {}
    reference = exact_distribution(target, prompt, cap)

    def kl() -> float:
        with torch.no_grad():
            q = exact_distribution(sampler.policy, prompt, cap)
        return divergences(reference.logprobs, q.logprobs)["kl_pq"]

    before = kl()
    amortization.likelihood_fit(sampler, [prompt], 60, torch.Generator().manual_seed(0), exact)
    # 60 steps of 16 exact draws: a clear drop (a wrong sign or a detached policy raises KL or
    # leaves it unchanged), and the enumerated target was cached once for the one prompt
    assert sampler.state.step == 60 and list(exact) == [tuple(prompt)]
    after = kl()
    assert after < 0.6 * before, (before, after)


def test_one_study_runs_alone(tmp_path):
    """A study is its own command: the large study alone builds no tiny world."""
    out = tmp_path / "large"
    argv = [
        "--output-dir", str(out), "--large-sir-candidates", "2", "--large-smc-particles", "2",
        "--large-draws", "2", "--large-gfn-steps", "1", "--large-subtb-lambdas", "1",
        "--large-reference-particles", "4", "--progress", "false",
    ]  # fmt: skip
    results = large_models.main(argv)
    assert {row["section"] for row in results["rows"]} == {"large"}
    assert json.loads((out / "results.json").read_text())["config"]["large_draws"] == 2
