"""The sampler studies: a tiny run of all of them writes its CSV, JSON, plot and log; each study
runs alone; --quick; the oracle fit."""

from __future__ import annotations

import csv
import json
import math
import types

import pytest
import torch

from experiments import amortization, large_models, sampler_ablation
from experiments.amortization import AmortizationConfig
from experiments.cli import build_parser, parse_config
from experiments.large_models import LargeConfig
from experiments.sampler_sweep import SweepConfig
from experiments.studies import Setup
from experiments.torchgfn_baseline import TorchgfnConfig
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
            "--refine-steps", "2",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = list(csv.DictReader((out / "ablation.csv").open(encoding="utf-8")))
    sections = {row["section"] for row in rows}
    assert sections == {"sweep", "torchgfn", "large", "amortization"}
    amortized = [(r["name"], r["train_steps"]) for r in rows if r["section"] == "amortization"]
    # The amortized fits are measured on eval and train prompts, the reference on its own prompts.
    oracle = "Likelihood fit on exact target draws (oracle) on train prompts"
    forms = [f"GFlowNet ({form}) fit on train prompts" for form in ("twist", "prompt_twist")]
    assert sorted(amortized) == sorted(
        [
            (f"{fit}, TV on {on} prompts", steps)
            for fit, on in (
                *((form, on) for form in forms for on in ("eval", "train")),
                ("GFlowNet fit on eval prompts", "eval"),
                (oracle, "eval"),
                (oracle, "train"),
            )
            for steps in ("2", "4")
        ]
        # each amortized form refined 2 steps on the eval prompts after its 4
        + [(f"{form}, refined on eval prompts, TV on eval prompts", "6") for form in forms]
        # the local product, no fit, on both probes
        + [(f"Local product (no fit), TV on {on} prompts", "0") for on in ("eval", "train")]
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
        # KL = log Z − ELBO (checked against enumerations in test_kl_to_target_is_exact_kl...),
        # with the two reference runs' gap beside it
        row = large[name]
        assert math.isfinite(float(row["kl_q_target"])) and math.isfinite(float(row["elbo"]))
        assert float(row["log_z_spread"]) > 0
    payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert payload["config"]["draws"] == 8 and len(payload["rows"]) == len(results["rows"])
    assert (out / "ablation.png").stat().st_size > 0
    assert (out / "run.log").stat().st_size > 0


def test_quick_keeps_sizes_given_on_the_command_line():
    config = parse_config(sampler_ablation.SamplerAblationConfig, ["--quick", "--draws", "5"])
    assert config.draws == 5 and config.num_eval_prompts == 2
    # every study's quick sizes apply to the umbrella, nested GFlowNet settings included
    assert config.gflownet.steps == 40 and config.torchgfn_options.torchgfn_steps == 60
    assert config.amortization_options.amortization_steps == (100, 300)
    assert config.large_options.large_gfn_steps == 30
    given = parse_config(
        sampler_ablation.SamplerAblationConfig, ["--quick", "--gflownet.steps", "7"]
    )
    assert given.gflownet.steps == 7
    assert parse_config(sampler_ablation.SamplerAblationConfig, []).gflownet.steps == 200


def test_the_umbrella_offers_every_flag_of_every_study():
    """The umbrella composes the studies' options, each study's flags under their own names."""
    umbrella = set(build_parser(sampler_ablation.SamplerAblationConfig)._option_string_actions)
    for study in (SweepConfig, TorchgfnConfig, AmortizationConfig, LargeConfig):
        assert set(build_parser(study)._option_string_actions) <= umbrella, study
    config = parse_config(
        sampler_ablation.SamplerAblationConfig, ["--large-vocab", "300", "--sir-candidates", "2"]
    )
    assert config.large_options.large_vocab == 300 and config.sweep_options.sir_candidates == (2,)
    with pytest.raises(ValueError, match="torchgfn_steps"):  # every study's options validate
        parse_config(sampler_ablation.SamplerAblationConfig, ["--torchgfn-steps", "0"]).validate()


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


@pytest.mark.parametrize("served", ["probe", "all"])
def test_amortization_at_the_base_schedule_measures_the_fits_a_user_runs(world, tmp_path, served):
    """With ``--amortization-schedule base`` the study's fits are the base setting's own: its
    fit on the served prompts (the 2 eval prompts measured, or every eval prompt of the world),
    measured after 3 and 5 steps, is at 5 the fit of 5 steps done by hand on those prompts
    (cosine over 5 steps, from the same seed) and its refinement is ``refine``'s; the local
    product's row is its TV enumerated directly. Both sides are exact laws, so they agree to
    float32 rounding (1e-6); a schedule spanning each chunk alone, or the constant rate, gives
    another fit."""
    settings = {
        "steps": 2,
        "prompts_per_step": 2,
        "samples_per_prompt": 2,
        "learning_rate": 0.01,
        "warmup_steps": 1,
    }
    flags = [f"--gflownet.{k.replace('_', '-')}={v}" for k, v in settings.items()]
    results = amortization.main(
        [
            "--output-dir", str(tmp_path / "study"),
            "--world-cache", str(world.directory.parent),
            "--num-eval-prompts", "2", "--draws", "4",
            *flags,
            "--amortization-steps", "3", "5",
            "--amortization-forms", "twist",
            "--refine-steps", "2",
            "--amortization-schedule", "base",
            "--served", served,
            "--oracle", "false",
            "--progress", "false",
        ]
    )  # fmt: skip
    rows = {(r["name"], r["train_steps"]): r for r in results["rows"]}
    assert not any("oracle" in name for name, _ in rows)
    cap, prompts = world.max_new_tokens, [list(p) for p in world.eval_prompts[:2]]
    fitted_on = prompts if served == "probe" else [list(p) for p in world.eval_prompts]
    assert len(fitted_on) > 2 or served == "probe"
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])

    def tv(density) -> float:
        with torch.no_grad():
            values = [
                0.5
                * float(
                    (
                        exact_distribution(density, p, cap).logprobs.exp()
                        - exact_distribution(target, p, cap).logprobs.exp()
                    )
                    .abs()
                    .sum()
                )
                for p in prompts
            ]
        return sum(values) / len(values)

    config = {**settings, "max_new_tokens": cap, "parametrization": "twist", "twist_updates": 8}
    config.update(explore_prob=0.0, seed=0)
    by_hand = GFlowNetSampler(target, world.shifted, adapter_name="by_hand", **config)
    by_hand.fit(fitted_on, steps=5, progress=False)
    on_eval = rows[("GFlowNet fit on eval prompts, TV on eval prompts", 5)]
    assert on_eval["tv"] == pytest.approx(tv(by_hand.policy), abs=1e-6)
    local = rows[("Local product (no fit), TV on eval prompts", 0)]
    assert local["tv"] == pytest.approx(tv(target.local_product()), abs=1e-6)
    amortized = GFlowNetSampler(target, world.shifted, adapter_name="amortized", **config)
    amortized.fit(world.train_prompts, steps=5, progress=False)
    name = "GFlowNet (twist) fit on train prompts, refined on eval prompts, TV on eval prompts"
    refined = amortized.refine(fitted_on, 2)
    assert rows[(name, 7)]["tv"] == pytest.approx(tv(refined.policy), abs=1e-6)


def test_the_many_prompt_world_is_probed_at_evenly_spaced_new_prompts():
    """Its 1,024 new prompts are sorted, so the first 8 would share their first symbols: the
    studies take every 128th instead; the tiny world keeps its first eval prompts."""
    world = types.SimpleNamespace(eval_prompts=[[i] for i in range(1024)])
    for many_prompt, expected in (("overlap", range(0, 1024, 128)), ("", range(8))):
        config = parse_config(AmortizationConfig, ["--num-eval-prompts", "8"])
        config.many_prompt = many_prompt
        setup = Setup(config, logger=None)
        setup.__dict__["world"] = world  # the cached property, without building a world
        assert setup.eval_prompts == [[i] for i in expected]


def _oracle_kl(world, prompt, fit_alpha: float, reference) -> tuple[float, float]:
    """Exact KL(reference‖q) before and after 60 oracle steps toward the mixture at
    ``fit_alpha`` on one prompt (``reference``: enumerated log-probs on that prompt)."""
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - fit_alpha, fit_alpha])
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
        adapter_name=f"oracle_test_{round(100 * fit_alpha)}",
    )
    exact = {}

    def kl() -> float:
        with torch.no_grad():
            q = exact_distribution(sampler.policy, prompt, cap)
        return divergences(reference, q.logprobs)["kl_pq"]

    before = kl()
    amortization.likelihood_fit(sampler, [prompt], 60, torch.Generator().manual_seed(0), exact)
    # the enumerated target was cached once for the one prompt
    assert sampler.state.step == 60 and list(exact) == [tuple(prompt)]
    return before, kl()


def test_likelihood_oracle_moves_the_policy_toward_the_target(world, prompt):
    """The oracle's steps lower the exact KL(target‖q) on the prompt it is fitted on (exact on
    both sides, so the direction is the check: a wrong sign or a detached policy raises KL or
    leaves it unchanged). The control, the same steps toward α = 1.5 (past π_t, away from the
    α = 0.5 target), must not lower it: otherwise any training would pass."""
    reference = exact_distribution(
        GeometricMixture([world.base, world.shifted], [0.5, 0.5]), prompt, world.max_new_tokens
    ).logprobs
    before, after = _oracle_kl(world, prompt, 0.5, reference)
    assert after < before, (before, after)
    control_before, control_after = _oracle_kl(world, prompt, 1.5, reference)
    assert control_after >= control_before, (control_before, control_after)


def test_kl_to_target_is_the_exact_kl_on_enumerable_prompts(world):
    """The large study's KL(q‖target) = log Z − ELBO, on the tiny world where both sides are
    exact: with the enumerated log Z it matches KL(q‖target) from the enumerated laws, within
    5 standard errors of the ELBO (a mean of log w over the draws; its variance is Var_q[log w],
    also from the enumerations). An ELBO of the wrong sign or over the wrong density is off by
    far more."""
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(target, world.shifted, max_new_tokens=cap, parametrization="lora")
    prompts, draws = world.eval_prompts[:2], 256
    log_z, kls, variances = [], [], []
    for prompt in prompts:
        p = exact_distribution(target, prompt, cap)
        q = exact_distribution(sampler.policy, prompt, cap)
        assert p.responses == q.responses
        log_w = p.logprobs + p.log_z - q.logprobs  # log G̃ − log q on every response
        weights = q.logprobs.exp()
        variances.append(float((weights * (log_w - (weights * log_w).sum()) ** 2).sum()))
        log_z.append(p.log_z)
        kls.append(divergences(p.logprobs, q.logprobs)["kl_qp"])
    samples = sampler.sample(prompts, draws, generator=0)
    estimate = large_models.kl_to_target(torch.tensor(log_z), samples)
    exact = sum(kls) / len(kls)
    standard_error = math.sqrt(sum(variances) / draws) / len(prompts)
    assert exact > 10 * standard_error  # not a check of 0 ≈ 0
    assert abs(estimate["kl_q_target"] - exact) <= 5 * standard_error


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
    assert (
        json.loads((out / "results.json").read_text())["config"]["large_options"]["large_draws"]
        == 2
    )
