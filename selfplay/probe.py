"""The opponent probe: how far an iteration's opponent is from π_ref, where nothing is enumerable.

For whoever reads an α-SPIN run's ``metrics.json`` on a real model (docs/alpha_spin.md). With
``AlphaSpinConfig.probe_prompts > 0`` and α < 1, each iteration measures the sampler that drew
its y' (the same object, settings and all) on the first ``probe_prompts`` prompts:

- a reference ``log Z`` per prompt from repeated SMC runs (``samplers.accuracy.smc_reference``;
  exactly 0 when π_ref is normalized, as π_0 is at t = 0);
- for an opponent with an exact density (GFlowNet, ancestral, local product): the estimate
  ``KL(q‖π_ref) = log Z − E_q[log π̃_ref − log q]`` (``opponent/kl``, ``opponent/kl_se``);
- for SIR and SMC, which have none: the upper bound ``log Z − E[log Ẑ]`` on the KL of one
  draw's law (``opponent/kl_bound``, ``opponent/kl_bound_se``), under its own key so that a
  bound is never read as an estimate;
- ``opponent/probe_tokens``: every model token the probe evaluated (a measurement cost, kept
  apart from ``opponent/tokens``, the cost of the iteration's draws).

The probe runs on the main process only and its metrics are broadcast (as the trainer's
evaluation is): a few prompts are not worth splitting, and its seeds then do not depend on the
number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gfn_spin.density import Density
from samplers.accuracy import Estimate, kl_to_target, kl_upper_bound, smc_reference
from samplers.base import ProposalSampler, Sampler
from samplers.weighting import log_weights_by_prompt, model_tokens
from selfplay.config import derive_seed


def probe_reference(
    reference: Density,
    prompts: Sequence[Sequence[int]],
    *,
    particles: int,
    runs: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
) -> Estimate:
    """``log Z`` of π_ref per prompt: exactly 0 (SE 0) for a normalized reference, else
    :func:`samplers.accuracy.smc_reference` of ``runs`` SMC runs of ``particles`` each,
    decoded ``batch_size`` particles at a time (whole populations)."""
    if reference.normalized:
        zeros = torch.zeros(len(prompts), dtype=torch.float64)
        return Estimate(zeros, zeros.clone())
    return smc_reference(
        reference,
        list(prompts),
        num_particles=particles,
        runs=runs,
        max_new_tokens=max_new_tokens,
        generator=seed,
        batch_size=batch_size,
    )


def sampler_kl(
    sampler: Sampler,
    reference: Density,
    prompts: Sequence[Sequence[int]],
    log_z: Estimate,
    *,
    draws: int,
    runs: int,
    seed: int,
) -> tuple[str, Estimate]:
    """``("kl", KL(q‖π_ref) per prompt)`` for a sampler with an exact density, from ``draws``
    draws per prompt; ``("kl_bound", its upper bound)`` for SIR and SMC, from ``runs``
    independent ``log Ẑ`` (one per draw). ``log_z``: π_ref's reference ``log Z`` per prompt.

    Raises a ValueError for a weighting sampler whose target is not ``reference`` (its ``Ẑ``
    would estimate another normalizer) and for a sampler with neither a density nor ``Ẑ``.
    """
    prompts = list(prompts)
    if isinstance(sampler, ProposalSampler):
        if sampler.target is not reference:
            raise ValueError(
                f"{type(sampler).__name__} weights toward another target than π_ref: its log Ẑ "
                "bounds nothing about π_ref"
            )
        samples = sampler.sample(prompts, runs, generator=seed)
        return "kl_bound", kl_upper_bound(samples.stats["log_z_populations"], log_z)
    samples = sampler.sample(prompts, draws, generator=seed)
    if samples.log_q is None:
        raise ValueError(
            f"{type(sampler).__name__} gives neither log q nor log Ẑ estimates: no KL to measure"
        )
    log_target = samples.log_target
    if log_target is None or sampler.target is not reference:
        rows = [p for p in prompts for _ in range(draws)]
        with torch.no_grad():
            log_target = reference.log_prob(rows, samples.response_ids, samples.lengths)
    return "kl", kl_to_target(log_weights_by_prompt(log_target, samples.log_q, draws), log_z)


def opponent_probe(
    sampler: Sampler,
    reference: Density,
    prompts: Sequence[Sequence[int]],
    *,
    reference_particles: int,
    reference_runs: int,
    draws: int,
    runs: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 65536,
) -> dict[str, float]:
    """The probe's ``metrics.json`` entries for one iteration's opponent ``sampler`` and its
    ``reference`` on ``prompts``: ``opponent/kl`` + ``_se`` or ``opponent/kl_bound`` + ``_se``
    (means over the prompts, whose errors are independent), and ``opponent/probe_tokens``.

    Seeds ``derive_seed(seed, "reference")`` and ``derive_seed(seed, "draws")``;
    ``batch_size`` bounds the reference SMC's particles decoded at once (memory). It runs on
    the calling process alone (the trainer calls it on the main one and broadcasts).
    """
    before = model_tokens(reference, *sampler.cost_densities())
    log_z = probe_reference(
        reference,
        prompts,
        particles=reference_particles,
        runs=reference_runs,
        max_new_tokens=max_new_tokens,
        seed=derive_seed(seed, "reference"),
        batch_size=batch_size,
    )
    name, estimate = sampler_kl(
        sampler, reference, prompts, log_z, draws=draws, runs=runs, seed=derive_seed(seed, "draws")
    )
    value, se = estimate.mean()
    tokens = model_tokens(reference, *sampler.cost_densities()) - before
    return {
        f"opponent/{name}": value,
        f"opponent/{name}_se": se,
        "opponent/probe_tokens": float(tokens),
    }
