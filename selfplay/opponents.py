"""The sampler that draws the generated responses y' of an α-SPIN iteration.

A normalized reference (α = 1, or π_0 at t = 0) is always sampled exactly; a geometric-mixture
reference by the configured sampler (docs/samplers.md compares them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from accelerate import PartialState

from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture
from gfn_spin.policy import Policy
from samplers.ancestral import AncestralSampler, ArithmeticMixtureSampler
from samplers.base import Sampler
from samplers.choice import choose_sampler
from samplers.gflownet import GFlowNetSampler
from samplers.importance import ImportanceResampler
from samplers.smc import SMCSampler
from samplers.weighting import model_tokens
from selfplay.config import AlphaSpinConfig, derive_seed
from selfplay.reference import history_mixture

logger = logging.getLogger(__name__)


class OpponentFactory(Protocol):
    """What :class:`selfplay.AlphaSpinTrainer` calls to get iteration t's opponent sampler:
    :func:`opponent_sampler`'s arguments and meaning (a benchmark may wrap it to time the
    opponents it builds)."""

    def __call__(
        self,
        config: AlphaSpinConfig,
        reference: Density,
        iterates: Sequence[Policy],
        *,
        max_new_tokens: int,
        iteration: int,
        fit_prompts: Sequence[Sequence[int]],
        warm_start_from: str | os.PathLike | None,
        save_to: str | os.PathLike | None,
    ) -> Sampler: ...


def opponent_sampler(
    config: AlphaSpinConfig,
    reference: Density,
    iterates: Sequence[Policy],
    *,
    max_new_tokens: int,
    iteration: int,
    fit_prompts: Sequence[Sequence[int]] = (),
    warm_start_from: GFlowNetSampler | str | os.PathLike | None = None,
    save_to: str | os.PathLike | None = None,
) -> Sampler:
    """The sampler drawing y' for iteration t (``iterates = [π_0, ..., π_t]``); the default
    :class:`OpponentFactory` of :class:`selfplay.AlphaSpinTrainer`.

    "ancestral" draws from π_t (reference log-probs still come from π_ref), "importance"
    resamples K proposals (M_h, the local product or π_t), "smc" runs N particles from the
    local product, "auto" (α < 1) takes what :func:`samplers.choose_sampler` picks for
    ``config.auto_accuracy`` from a pilot on ``fit_prompts`` (each sampled once), fitting the
    GFlowNet below only when SIR would need more than ``config.auto_max_candidates``;
    "gflownet" fits a GFlowNet on ``fit_prompts`` first: from the weights of
    ``warm_start_from`` (the previous iteration's GFlowNet, a sampler or a saved folder) for
    ``config.gflownet_warm_steps`` steps at ``config.gflownet_warm_learning_rate`` when
    ``config.gflownet_warm_start`` allows it (see
    :func:`fit_opponent_gflownet`), else from fresh weights for ``config.gflownet.steps``;
    the fitted GFlowNet is then saved to ``save_to`` when given, so that the next iteration
    warm-starts from it, also after a resume. The other samplers learn nothing and save
    nothing.
    """
    kind = config.resolved_sampler()
    if reference.normalized:
        if isinstance(reference, ArithmeticMixture):
            return ArithmeticMixtureSampler(
                reference.components, reference.weights, max_new_tokens=max_new_tokens
            )
        return AncestralSampler(reference, max_new_tokens=max_new_tokens)
    if kind == "ancestral":
        return AncestralSampler(iterates[-1], max_new_tokens=max_new_tokens, target=reference)
    if kind == "importance":
        proposals = {
            "history": lambda: history_mixture(iterates, config.history),
            "local": reference.local_product,
            "current": lambda: iterates[-1],
        }
        return ImportanceResampler(
            reference,
            proposals[config.proposal](),
            config.num_candidates,
            max_new_tokens=max_new_tokens,
        )
    if kind == "smc":
        return SMCSampler(reference, config.num_particles, max_new_tokens=max_new_tokens)
    if kind not in ("gflownet", "auto"):
        raise ValueError(f"sampler={kind!r} cannot sample a geometric-mixture reference")

    def fitted() -> tuple[GFlowNetSampler, int]:
        return _fitted_gflownet(
            config, reference, iterates[-1], iteration, max_new_tokens, fit_prompts,
            warm_start_from, save_to,
        )  # fmt: skip

    if kind == "gflownet":
        return fitted()[0]
    return _auto_opponent(
        config,
        reference,
        fitted,
        max_new_tokens=max_new_tokens,
        iteration=iteration,
        fit_prompts=fit_prompts,
        warm=config.gflownet_warm_start and warm_start_from is not None,
    )


def _fitted_gflownet(
    config: AlphaSpinConfig,
    reference: Density,
    current: Policy,
    iteration: int,
    max_new_tokens: int,
    fit_prompts: Sequence[Sequence[int]],
    warm_start_from: GFlowNetSampler | str | os.PathLike | None,
    save_to: str | os.PathLike | None,
) -> tuple[GFlowNetSampler, int]:
    """The GFlowNet opponent on the ``current`` iterate π_t, fitted (warm when possible) and
    saved; its fit's model tokens."""
    gflownet = GFlowNetSampler(
        reference,
        current,  # a LoRA iterate carries the GFlowNet's adapter stacked on its own
        config=dataclasses.replace(
            config.gflownet,
            max_new_tokens=max_new_tokens,
            adapter_name=f"gflownet_{iteration}",
            seed=derive_seed(config.seed, "gflownet", iteration),
        ),
    )
    before = model_tokens(reference, gflownet.policy)
    fit_opponent_gflownet(config, gflownet, fit_prompts, warm_start_from)
    if save_to is not None:
        gflownet.save(save_to)
    return gflownet, model_tokens(reference, gflownet.policy) - before


def _auto_opponent(
    config: AlphaSpinConfig,
    reference: Density,
    fitted: Callable[[], tuple[GFlowNetSampler, int]],
    *,
    max_new_tokens: int,
    iteration: int,
    fit_prompts: Sequence[Sequence[int]],
    warm: bool,
) -> Sampler:
    """The sampler :func:`samplers.choose_sampler` picks for ``config.auto_accuracy``, logged;
    ``fitted`` fits the GFlowNet (``warm``: from the previous one) only if it may pay."""
    # "auto": every prompt of the iteration is sampled once; a fit draws this many rollouts.
    steps = config.gflownet.steps
    if warm and config.gflownet_warm_steps is not None:
        steps = config.gflownet_warm_steps
    rollouts = steps * config.gflownet.prompts_per_step * config.gflownet.samples_per_prompt
    choice = choose_sampler(
        reference,
        list(fit_prompts),
        accuracy=config.auto_accuracy,
        draws_per_prompt=1,
        max_new_tokens=max_new_tokens,
        max_candidates=config.auto_max_candidates,
        fit_gflownet=fitted,
        fit_rollouts=rollouts,
        generator=derive_seed(config.seed, "pilot", iteration),
    )
    logger.info(
        "iteration %d: sampler auto chose %s (total %.1f model tokens per draw, fit included) "
        "among %s; pilot %d tokens",
        iteration,
        choice.chosen.name,
        choice.chosen.total_tokens_per_draw,
        ", ".join(f"{o.name}: {o.total_tokens_per_draw:.1f}" for o in choice.options),
        choice.pilot_tokens,
    )
    return choice.sampler


def fit_opponent_gflownet(
    config: AlphaSpinConfig,
    gflownet: GFlowNetSampler,
    fit_prompts: Sequence[Sequence[int]],
    warm_start_from: GFlowNetSampler | str | os.PathLike | None,
) -> bool:
    """Fit the opponent GFlowNet, warm-started when possible; returns whether it was. Its
    progress bar shows with ``config.progress``, on the main process only.

    The reference changes between iterations (its history mixture drops its oldest iterate
    and takes the newest), so what carries over is the learned correction to its local
    product, or to π_t (:meth:`GFlowNetSampler.warm_start` says what each parametrization
    carries). Within one run the shapes stay the same: "auto" resolves to "twist" for
    h = 1 (two policy components at every iteration) and to "residual" otherwise (a LoRA
    adapter, whatever the number of iterates mixed). A source that cannot be used (another
    parametrization or shape, a missing or damaged folder) gives a cold fit, logged with
    the reason; without a source (the first GFlowNet iteration) the fit is cold.
    """
    warm = False
    if config.gflownet_warm_start and warm_start_from is not None:
        try:
            gflownet.warm_start(warm_start_from, learning_rate=config.gflownet_warm_learning_rate)
            warm = True
        except (ValueError, FileNotFoundError) as reason:
            logger.warning(
                "GFlowNet opponent: cold start, the warm start is impossible: %s", reason
            )
    steps = config.gflownet_warm_steps if warm else None
    progress = config.progress and PartialState().is_main_process
    gflownet.fit(list(fit_prompts), steps, progress=progress)
    return warm
