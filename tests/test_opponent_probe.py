"""The opponent probe (selfplay.probe, samplers.accuracy.kl_upper_bound) against enumeration.

Target: the tiny world's α = 0.5 geometric mixture of base and shifted, responses ≤ CAP = 5
symbols (1,365 responses), so log Z, the KL of every sampler with a density and the exact law of
SIR (gfn_spin.exact.sir_output_law) are known; the probe itself sees none of it and estimates
log Z with SMC, as it must on a real model.

Tolerance: every probe figure comes with its own standard error (the draws' or runs' sd/√n and
the reference's, in quadrature); a check allows ``Z_SIGMAS = 4`` of them (means of i.i.d. terms
of finite variance: a correct estimator fails with two-sided probability ≈ 6e-5) plus the
reference's bias: ``log Z̄`` (the log of a mean of unbiased Ẑ) is low by about ``SE_ref²/2``,
bounded here by ``SE_ref²`` (twice the delta method's value). Negative controls show the
tolerance rejects a wrong answer: the bound from the log of the mean Ẑ (≈ 0, below SIR's exact
KL), and a probe that read the sampler's own target instead of π_ref.
"""

from __future__ import annotations

import json

import pytest
import torch

from gfn_spin import GeometricMixture
from gfn_spin.exact import divergences, exact_distribution, sir_output_law
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.accuracy import Estimate, kl_upper_bound
from samplers.weighting import logmeanexp
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.config import derive_seed
from selfplay.iterates import load_iterate
from selfplay.opponents import opponent_sampler
from selfplay.probe import opponent_probe, probe_reference

CAP = 5
Z_SIGMAS = 4.0
SEED = 11
REFERENCE = dict(reference_particles=32, reference_runs=100)


@pytest.fixture(scope="module")
def exact_p(target, prompts):
    return [exact_distribution(target, p, CAP) for p in prompts]


@pytest.fixture(scope="module")
def reference(target, prompts) -> Estimate:
    """The probe's own reference log Z (same seed), for its bias term."""
    return probe_reference(
        target,
        prompts,
        particles=REFERENCE["reference_particles"],
        runs=REFERENCE["reference_runs"],
        max_new_tokens=CAP,
        seed=derive_seed(SEED, "reference"),
        batch_size=65536,
    )


def probe(sampler, target, prompts, **counts) -> dict[str, float]:
    return opponent_probe(
        sampler, target, prompts, **REFERENCE, **counts, max_new_tokens=CAP, seed=SEED
    )


def exact_kl(exact_p, prompts, density) -> float:
    """Mean over prompts of KL(q‖p), q = ``density`` enumerated."""
    kls = [
        divergences(p.logprobs, exact_distribution(density, x, CAP).logprobs)["kl_qp"]
        for p, x in zip(exact_p, prompts, strict=True)
    ]
    return sum(kls) / len(kls)


def bias(reference: Estimate) -> float:
    """Bound on the bias of the mean over prompts of log Z̄ (module docstring)."""
    return float(reference.se.square().mean())


def test_reference_agrees_with_enumeration(reference, exact_p):
    exact = torch.tensor([p.log_z for p in exact_p], dtype=torch.float64)
    assert bool(((reference.value - exact).abs() <= Z_SIGMAS * reference.se + 1e-12).all())
    assert float(reference.se.max()) < 0.03  # precise enough for the checks below


@pytest.mark.parametrize("opponent", ["local product", "shifted", "shifted, another target"])
def test_density_kl_agrees_with_enumeration(world, target, prompts, exact_p, reference, opponent):
    model = {"local product": target.local_product()}.get(opponent, world.shifted)
    # "another target": the sampler scores its draws under the base, not π_ref; the probe must
    # score them under π_ref itself.
    own_target = world.base if opponent.endswith("another target") else target
    sampler = AncestralSampler(model, max_new_tokens=CAP, target=own_target)
    metrics = probe(sampler, target, prompts, draws=3000, runs=2)
    exact = exact_kl(exact_p, prompts, model)
    assert "opponent/kl_bound" not in metrics and metrics["opponent/probe_tokens"] > 0
    error = abs(metrics["opponent/kl"] - exact)
    assert error <= Z_SIGMAS * metrics["opponent/kl_se"] + bias(reference), (metrics, exact)
    assert metrics["opponent/kl_se"] < 0.25 * exact  # precise enough to mean something


def test_normalized_reference_has_log_z_zero_and_costs_no_smc(world, prompts):
    """At t = 0 π_ref = π_0 is sampled exactly: KL 0 up to float rounding, no reference SMC."""
    sampler = AncestralSampler(world.base, max_new_tokens=CAP)
    metrics = probe(sampler, world.base, prompts, draws=50, runs=2)
    assert abs(metrics["opponent/kl"]) < 1e-4 and metrics["opponent/kl_se"] < 1e-4
    # 2 prompts × 50 draws: the decoding pass and the scoring pass, nothing more.
    assert metrics["opponent/probe_tokens"] < 2 * 2 * 50 * (max(map(len, prompts)) + CAP + 1)


@pytest.mark.parametrize("k", [1, 4])
def test_sir_bound_is_above_its_exact_kl(target, prompts, exact_p, reference, k):
    """K = 1: the bound is the local product's KL, an equality; K = 4: at least SIR's exact KL
    (its law enumerated), and well below K = 1's."""
    sampler = ImportanceResampler(target, None, k, max_new_tokens=CAP)
    runs = 3000
    metrics = probe(sampler, target, prompts, draws=2, runs=runs)
    assert "opponent/kl" not in metrics
    bound, se = metrics["opponent/kl_bound"], metrics["opponent/kl_bound_se"]
    slack = Z_SIGMAS * se + bias(reference)
    local = exact_kl(exact_p, prompts, target.local_product())
    laws = []
    for p, x in zip(exact_p, prompts, strict=True):
        q = exact_distribution(target.local_product(), x, CAP)
        law = sir_output_law(q.logprobs, p.logprobs, k)
        laws.append(divergences(p.logprobs, law.logprobs)["kl_qp"] + law.precision)
    sir_kl = sum(laws) / len(laws)
    assert bound >= sir_kl - slack, (metrics, sir_kl)
    if k == 1:
        assert abs(bound - local) <= slack, (metrics, local)
    else:
        assert bound + slack < local
    # The probe's figure is kl_upper_bound of the draws' own log Ẑ, against its reference.
    samples = sampler.sample(prompts, runs, generator=derive_seed(SEED, "draws"))
    populations = samples.stats["log_z_populations"]
    assert kl_upper_bound(populations, reference).mean() == pytest.approx((bound, se))
    if k == 1:
        # Negative control: the bound taken from the log of the mean Ẑ (≈ log Z, so ≈ 0).
        broken = float((reference.value - logmeanexp(populations.double())).mean())
        assert broken < sir_kl - slack, (broken, sir_kl)


def test_smc_bound(target, prompts, exact_p, reference):
    """N = 1 never resamples: the bound is the local product's KL, an equality. N = 8: a KL
    bound, not negative beyond its noise, and below N = 1's."""
    local = exact_kl(exact_p, prompts, target.local_product())
    bounds = {}
    for n in (1, 8):
        sampler = SMCSampler(target, n, max_new_tokens=CAP)
        metrics = probe(sampler, target, prompts, draws=2, runs=1500)
        bounds[n] = metrics

    one, eight = bounds[1], bounds[8]
    slack_one = Z_SIGMAS * one["opponent/kl_bound_se"] + bias(reference)
    assert abs(one["opponent/kl_bound"] - local) <= slack_one, (one, local)
    slack_eight = Z_SIGMAS * eight["opponent/kl_bound_se"] + bias(reference)
    assert eight["opponent/kl_bound"] >= -slack_eight
    assert eight["opponent/kl_bound"] + slack_eight < local


def test_kl_upper_bound_refuses_one_run_and_infinite_estimates():
    reference = Estimate(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 estimates"):
        kl_upper_bound(torch.zeros(2, 1), reference)
    with pytest.raises(ValueError, match="not finite"):
        kl_upper_bound(torch.tensor([[0.0, -float("inf")], [0.0, 0.0]]), reference)


# -- in the trainer --------------------------------------------------------------------------

SMALL = dict(
    max_examples=64, batch_size=16, epochs=1, generation_chunk=16, progress=False, iterations=2
)
PROBE_KEYS = ("opponent/kl", "opponent/kl_se", "opponent/kl_bound", "opponent/kl_bound_se")
PROBE_KEYS += ("opponent/probe_tokens",)


def train(world, tmp_path, name, opponents=opponent_sampler, **overrides):
    config = AlphaSpinConfig(output_dir=str(tmp_path / name), **{**SMALL, **overrides})
    trainer = AlphaSpinTrainer(config, world=world, evaluate=lambda policy: {}, opponents=opponents)
    return trainer, trainer.train()


def test_trainer_probes_the_opponent_it_built(world, tmp_path):
    """The trainer probes the very sampler its factory built, against that iteration's π_ref,
    on the first probe_prompts prompts. The factory here draws from the shifted policy (a
    density far from π_ref at every t, so the KL is large and its error meaningful), and the
    exact KL(shifted ‖ π_ref) is enumerated at the run's L = 7 with π_1 read back from disk.
    The reference's bias is bounded by kl_se² (its SE is part of kl_se)."""

    def shifted_opponent(config, reference, iterates, *, max_new_tokens, **_):
        return AncestralSampler(world.shifted, max_new_tokens=max_new_tokens, target=reference)

    probe = dict(probe_prompts=2, probe_reference_particles=32, probe_reference_runs=50)
    trainer, records = train(
        world, tmp_path, "run", shifted_opponent, alpha=0.5, history=1, probe_draws=1000, **probe
    )
    base, cap = trainer.base, trainer.max_new_tokens
    pi_1 = load_iterate([base], tmp_path / "run" / "iterates" / "iter_1", 1, trainer.config)
    prompts = trainer.examples.prompt_ids[:2]
    for t, reference in enumerate([base, GeometricMixture([base, pi_1], [0.5, 0.5])]):
        metrics = records[t + 1]["metrics"]
        kls = [
            divergences(
                exact_distribution(reference, x, cap).logprobs,
                exact_distribution(world.shifted, x, cap).logprobs,
            )["kl_qp"]
            for x in prompts
        ]
        exact, se = sum(kls) / len(kls), metrics["opponent/kl_se"]

        assert abs(metrics["opponent/kl"] - exact) <= Z_SIGMAS * se + se**2, (t, metrics, exact)
        assert se < 0.1 * exact and metrics["opponent/probe_tokens"] > 0
        assert "probe" in records[t + 1]["seconds"]


def test_probe_changes_nothing_else_and_bounds_sir(world, tmp_path):
    """With the probe on, a SIR run's data and every other metric are those of the same run
    without it; SIR's record holds a bound, never an estimate; no probe at α = 1; and the
    probe's settings may change when a run resumes (they change no data or iterate)."""
    sir = dict(alpha=0.8, history=2, sampler="importance", num_candidates=4)
    _, plain = train(world, tmp_path, "plain", **sir)
    _, probed = train(world, tmp_path, "probed", probe_prompts=2, **sir)
    for without, with_probe in zip(plain, probed, strict=True):
        others = {k: v for k, v in with_probe["metrics"].items() if k not in PROBE_KEYS}
        assert others == without["metrics"]
    for t in (0, 1):
        paths = [
            tmp_path / name / "data" / f"iteration_{t}.parquet" for name in ("plain", "probed")
        ]
        assert paths[0].read_bytes() == paths[1].read_bytes()
    second = probed[2]["metrics"]
    assert "opponent/kl" not in second and "opponent/kl_se" not in second
    assert second["opponent/kl_bound_se"] > 0 and second["opponent/probe_tokens"] > 0
    assert json.loads((tmp_path / "probed" / "metrics.json").read_text())[2]["metrics"] == second
    _, spin = train(world, tmp_path, "spin", alpha=1.0, history=1, iterations=1, probe_prompts=2)
    assert not set(PROBE_KEYS) & set(spin[1]["metrics"])
    # Resumed without the probe: the first iteration keeps its figures, the second has none.
    train(world, tmp_path, "cut", probe_prompts=2, **{**sir, "iterations": 1})
    _, resumed = train(world, tmp_path, "cut", **sir)
    assert (
        "opponent/kl" in resumed[1]["metrics"] and "opponent/kl_bound" not in resumed[2]["metrics"]
    )


def test_probe_settings_are_checked(world, tmp_path):
    for overrides, message in [
        ({"probe_prompts": -1}, "probe_prompts"),
        ({"probe_draws": 1}, "probe_draws=1 must be >= 2"),
        ({"probe_reference_runs": 1}, "probe_reference_runs"),
        ({"probe_runs": 0}, "probe_runs"),
        ({"probe_reference_particles": 0}, "probe_reference_particles"),
    ]:
        with pytest.raises(ValueError, match=message):
            AlphaSpinConfig(**overrides)
    config = AlphaSpinConfig(output_dir=str(tmp_path / "x"), **{**SMALL, "probe_prompts": 65})
    with pytest.raises(ValueError, match="probe_prompts=65 exceeds the 64 examples"):
        AlphaSpinTrainer(config, world=world)
    assert not (tmp_path / "x").exists()


# -- in the real-model α-SPIN study's table ----------------------------------------------------


def test_real_study_table_shows_the_probe_and_marks_a_bound():
    """experiments.alpha_spin_real: the probe's figure per iteration, averaged over seeds with
    the probes' own SEs combined; a bound is shown as one (≤), never as an estimate."""
    from experiments.alpha_spin_real import StudyConfig, markdown, summarize

    def record(t, **probe):
        metrics = {"task/score": 0.5, "task/score_se": 0.1}
        return {"iteration": t, "metrics": metrics | {f"opponent/{k}": v for k, v in probe.items()}}

    def result(variant, seed, first, second):
        return {"variant": variant, "seed": seed, "records": [record(0), first, second]}

    results = [
        result(
            "α-SPIN", 0, record(1, kl=0.0, kl_se=0.0), record(2, kl_bound=0.3, kl_bound_se=0.03)
        ),
        result(
            "α-SPIN", 1, record(1, kl=0.0, kl_se=0.0), record(2, kl_bound=0.5, kl_bound_se=0.04)
        ),
        result("SPIN", 0, record(1), record(2)),
    ]
    table = summarize(results, 2)
    second = table["α-SPIN"][2]
    assert second["opponent_kl_bound"] == pytest.approx(0.4)
    assert second["opponent_kl_bound_se"] == pytest.approx(0.025)  # √(0.03² + 0.04²) / 2
    assert "opponent_kl" not in second and "opponent_kl_bound" not in table["SPIN"][2]
    text = markdown(table, StudyConfig(iterations=2, seeds=2, probe_prompts=4))
    assert "| α-SPIN | 0.000 ± 0.000 | ≤ 0.400 ± 0.025 |" in text
    assert "| SPIN | —" not in text  # no probe at α = 1: no row
    with pytest.raises(ValueError, match="probe_prompts=65 exceeds train_tasks=64"):
        StudyConfig(probe_prompts=65).validate()


def test_real_study_gflownet_opponent_builds_for_every_reference(world, tmp_path):
    """The study's GFlowNet settings (the real-model preset) make an opponent for the reference
    of every α < 1 variant at iteration 2, whose M_h mixes π_0 and π_1 when h ≥ 2 (no twist
    form there: the preset's "twist" failed the α-SPIN runs at that iteration)."""
    from experiments.alpha_spin_real import StudyConfig, jobs
    from experiments.cli import parse_config
    from selfplay.reference import build_reference

    study = parse_config(StudyConfig, ["--quick", "--sampler", "gflownet"])
    variants = {
        job["variant"]: job
        for job in jobs(study, tmp_path, tmp_path / "base")
        if job["config"]["alpha"] < 1
    }
    assert variants
    for job in variants.values():
        config = AlphaSpinConfig(**job["config"])
        assert config.gflownet.optimizer == "adafactor"  # the real-model preset
        # Fresh policies: the residual form adds its adapter to the model it reads.
        iterates = [world.load_policy("base"), world.load_policy("shifted")]
        reference = build_reference(iterates, config.alpha, config.history)
        sampler = opponent_sampler(
            config, reference, iterates, max_new_tokens=CAP, iteration=2,
            fit_prompts=world.train_prompts[:2],
        )  # fmt: skip
        assert sampler.sample(world.eval_prompts[:1], 1, generator=0).lengths.numel() == 1
