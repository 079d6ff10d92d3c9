"""How exactly can we sample π_base^(1-α) · π_t^α?  The main job: ``python -m experiments.geometric_mixture``.

On the tiny world (docs/toyworld.md) every density is enumerated, so each sampler's error to
the geometric mixture is a number. For each α the job fits one GFlowNet (and its one-pass form)
on the eval prompts, the prompts it then samples for, as SIR and SMC run on them
(``--gflownet-prompts train``: amortized over the train prompts instead, so evaluated on prompts
the fit never saw), then compares on the eval prompts (held out from the policies' training) at
stated budgets:

- ancestral sampling from π_t (what people do without a geometric sampler),
- the local product q_loc (token-level product),
- SIR from q_loc with K candidates, SMC from q_loc with N particles,
- the GFlowNet, its one-pass form, and SIR with the GFlowNet as proposal.

How each error is measured (exact laws, SIR's exact output law, SMC's |Δlog Z| with standard
errors) is :mod:`experiments.evaluation`'s docstring. Output in ``--output-dir``: two printed
tables (exact laws; SMC), ``results.json`` (config, package versions, git commit, per-prompt
values, the SIR laws' precision, the SMC standard errors), ``error_vs_cost.png`` (per α: exact
TV and KL against model tokens per draw; SMC's ``|Δlog Z|`` in a panel of its own) and
``run.log``.

The world (``--world-preset``): by default ``overlap``, where π_t relates to π_base the way a
self-play iterate relates to its base: the shifted task writes the *same* symbols with other
keep/double/noise probabilities (``shift_rule=style``), and both policies learn from more SFT
examples than in the stress world, so the two policies share their support. ``stress`` is the
symbol-shift world (the shifted task writes the next symbol): the policies barely overlap and
the mixture lives in their tails, a hard case for every sampler. ``--world field=value ...``
adds ToyWorldConfig settings on top of the preset (``seed=1``).

The GFlowNet's settings are ``--gflownet.<field>`` flags (fields of
:class:`samplers.gflownet.GFlowNetConfig`, e.g. ``--gflownet.steps 400``). ``--quick`` runs
small budgets for a first look.

With ``--model``/``--base`` (HF names or local paths) nothing is enumerated; ESS, log Ẑ and the
ELBO gap KL(q‖target) ≈ log Ẑ − E_q[log G̃ − log q] are reported instead.

This file runs past 400 lines because its config documents each of its flags in place (the
``--help`` text); the measuring is :mod:`experiments.evaluation`, the output
:mod:`experiments.reporting`.

Why one module: a study is one module (docs/layering.md): its config (most of the length:
every flag's documented field), the samplers it compares, and its run; shared evaluation
and reporting live in :mod:`experiments.evaluation` and :mod:`experiments.reporting`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from experiments.cli import parse_config
from experiments.common import (
    check_alphas,
    output_set,
    prepare_output_dir,
    read_prompts_file,
    setup_logging,
    split_train_eval,
    world_config,
    write_results,
)
from experiments.evaluation import (
    Entry,
    EvaluationConfig,
    enumerate_components,
    evaluate_estimated,
    evaluate_exact,
    fit_sampler,
)
from experiments.reporting import format_table, plot
from gfn_spin.devices import resolve_device
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from gfn_spin.policy import Policy
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler

DEFAULT_PROMPTS = ("a b", "c d a", "b b c d", "d a")
WORLD_PRESETS: dict[str, tuple[str, ...]] = {
    "overlap": ("shift_rule=style", "sft_examples=8192"),
    "stress": ("shift_rule=symbol",),
}
"""ToyWorldConfig settings of each ``--world-preset`` (``--world`` adds to them)."""


def main_job_gflownet() -> GFlowNetConfig:
    """The main job's GFlowNet recipe: the twist form, SubTB, 200 rollouts, no exploration."""
    return GFlowNetConfig(
        parametrization="auto",
        loss="subtb",
        steps=200,
        twist_updates=8,
        learning_rate=3e-3,
        lora_rank=32,
        lora_alpha=32.0,
        prompts_per_step=32,
        samples_per_prompt=4,
        subtb_lambda=1.0,
        explore_prob=0.0,
        replay_prob=0.0,
    )


@dataclass
class GeometricMixtureConfig(EvaluationConfig):
    """Compare samplers of the geometric mixture π_base^(1-α) π_t^α against the exact target."""

    QUICK: ClassVar[dict[str, Any]] = {
        "alphas": (0.5,),
        "num_eval_prompts": 4,
        "sir_candidates": (4, 16),
        "smc_particles": (16,),
        "smc_max_runs": 32,
        "gflownet.steps": 40,
        "onepass_steps": 40,
    }
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/geometric_mixture",
        "Directory for results.json, error_vs_cost.png and run.log (created if missing).",
    )
    quick: bool = option(
        False, "Small budgets for a first look: one α, 4 eval prompts, 40 GFlowNet steps."
    )
    alphas: tuple[float, ...] = option(
        (0.5, 0.95), "Values of α; the target is GeometricMixture([base, π_t], [1-α, α])."
    )
    device: str = option(
        "auto", '"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...'
    )
    threads: int = option(
        1,
        "CPU threads for torch (tiny models run fastest single-threaded; 0 keeps torch's default).",
    )
    model: str | None = option(
        None, "π_t: an HF model name or local path; None uses the tiny world's shifted policy."
    )
    base: str | None = option(
        None, "π_base: an HF model name or local path; None uses the tiny world's base policy."
    )
    world_cache: str | None = option(
        None, "Cache directory of the tiny world (default $GFN_SPIN_CACHE or ~/.cache/gfn_spin)."
    )
    world_preset: Literal["overlap", "stress"] = option(
        "overlap",
        """Tiny world: "overlap" (π_t writes the base task's symbols with other
            probabilities, both policies SFT-trained on 8,192 examples: policies that overlap
            like a self-play iterate and its base) or "stress" (π_t writes the next symbol:
            policies that barely overlap).""",
    )
    world: tuple[str, ...] = option(
        (),
        """More tiny-world settings as field=value, fields of
            worlds.toy.ToyWorldConfig, applied on top of world_preset (e.g. seed=1); each
            distinct world is built once and cached.""",
    )
    prompts_file: str | None = option(
        None,
        "Real models only: a text file of prompts, one per line (the last quarter is held out).",
    )
    max_new_tokens: int = option(
        32, "Real models only: the length cap L (the tiny world's cap is 7)."
    )
    num_eval_prompts: int = option(16, "Held-out prompts evaluated (at most the world's 16).")
    sir_candidates: tuple[int, ...] = option((4, 16, 64), "K values of SIR from the local product.")
    smc_particles: tuple[int, ...] = option((16, 64), "N values of SMC from the local product.")
    gflownet_prompts: Literal["eval", "train"] = option(
        "eval",
        """Prompts the GFlowNet and its one-pass form are fit on. "eval": the prompts they
            are then asked to sample for, as SIR and SMC are run on them (only the unnormalized
            target is used, never a response; this is how α-SPIN fits its opponent on the
            prompts it samples). "train": amortized over the train prompts and evaluated on
            prompts the fit never saw, which measures how one adapter transfers to new prompts
            (experiments.amortization studies this).""",
    )
    gfn_sir_candidates: int = option(4, "K of SIR with the trained GFlowNet as proposal.")
    gflownet: GFlowNetConfig = option(
        factory=main_job_gflownet,
        help="The main job's GFlowNet recipe, one flag per field (--gflownet.NAME).",
        derived=("max_new_tokens", "adapter_name", "seed"),
    )
    onepass_steps: int = option(
        300,
        """Steps distilling the GFlowNet into the one-pass form (a LoRA adapter on π_t that
            HF generate can serve, one model pass per token); 0 skips it.""",
    )
    onepass_samples_per_prompt: int = option(
        2,
        """Teacher draws per prompt in one distillation step (prompts per step: the
            GFlowNet's). At an equal number of teacher draws, more and smaller steps distil
            better (the README's main-job section has the figures).""",
    )
    onepass_learning_rate: float = option(1e-2, "Peak learning rate of the one-pass distillation.")
    onepass_rank: int = option(64, "LoRA rank of the one-pass form.")
    checkpoint_dir: str | None = option(
        None, "Where GFlowNet checkpoints go (one subdirectory per α); None: no checkpoints."
    )
    resume: bool = option(
        False, "Resume GFlowNet training from the latest checkpoint in checkpoint_dir."
    )
    progress: bool = option(True, "Show tqdm progress bars.")

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        if self.world_preset not in WORLD_PRESETS:
            raise ValueError(
                f"world_preset={self.world_preset!r} must be one of {sorted(WORLD_PRESETS)}"
            )
        world_config(self.world_specs())  # a bad --world setting fails here, not after loading
        check_alphas(self.alphas)
        resolve_device(self.device)
        for name in (
            "draws",
            "num_eval_prompts",
            "max_new_tokens",
            "gfn_sir_candidates",
            "smc_runs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if any(k < 1 for k in (*self.sir_candidates, *self.smc_particles)):
            raise ValueError("sir_candidates and smc_particles must be >= 1")
        if (self.model is None) != (self.base is None):
            raise ValueError("give both --model and --base (real models), or neither (tiny world)")
        if self.model is not None and self.world:
            raise ValueError("--world sets up the tiny world; it does not apply with --model")
        if self.smc_max_runs < self.smc_runs:
            raise ValueError(
                f"smc_max_runs={self.smc_max_runs} must be >= smc_runs={self.smc_runs}"
            )
        if not 0.0 < self.sir_rtol < 1e-2:
            raise ValueError(f"sir_rtol={self.sir_rtol} must be in (0, 0.01)")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")
        if self.gflownet_prompts not in ("eval", "train"):
            raise ValueError(
                f"gflownet_prompts={self.gflownet_prompts!r} must be 'eval' or 'train'"
            )
        if self.onepass_samples_per_prompt < 1:
            raise ValueError(
                f"onepass_samples_per_prompt={self.onepass_samples_per_prompt} must be >= 1"
            )
        if self.onepass_steps < 0:
            raise ValueError(f"onepass_steps={self.onepass_steps} must be >= 0")
        self.gfn_config(0.5, 7)  # validates the GFlowNet settings
        self.onepass_config(0.5, 7)

    def world_specs(self) -> tuple[str, ...]:
        """The tiny world's ToyWorldConfig settings: the preset's, then ``world``'s."""
        return (*WORLD_PRESETS.get(self.world_preset, ()), *self.world)

    def gfn_config(self, alpha: float, max_new_tokens: int) -> GFlowNetConfig:
        """The GFlowNet of one α: ``gflownet`` with the cap, the seed and its adapter name."""
        return dataclasses.replace(
            self.gflownet,
            max_new_tokens=max_new_tokens,
            adapter_name=f"gflownet_alpha_{alpha:g}".replace(".", "_"),
            seed=self.seed,
        )

    def onepass_config(self, alpha: float, max_new_tokens: int) -> GFlowNetConfig:
        """The one-pass form distilled from the GFlowNet: LoRA on π_t."""
        return GFlowNetConfig(
            max_new_tokens=max_new_tokens,
            parametrization="lora",
            steps=self.onepass_steps,
            learning_rate=self.onepass_learning_rate,
            lora_rank=self.onepass_rank,
            lora_alpha=float(self.onepass_rank),
            prompts_per_step=self.gflownet.prompts_per_step,
            samples_per_prompt=self.onepass_samples_per_prompt,
            adapter_name=f"onepass_alpha_{alpha:g}".replace(".", "_"),
            seed=self.seed,
        )


def build_samplers(
    config: GeometricMixtureConfig,
    target: GeometricMixture,
    init: Policy,
    gflownet: GFlowNetSampler,
    max_new_tokens: int,
    onepass: GFlowNetSampler | None = None,
) -> list[Entry]:
    """The compared samplers, in table order."""
    local = target.local_product()
    cap = {"max_new_tokens": max_new_tokens}
    entries = [
        Entry("ancestral π_t", AncestralSampler(init, target=target, **cap), init, "1 draw"),
        Entry("local product", AncestralSampler(local, target=target, **cap), local, "1 draw"),
    ]
    for k in config.sir_candidates:
        sampler = ImportanceResampler(target, local, k, **cap)
        entries.append(Entry(f"SIR K={k}", sampler, None, f"K={k}", local, k))
    for n in config.smc_particles:
        entries.append(Entry(f"SMC N={n}", SMCSampler(target, n, **cap), None, f"N={n}"))
    entries.append(
        Entry("GFlowNet", gflownet, gflownet.policy, f"{gflownet.config.steps} train steps")
    )
    if onepass is not None:
        budget = f"{onepass.config.steps} distillation steps"
        entries.append(Entry("GFlowNet one-pass", onepass, onepass.policy, budget))
    k = config.gfn_sir_candidates
    sampler = ImportanceResampler(target, gflownet.policy, k, **cap)
    entries.append(Entry(f"SIR(GFlowNet) K={k}", sampler, None, f"K={k}", gflownet.policy, k))
    return entries


# -- main ---------------------------------------------------------------------------------------


def _load_models(config: GeometricMixtureConfig, device: torch.device, logger: Any):
    """(world or None, base, π_t, train prompts, eval prompts, L)."""
    if config.model is None:
        from worlds.toy import build_world

        started = time.perf_counter()
        world = build_world(
            world_config(config.world_specs()), cache_dir=config.world_cache, device=device
        )
        logger.info(
            "tiny world (%s) ready in %.1f s (%s)",
            " ".join(config.world_specs()),
            time.perf_counter() - started,
            world.directory,
        )
        eval_prompts = world.eval_prompts[: config.num_eval_prompts]
        return (
            world,
            world.base,
            world.shifted,
            world.train_prompts,
            eval_prompts,
            world.max_new_tokens,
        )
    base = Policy.from_pretrained(config.base, device=device)
    model = Policy.from_pretrained(config.model, device=device)
    if config.prompts_file is not None:
        prompts = read_prompts_file(config.prompts_file)
    else:
        prompts = list(DEFAULT_PROMPTS)
    train, evaluation = split_train_eval(prompts)
    return None, base, model, train, evaluation[: config.num_eval_prompts], config.max_new_tokens


def fit_gflownets(
    config: GeometricMixtureConfig,
    target: GeometricMixture,
    model: Policy,
    fit_prompts: list,
    alpha: float,
    cap: int,
    output_dir: Path,
    logger: Any,
) -> tuple[GFlowNetSampler, GFlowNetSampler | None, dict[str, Any]]:
    """The GFlowNet for one α, and its one-pass form distilled from it (when asked for)."""
    gflownet = GFlowNetSampler(target, model, config.gfn_config(alpha, cap))
    fit = {"checkpoint_root": config.checkpoint_dir, "resume": config.resume}
    fit["progress"] = config.progress
    record = {"alpha": alpha, **fit_sampler(gflownet, fit_prompts, output_dir, **fit)}
    logger.info(
        "α=%g: GFlowNet (%s) trained %d steps in %.1f s, final loss %.4g",
        alpha,
        gflownet.parametrization,
        gflownet.config.steps,
        record["seconds"],
        record["final_loss"] if record["final_loss"] is not None else float("nan"),
    )
    onepass = None
    if config.onepass_steps > 0:
        onepass = GFlowNetSampler(target, model, config.onepass_config(alpha, cap))
        record["onepass"] = fit_sampler(
            onepass, fit_prompts, output_dir, teacher=gflownet.policy, **fit
        )
        logger.info(
            "α=%g: one-pass form distilled %d steps in %.1f s",
            alpha,
            onepass.config.steps,
            record["onepass"]["seconds"],
        )
    return gflownet, onepass, record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict (also written to ``output_dir/results.json``)."""
    config = parse_config(GeometricMixtureConfig, argv, description=__doc__.split("\n")[0])
    config.validate()
    device = resolve_device(config.device)
    if config.prompts_file is not None:
        read_prompts_file(config.prompts_file)  # a missing or too-short file fails before work
    root = prepare_output_dir(config.output_dir)
    # Every output of this run is published together; an older run's never sits beside them.
    with output_set(root) as output_dir:
        logger = setup_logging(output_dir, "experiments.geometric_mixture", append=False)
        results = _run(config, device, output_dir, logger)
        logger.info("results in %s", root)
    return results


def _run(
    config: GeometricMixtureConfig, device: torch.device, output_dir: Path, logger: Any
) -> dict[str, Any]:
    """Load, fit, evaluate and write every output under ``output_dir`` (the staged set)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    world, base, model, train_prompts, eval_prompts, cap = _load_models(config, device, logger)
    load_seconds = time.perf_counter() - started
    if world is not None:
        eval_prompts = [list(p) for p in eval_prompts]
    fit_prompts = eval_prompts if config.gflownet_prompts == "eval" else train_prompts
    components = None
    if world is not None:
        t0 = time.perf_counter()
        components = enumerate_components(base, model, eval_prompts, cap)
        logger.info(
            "enumerated base and π_t on %d eval prompts in %.1f s",
            len(eval_prompts),
            time.perf_counter() - t0,
        )

    rows: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    for alpha in config.alphas:
        target = GeometricMixture([base, model], [1 - alpha, alpha])
        gflownet, onepass, record = fit_gflownets(
            config, target, model, fit_prompts, alpha, cap, output_dir, logger
        )
        training.append(record)
        entries = build_samplers(config, target, model, gflownet, cap, onepass)
        t0 = time.perf_counter()
        if world is not None:
            block = evaluate_exact(
                config, model, cap, alpha, entries, components, eval_prompts, logger
            )
        else:
            block = evaluate_estimated(config, alpha, entries, eval_prompts)
        logger.info("α=%g: evaluation in %.1f s", alpha, time.perf_counter() - t0)
        rows.extend(block)

    table = format_table(rows)
    total = time.perf_counter() - started
    print(table)
    logger.debug("\n%s", table)
    logger.info("total %.1f s", total)
    results = {
        "rows": rows,
        "training": training,
        "seconds": total,
        "load_seconds": load_seconds,
        "world": None if world is None else list(config.world_specs()),
        "sir_law_precision": max(
            (r["law_precision"] for r in rows if r["measure"] == "exact SIR law"), default=None
        ),
        "table": table,
    }
    write_results(results, output_dir, config)
    plot(rows, output_dir / "error_vs_cost.png")
    return results


if __name__ == "__main__":
    main()
