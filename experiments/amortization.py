"""Is the GFlowNet's remaining error a matter of training steps, or of one adapter fitting many
prompts, and which option transfers to new prompts?  ``python -m experiments.amortization``.

For whoever decides how to train a GFlowNet of the tiny world's geometric mixture
(docs/toyworld.md; ``--many-prompt overlap|stress``: the many-prompt world, whose eval prompts,
evenly spaced among its new prompts, are new to every fit): the base setting
(``--gflownet.<field>``, constant learning rate unless ``--amortization-schedule base``) is
fitted on the train prompts in each form of ``amortization_forms``, and, as a non-amortized
reference, on the served new prompts themselves (``--served probe``: the eval prompts; ``all``:
every new prompt of the world); exact TV after each of ``amortization_steps``, on the eval
prompts and (for the amortized fits) on as many train prompts, beside the local product (no
fit) and the maximum-likelihood oracle (``--oracle false``: none). Each amortized fit is then
refined on the served prompts for ``refine_steps`` (``GFlowNetSampler.refine``,
semi-amortized). Every row carries its fit's model tokens (``fit_tokens``; a refinement's
include the amortized fit's). Outputs: :mod:`experiments.studies`.

At ``GFlowNetConfig``'s defaults (the fits a user runs; docs/gflownet.md, "On the many-prompt
world")::

    python -m experiments.amortization --many-prompt stress --num-eval-prompts 8 \
        --gflownet.parametrization auto --gflownet.learning-rate 2e-3 \
        --gflownet.prompts-per-step 16 --gflownet.explore-prob 0.667 \
        --amortization-schedule base --amortization-steps 1000 --oracle false
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from experiments.cli import run_command
from experiments.evaluation import Entry, enumerate_components, evaluate_exact
from experiments.studies import AblationConfig, Setup, gfn_config, study_main, study_options
from gfn_spin.exact import ExactDistribution, exact_distribution
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from gfn_spin.samples import pad_responses
from samplers import AncestralSampler
from samplers.gflownet import GFlowNetSampler
from samplers.weighting import model_tokens


@dataclass
class AmortizationOptions:
    """The amortization study's own settings."""

    amortization_steps: tuple[int, ...] = option(
        (500, 2000, 6000),
        "Cumulative training steps at which the amortization study measures both fits.",
    )
    amortization_forms: tuple[str, ...] = option(
        ("twist", "prompt_twist"),
        "GFlowNet parametrizations fitted on the train prompts (each measured on train and eval "
        "prompts).",
    )
    refine_steps: int = option(
        50,
        "Steps of semi-amortized refinement on the served prompts (GFlowNetSampler.refine), "
        "warm-started from each amortized fit after its last amortization_steps (0: none).",
    )
    amortization_schedule: Literal["constant", "base"] = option(
        "constant",
        '"constant": every fit at the base peak learning rate, so each of amortization_steps '
        'measures a fit of that length; "base": the base setting\'s warmup and lr_decay over '
        "the last of amortization_steps, so the last measurement is the fit as a user runs it "
        "(the earlier ones are mid-schedule).",
    )
    served: Literal["probe", "all"] = option(
        "probe",
        "The new prompts being served, on which the non-amortized reference fit and the "
        'refinement train: "probe" (the num_eval_prompts measured) or "all" (every new prompt '
        "of the world: with --many-prompt its 1,024, each visited a few times, as in α-SPIN). "
        "TV is measured on the probe either way.",
    )
    oracle: bool = option(
        True,
        "Also fit the maximum-likelihood oracle on the train prompts (about one more fit's time).",
    )

    def validate(self, config: AblationConfig) -> None:
        """Raise on bad values before any model work (``config``: the one holding these)."""
        if not self.amortization_steps or min(self.amortization_steps) < 1:
            raise ValueError(f"amortization_steps={self.amortization_steps} must be >= 1")
        for form in self.amortization_forms:
            gfn_config(config, f"parametrization={form}", 0.5, 7)
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps={self.refine_steps} must be >= 0")


@dataclass
class AmortizationConfig(AblationConfig):
    """SubTB fitted on the train prompts and on the eval prompts, and the likelihood oracle."""

    QUICK: ClassVar[dict[str, Any]] = {
        "num_eval_prompts": 2,
        "amortization_steps": (100, 300),
        "refine_steps": 20,
    }
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/amortization",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    amortization_options: AmortizationOptions = study_options(
        AmortizationOptions, "The amortization study's own settings."
    )


def likelihood_fit(
    sampler: GFlowNetSampler,
    prompts: list[list[int]],
    steps: int,
    generator: torch.Generator,
    exact: dict[tuple[int, ...], ExactDistribution],
) -> None:
    """The oracle, up to ``steps`` steps in all: maximum likelihood on exact target draws.

    The sampler's own policy, optimizer, batch shape, learning-rate schedule (its step count
    carries over, as in ``fit``) and clipping; only the training signal differs: each step's
    responses are exact target draws and the loss is ``-log q(y)``, an unbiased gradient of
    KL(target‖q). No training signal can do better for this parametrization, so an oracle no
    better than SubTB on held-out prompts says the limit is what one adapter can amortize, not
    the SubTB loss or its exploration. ``exact`` caches the enumerated target per prompt across
    calls (each prompt is enumerated when first drawn).
    """
    cfg = sampler.config
    while sampler.state.step < steps:
        for group in sampler.optimizer.param_groups:
            group["lr"] = sampler.learning_rate(sampler.state.step, steps)
        picks = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=generator)
        rows, responses = [], []
        for i in picks.tolist():
            key = tuple(prompts[i])
            if key not in exact:
                exact[key] = exact_distribution(sampler.target, prompts[i], cfg.max_new_tokens)
            target = exact[key]
            draws = target.sample_indices(cfg.samples_per_prompt, generator).tolist()
            rows += [list(prompts[i])] * len(draws)
            responses += [target.responses[d] for d in draws]
        ids, lengths = pad_responses(responses, cfg.max_new_tokens, sampler.init.pad_token_id)
        sampler.optimizer_step(-sampler.policy.score(rows, ids, lengths).sequence_logprob().mean())
        sampler.state.step += 1


def amortization_alpha(
    config: AblationConfig, setup: Setup, alpha: float, logger: Any
) -> list[dict[str, Any]]:
    """The base GFlowNet setting fitted on the train prompts (in each form of
    ``amortization_forms``, then refined on the eval prompts) vs on the eval prompts themselves,
    beside the local product (no fit) on both probes.

    By default all fits run with a constant learning rate so that one fit is measured after
    each of ``amortization_steps`` (a cosine schedule depends on the total);
    ``amortization_schedule="base"`` runs the base setting's own schedule instead. If the
    amortized fit stalls while the one on the eval prompts keeps improving, and its TV on train
    prompts is no better than on held-out ones, the limit is fitting many prompts with one
    adapter, not steps or generalization. The oracle of :func:`likelihood_fit` on the train
    prompts tells the SubTB training signal apart from what the parametrization can amortize.
    """
    world, eval_prompts = setup.world, setup.eval_prompts
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    stride = max(1, len(world.train_prompts) // len(eval_prompts))
    train_probe = [list(p) for p in world.train_prompts[::stride][: len(eval_prompts)]]
    train_components = enumerate_components(world.base, world.shifted, train_probe, cap)
    measured = {"eval": (eval_prompts, setup.components), "train": (train_probe, train_components)}
    study = _AmortizationStudy(config, world.shifted, target, alpha, cap, measured, logger)
    local = target.local_product()
    baseline = AncestralSampler(local, max_new_tokens=cap, target=target)
    rows = [
        study.measure("Local product (no fit)", baseline, local, on, "no fit", 0, 0.0, 0, 0)
        for on in ("eval", "train")
    ]
    served = eval_prompts
    if config.amortization_options.served == "all":
        served = [list(p) for p in world.eval_prompts]
    for fit_name, form, prompts, oracle, measured_on in _fits(config, world, served):
        sampler = study.sampler_for(fit_name, form)
        fit_rows, seconds, tokens = _fit_and_measure(
            study, sampler, fit_name, prompts, oracle, measured_on
        )
        rows += fit_rows
        if config.amortization_options.refine_steps and "train" in measured_on and not oracle:
            rows.append(study.refine(sampler, fit_name, served, seconds, tokens))
    return rows


def _fit_and_measure(
    study: _AmortizationStudy,
    sampler: GFlowNetSampler,
    fit_name: str,
    prompts: list,
    oracle: bool,
    measured_on: tuple[str, ...],
) -> tuple[list[dict[str, Any]], float, int | None]:
    """One fit measured on ``measured_on`` after each of ``amortization_steps``: its rows, and
    its seconds and model tokens in all (None for the oracle)."""
    options, gfn = study.config.amortization_options, sampler.config
    generator, exact = torch.Generator().manual_seed(study.config.seed), {}
    seconds, spent = 0.0, 0
    horizon, rows = max(options.amortization_steps), []
    for steps in sorted(options.amortization_steps):
        # the components' counters also advance while measuring: count the fit's chunks only
        started, before = time.perf_counter(), model_tokens(study.target, sampler.policy)
        if oracle:
            likelihood_fit(sampler, prompts, steps, generator, exact)
        else:
            sampler.fit(prompts, steps=steps, progress=False, schedule_steps=horizon)
        seconds += time.perf_counter() - started
        spent += model_tokens(study.target, sampler.policy) - before
        # the oracle reads the enumerated target: no count of evaluations applies
        evaluations = None if oracle else steps * gfn.prompts_per_step * gfn.samples_per_prompt
        tokens = None if oracle else spent
        setting = f"{len(prompts)} fit prompts, {steps} steps"
        rows += [
            study.measure(
                fit_name, sampler, sampler.policy, on, setting, steps, seconds, tokens, evaluations
            )
            for on in measured_on
        ]
    return rows, seconds, tokens


def _fits(
    config: AblationConfig, world: Any, served: list
) -> list[tuple[str, str, Any, bool, tuple[str, ...]]]:
    """(name, GFlowNet form, fit prompts, oracle?, prompts measured on) of each fit: the fit on
    the ``served`` new prompts is the non-amortized reference, measured on the eval probe."""
    fits = [
        (
            f"GFlowNet ({form}) fit on train prompts",
            form,
            world.train_prompts,
            False,
            ("eval", "train"),
        )
        for form in config.amortization_options.amortization_forms
    ]
    fits.append(
        (
            "GFlowNet fit on eval prompts",
            config.gflownet.parametrization,
            served,
            False,
            ("eval",),
        )
    )
    if config.amortization_options.oracle:
        fits.append(
            (
                "Likelihood fit on exact target draws (oracle) on train prompts",
                config.gflownet.parametrization,
                world.train_prompts,
                True,
                ("eval", "train"),
            )
        )
    return fits


@dataclass
class _AmortizationStudy:
    """What every fit of one α shares: the target, the length cap, the probes ``measured``
    (name -> prompts and their enumerated components) and the logger rows are reported to."""

    config: AblationConfig
    shifted: Any
    target: GeometricMixture
    alpha: float
    cap: int
    measured: dict[str, tuple[Any, Any]]
    logger: Any

    def measure(
        self, name, sampler, density, on, setting, steps, seconds, tokens, evaluations
    ) -> dict:
        """The exact-TV row of ``density`` (``sampler``'s law) on the ``on`` probe, with its
        fit's costs."""
        probe, probe_components = self.measured[on]
        entry = Entry(f"{name}, TV on {on} prompts", sampler, density, "")
        (row,) = evaluate_exact(
            self.config,
            self.shifted,
            self.cap,
            self.alpha,
            [entry],
            probe_components,
            probe,
            self.logger,
        )
        row.update(
            section="amortization",
            setting=setting,
            train_steps=steps,
            train_seconds=seconds,
            fit_tokens=tokens,
            target_evaluations=evaluations,
        )
        self.logger.info("α=%g %s, %s: TV %.4f", self.alpha, entry.name, setting, row["tv"])
        return row

    def refine(
        self,
        amortized: GFlowNetSampler,
        fit_name: str,
        prompts: list,
        seconds: float,
        tokens: int,
    ) -> dict[str, Any]:
        """``amortized`` refined on the served new ``prompts`` (``GFlowNetSampler.refine``,
        which keeps its config: its schedule over ``refine_steps``), measured on the eval probe;
        its costs include the amortized fit's."""
        steps, gfn = self.config.amortization_options.refine_steps, amortized.config
        started, before = time.perf_counter(), model_tokens(self.target, amortized.policy)
        refined = amortized.refine(prompts, steps)
        # both policies read the target's components, whose counters the refinement advanced
        extra = model_tokens(self.target, refined.policy) - before
        done = amortized.state.step
        setting = f"{done} steps, then {steps} steps on {len(prompts)} new prompts ({extra} tokens)"
        return self.measure(
            f"{fit_name}, refined on eval prompts",
            refined,
            refined.policy,
            "eval",
            setting,
            done + steps,
            seconds + time.perf_counter() - started,
            tokens + extra,
            (done + steps) * gfn.prompts_per_step * gfn.samples_per_prompt,
        )

    def sampler_for(self, fit_name: str, form: str) -> GFlowNetSampler:
        """A fresh GFlowNet in ``form`` (at a constant learning rate unless
        ``amortization_schedule`` is "base"), its adapter named by fit."""
        variant = f"parametrization={form}"
        if self.config.amortization_options.amortization_schedule == "constant":
            variant = "lr_decay=constant," + variant
        gfn = gfn_config(self.config, variant, self.alpha, self.cap)
        # α and the fit tell the study's adapters apart; short enough for refine's "_refined"
        slug = "".join(c if c.isalnum() else "_" for c in f"{self.alpha:g}_{fit_name}".lower())
        gfn.adapter_name = f"amortization_{slug}"
        return GFlowNetSampler(self.target, self.shifted, gfn)


def amortization(config: AblationConfig, setup: Setup, logger: Any) -> list[dict[str, Any]]:
    """The amortization study at every α of ``config``."""
    return [
        row for alpha in config.alphas for row in amortization_alpha(config, setup, alpha, logger)
    ]


main = study_main(AmortizationConfig, amortization, "experiments.amortization", __doc__)
"""Run the study alone: ``main(argv=None)`` → the results dict (also in ``--output-dir``)."""

if __name__ == "__main__":
    run_command(main)
