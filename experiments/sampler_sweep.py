"""Which sampler settings matter?  ``python -m experiments.sampler_sweep``.

For whoever tunes a sampler of the tiny world's geometric mixture (docs/toyworld.md): SIR over
K and SMC over N (|Δlog Z| against the enumerated log Z, from their draws), then GFlowNet
settings varied one at a time around the base setting (``--gflownet.<field>``): training steps,
SubTB λ, weighting, exploration, replay, LoRA rank, parametrization, each measured by exact TV
and KL(target‖policy) of its enumerated policy. Outputs: :mod:`experiments.studies`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from experiments.evaluation import Entry, evaluate_exact
from experiments.studies import AblationConfig, Setup, base_setting, gfn_config, run_studies
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from samplers import ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetSampler


@dataclass
class SweepConfig(AblationConfig):
    """SIR's K, SMC's N and GFlowNet settings one at a time, against the exact target."""

    QUICK: ClassVar[dict[str, Any]] = {
        "num_eval_prompts": 2,
        "draws": 32,
        "sir_candidates": (1, 4, 16),
        "smc_particles": (4, 16),
        "gflownet.steps": 40,
        "gfn_variants": ("twist_updates=1", "loss=log_variance", "parametrization=residual"),
    }
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/sampler_sweep",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    sir_candidates: tuple[int, ...] = option(
        (1, 4, 16, 64), "K values of SIR from the local product (K=1 is the local product itself)."
    )
    smc_particles: tuple[int, ...] = option((4, 16, 64), "N values of SMC from the local product.")
    gfn_variants: tuple[str, ...] = option(
        (
            "steps=600",
            "twist_updates=1",
            "loss=log_variance",
            "loss=tb",
            "termination_gradient=anchor",
            "subtb_lambda=0.5",
            "weighting=geometric_within",
            "explore_prob=0.667",
            "replay_prob=0.3",
            "reward_temperature_start=2",
            "twist_width=64",
            "parametrization=residual,learning_rate=1e-3,prompts_per_step=16",
            "parametrization=lora,learning_rate=1e-3,prompts_per_step=16",
        ),
        """GFlowNet settings measured besides the base: each changes the base
            (--gflownet.<field>) by comma-joined GFlowNetConfig field=value (tuples as
            low:high).""",
    )

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        super().validate()
        if any(k < 1 for k in (*self.sir_candidates, *self.smc_particles)):
            raise ValueError("SIR candidates and SMC particles must be >= 1")
        for spec in self.gfn_variants:
            gfn_config(self, spec, 0.5, 7)  # every setting parses and validates up front


def sweep(config: SweepConfig, setup: Setup, logger: Any) -> list[dict[str, Any]]:
    """The sweep at every α of ``config``."""
    rows = []
    units = len(config.alphas) * (2 + len(config.gfn_variants))
    with tqdm(total=units, desc="sweep", disable=not config.progress) as bar:
        for alpha in config.alphas:
            rows += sweep_alpha(config, setup, alpha, logger, bar)
    return rows


def sweep_alpha(
    config: SweepConfig, setup: Setup, alpha: float, logger: Any, bar: Any
) -> list[dict[str, Any]]:
    """SIR/SMC over their budgets, then every GFlowNet setting, against the exact target."""
    world, components, eval_prompts = setup.world, setup.components, setup.eval_prompts
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    local = target.local_product()
    entries = [
        Entry(
            f"SIR K={k}",
            ImportanceResampler(target, local, k, max_new_tokens=cap),
            None,
            f"K={k}",
            local,
            k,
        )
        for k in config.sir_candidates
    ] + [
        Entry(f"SMC N={n}", SMCSampler(target, n, max_new_tokens=cap), None, f"N={n}")
        for n in config.smc_particles
    ]
    rows = evaluate_exact(
        config, world.shifted, cap, alpha, entries, components, eval_prompts, logger
    )
    # The draws' TV is noise-bound over the whole response space; log Ẑ has an exact reference.
    log_z = [
        torch.logsumexp((1 - alpha) * base.logprobs + alpha * shifted.logprobs, 0)
        for base, shifted in components
    ]
    for entry, row in zip(entries, rows, strict=True):
        row.update(section="sweep", setting=row.pop("budget"))
        if entry.kind == "sir":  # SMC's rows carry their measured |Δlog Z| already
            samples = entry.sampler.sample(eval_prompts, config.draws, generator=config.seed + 1)
            estimate = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64)
            error = estimate - torch.stack(log_z)
            row["log_z_error"] = float(error.abs().mean())
    bar.update(1)
    for variant in ("", *config.gfn_variants):
        gfn = gfn_config(config, variant, alpha, cap)
        gflownet = GFlowNetSampler(target, world.shifted, gfn)
        started = time.perf_counter()
        gflownet.fit(world.train_prompts, progress=False)
        seconds = time.perf_counter() - started
        entry = Entry(f"GFlowNet {variant or 'base'}", gflownet, gflownet.policy, "")
        (row,) = evaluate_exact(
            config, world.shifted, cap, alpha, [entry], components, eval_prompts, logger
        )
        row.update(
            section="sweep",
            setting=variant or "base: " + base_setting(config),
            train_steps=gfn.steps,
            train_seconds=seconds,
            target_evaluations=gfn.steps * gfn.prompts_per_step * gfn.samples_per_prompt,
        )
        logger.info(
            "α=%g %-45s TV %.4f KL %.4f (%d steps, %.0f s)",
            alpha,
            entry.name,
            row["tv"],
            row["kl"],
            gfn.steps,
            seconds,
        )
        rows.append(row)
        bar.update(1)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the results dict (also written to ``output_dir``)."""
    return run_studies(
        SweepConfig,
        argv,
        lambda config: [sweep],
        "experiments.sampler_sweep",
        __doc__.split("\n")[0],
    )


if __name__ == "__main__":
    main()
