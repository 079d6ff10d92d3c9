"""Is the GFlowNet's remaining error a matter of training steps, or of one adapter fitting many
prompts?  ``python -m experiments.amortization``.

For whoever decides how to train a GFlowNet of the tiny world's geometric mixture
(docs/toyworld.md): the base setting (``--gflownet.<field>``, constant learning rate) is fitted
on the train prompts and, as a non-amortized reference, on the eval prompts themselves; exact
TV after each of ``amortization_steps``, on the eval prompts and (for the amortized fit) on as
many train prompts, beside the maximum-likelihood oracle. Outputs: :mod:`experiments.studies`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from experiments.evaluation import Entry, enumerate_components, evaluate_exact
from experiments.studies import AblationConfig, Setup, gfn_config, run_studies
from gfn_spin.exact import ExactDistribution, exact_distribution
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from gfn_spin.samples import pad_responses
from samplers.gflownet import GFlowNetSampler


@dataclass
class AmortizationConfig(AblationConfig):
    """SubTB fitted on the train prompts and on the eval prompts, and the likelihood oracle."""

    QUICK: ClassVar[dict[str, Any]] = {"num_eval_prompts": 2, "amortization_steps": (100, 300)}
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/amortization",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    amortization_steps: tuple[int, ...] = option(
        (500, 2000, 6000),
        "Cumulative training steps at which the amortization study measures both fits.",
    )

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        super().validate()
        if not self.amortization_steps or min(self.amortization_steps) < 1:
            raise ValueError(f"amortization_steps={self.amortization_steps} must be >= 1")


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
    config: AmortizationConfig, setup: Setup, alpha: float, logger: Any
) -> list[dict[str, Any]]:
    """The base GFlowNet setting fitted on the train prompts vs on the eval prompts themselves.

    Both fits run with a constant learning rate so that one fit is measured after each of
    ``amortization_steps`` (a cosine schedule depends on the total). If the amortized fit
    stalls while the one on the eval prompts keeps improving, and its TV on train prompts is no better
    than on held-out ones, the limit is fitting many prompts with one adapter, not steps or
    generalization. A third fit, the oracle of :func:`likelihood_fit` on the train prompts,
    tells the SubTB training signal apart from what the parametrization can amortize.
    """
    world, components, eval_prompts = setup.world, setup.components, setup.eval_prompts
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    stride = max(1, len(world.train_prompts) // len(eval_prompts))
    train_probe = [list(p) for p in world.train_prompts[::stride][: len(eval_prompts)]]
    train_components = enumerate_components(world.base, world.shifted, train_probe, cap)
    measured = {"eval": (eval_prompts, components), "train": (train_probe, train_components)}
    # (name, fit prompts, oracle?, prompts measured on): the eval-prompt fit is the
    # non-amortized reference, so only its own prompts count.
    fits = (
        ("GFlowNet fit on train prompts", world.train_prompts, False, ("eval", "train")),
        ("GFlowNet fit on eval prompts", eval_prompts, False, ("eval",)),
        (
            "Likelihood fit on exact target draws (oracle) on train prompts",
            world.train_prompts,
            True,
            ("eval", "train"),
        ),
    )
    rows = []
    for fit_name, prompts, oracle, measured_on in fits:
        gfn = gfn_config(config, "lr_decay=constant", alpha, cap)
        gfn.adapter_name += "_" + "".join(c if c.isalnum() else "_" for c in fit_name.lower())
        sampler = GFlowNetSampler(target, world.shifted, gfn)
        generator, exact = torch.Generator().manual_seed(config.seed), {}
        seconds = 0.0
        for steps in sorted(config.amortization_steps):
            started = time.perf_counter()
            if oracle:
                likelihood_fit(sampler, prompts, steps, generator, exact)
            else:
                sampler.fit(prompts, steps=steps, progress=False)
            seconds += time.perf_counter() - started
            for on in measured_on:
                probe, probe_components = measured[on]
                name = f"{fit_name}, TV on {on} prompts"
                entry = Entry(name, sampler, sampler.policy, "")
                (row,) = evaluate_exact(
                    config, world.shifted, cap, alpha, [entry], probe_components, probe, logger
                )
                row.update(
                    section="amortization",
                    setting=f"{len(prompts)} fit prompts, {steps} steps",
                    train_steps=steps,
                    train_seconds=seconds,
                    # the oracle reads the enumerated target: no count of evaluations applies
                    target_evaluations=None
                    if oracle
                    else steps * gfn.prompts_per_step * gfn.samples_per_prompt,
                )
                logger.info("α=%g %s after %d steps: %.4f", alpha, name, steps, row["tv"])
                rows.append(row)
    return rows


def amortization(config: AmortizationConfig, setup: Setup, logger: Any) -> list[dict[str, Any]]:
    """The amortization study at every α of ``config``."""
    return [
        row for alpha in config.alphas for row in amortization_alpha(config, setup, alpha, logger)
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict (also written to ``output_dir``)."""
    return run_studies(
        AmortizationConfig,
        argv,
        lambda config: [amortization],
        "experiments.amortization",
        __doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
