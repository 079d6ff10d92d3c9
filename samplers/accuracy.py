"""How far a sampler is from its target where nothing can be enumerated, with standard errors.

For whoever measures samplers on a real model (``experiments.real_model``). Three estimators,
each a pure function of log-weights, so each is checked against exact enumeration on the tiny
world (tests/test_accuracy.py) before it is trusted on a real vocabulary:

- :func:`reference_log_z`: per prompt, ``log Z`` from R independent SMC runs with many
  particles, and its standard error;
- :func:`kl_to_target`: ``KL(q‖p) = log Z − E_q[log p̃ − log q]`` of a sampler with an exact
  ``log q``, from its draws' log-weights and a reference ``log Z``;
- :func:`log_z_error`: ``|log Ẑ − log Z|`` of the estimates a weighting sampler (SIR, SMC)
  makes, for samplers without a density (compare them at equal model tokens);
- :func:`kl_upper_bound`: ``log Z − E[log Ẑ]``, an upper bound on the KL of one SIR or SMC
  draw's law to the target (those samplers have no density, so their KL has no estimate).

Every estimator returns an :class:`Estimate` per prompt; :meth:`Estimate.mean` averages it
over prompts (independent, so the squared standard errors add).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gfn_spin.density import Density, PromptLike
from samplers.smc import SMCSampler
from samplers.weighting import logmeanexp


@dataclass(frozen=True)
class Estimate:
    """Per-prompt estimates and their standard errors.

    Attributes:
        value: ``[P]`` float64 estimates, one per prompt.
        se: ``[P]`` float64 standard errors (of the estimate, not of one draw).
    """

    value: torch.Tensor
    se: torch.Tensor

    def mean(self) -> tuple[float, float]:
        """The mean over prompts and its standard error (prompts are independent)."""
        count = self.value.numel()
        return float(self.value.mean()), float(self.se.square().sum().sqrt() / count)

    def select(self, index: Sequence[int] | torch.Tensor) -> Estimate:
        """The estimates of the prompts ``index`` (e.g. fit prompts vs new ones)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Estimate(self.value[index], self.se[index])


def reference_log_z(log_z_runs: torch.Tensor) -> Estimate:
    """``log Z`` per prompt from R independent runs' unbiased estimates ``Ẑ_r``, with its SE.

    SMC's ``Ẑ`` is unbiased in linear space and its log is not, so the runs are averaged as
    ``Ẑ`` (the log of the mean, ``log Z̄``), never as ``log Ẑ`` (whose mean is biased low by
    about ``Var(Ẑ)/(2Z²)`` however many runs). The standard error is the delta method:
    ``SE(log Z̄) ≈ sd(Ẑ_r) / (√R · Z̄)``, computed from weights normalized by their maximum so
    nothing overflows. ``log Z̄`` itself keeps a second-order bias of about ``−SE²/2``.

    Args:
        log_z_runs: ``[P, R]`` each run's ``log Ẑ`` (R ≥ 2; ``SMCSampler``'s
            ``stats["log_z_populations"]`` with ``num_samples=R``).

    Returns:
        ``[P]`` reference ``log Z`` and standard errors (float64).
    """
    log_z_runs = torch.as_tensor(log_z_runs, dtype=torch.float64)
    runs = log_z_runs.shape[-1]
    if runs < 2:
        raise ValueError(f"reference_log_z needs at least 2 runs per prompt, got {runs}")
    value = logmeanexp(log_z_runs)
    ratio = torch.exp(log_z_runs - value[:, None])  # Ẑ_r / Z̄, mean 1
    return Estimate(value, ratio.std(-1) / math.sqrt(runs))


def smc_reference(
    target: Density,
    prompts: Sequence[PromptLike],
    *,
    num_particles: int,
    runs: int,
    max_new_tokens: int,
    generator: torch.Generator | int | None = None,
    batch_size: int = 65536,
) -> Estimate:
    """:func:`reference_log_z` of ``runs`` independent SMC runs of ``num_particles`` each.

    Each run is its own population of the target's default proposal (the local product of a
    geometric mixture), resampled when its ESS falls under N/2. Cost: ``runs · num_particles``
    draws per prompt.
    """
    sampler = SMCSampler(
        target, num_particles, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    samples = sampler.sample(prompts, runs, generator=generator)
    return reference_log_z(samples.stats["log_z_populations"])


def kl_to_target(log_weights: torch.Tensor, log_z: Estimate) -> Estimate:
    """``KL(q‖p) = log Z − E_q[log p̃ − log q]`` per prompt from draws of q, with its SE.

    The expectation is the sample mean of the draws' log-weights ``log w = log p̃ − log q``;
    its standard error is ``sd(log w)/√n``, added in quadrature to the reference's (the draws
    and the reference runs are independent).

    Args:
        log_weights: ``[P, n]`` ``log p̃(y) − log q(y)`` of n ≥ 2 draws of q per prompt (finite:
            a draw the target forbids makes the KL infinite, and is refused).
        log_z: the target's reference ``log Z`` per prompt (:func:`reference_log_z`, or the
            exact value with zero SE).
    """
    log_weights = torch.as_tensor(log_weights, dtype=torch.float64)
    if not bool(torch.isfinite(log_weights).all()):
        raise ValueError("a draw has a non-finite log-weight: KL(q‖p) is infinite or undefined")
    mean, se = _mean_beside(log_weights, log_z, "kl_to_target", "draws")
    return Estimate(log_z.value - mean, se)


def _mean_beside(
    values: torch.Tensor, reference: Estimate, caller: str, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt mean of ``[P, n]`` values (n ≥ 2) and its SE ``sd/√n``, added in quadrature
    to the reference's SE (the values and the reference runs are independent)."""
    count = values.shape[-1]
    if count < 2:
        raise ValueError(f"{caller} needs at least 2 {what} per prompt, got {count}")
    sample_se = values.std(-1) / math.sqrt(count)
    return values.mean(-1), (sample_se.square() + reference.se.square()).sqrt()


def importance_log_z(log_weights: torch.Tensor, group: int) -> torch.Tensor:
    """Independent importance estimates ``log Ẑ = logmeanexp(log w)`` over groups of ``group``
    draws (the first ``group · ⌊n / group⌋`` draws): ``[P, n]`` → ``[P, ⌊n / group⌋]``.

    What a sampler with a density estimates ``log Z`` with at a budget of ``group`` draws, for
    :func:`log_z_error` next to SIR's and SMC's estimates at the same budget.
    """
    log_weights = torch.as_tensor(log_weights, dtype=torch.float64)
    count = log_weights.shape[-1] // group
    if count < 1:
        raise ValueError(f"{log_weights.shape[-1]} draws per prompt make no group of {group}")
    return logmeanexp(log_weights[:, : count * group].reshape(len(log_weights), count, group))


def log_z_error(log_z_estimates: torch.Tensor, reference: Estimate) -> Estimate:
    """Mean ``|log Ẑ_r − log Z|`` per prompt over R independent estimates, with its SE.

    The SE is the runs' ``sd/√R`` added in quadrature to the reference's SE (``|·|`` has slope
    ±1). With a noisy reference the error is biased up by up to the reference's SE, the same
    for every sampler compared against it.

    Args:
        log_z_estimates: ``[P, R]`` each run's ``log Ẑ`` (R ≥ 2).
        reference: the reference ``log Z`` per prompt.
    """
    log_z_estimates = torch.as_tensor(log_z_estimates, dtype=torch.float64)
    errors = (log_z_estimates - reference.value[:, None]).abs()
    return Estimate(*_mean_beside(errors, reference, "log_z_error", "estimates"))


def kl_upper_bound(log_z_estimates: torch.Tensor, reference: Estimate) -> Estimate:
    """``log Z − E[log Ẑ]`` per prompt from R independent estimates, with its SE: an upper
    bound on ``KL(q‖p)`` of the law q of one draw of SIR or SMC, never an estimate of it.

    SIR's draw (one of K candidates picked ∝ its weight) has
    ``KL(q_K‖p) ≤ log Z − E[log Ẑ_K]``, ``Ẑ_K`` the mean of the K weights (Domke & Sheldon
    2018, "Importance Weighting and Variational Inference": the draw's law is the marginal of
    an augmented distribution whose KL to the target's augmentation is this gap). The same
    holds for one particle drawn ∝ its final weight from an SMC population with its unbiased
    ``Ẑ`` (Naesseth et al. 2018, "Variational Sequential Monte Carlo"; Le et al. 2018,
    "Auto-Encoding Sequential Monte Carlo"), by the same argument on the population's extended
    space. With K = 1 (or N = 1, which never resamples) the bound is the proposal's own KL, an
    equality. The SE is the runs' ``sd/√R`` added in quadrature to the reference's; a
    reference ``log Z̄`` biased low (about ``−SE²/2``) biases the bound low by as much.

    Args:
        log_z_estimates: ``[P, R]`` each run's ``log Ẑ`` (R ≥ 2; the sampler's
            ``stats["log_z_populations"]`` with ``num_samples=R``: one per SIR draw or SMC
            population).
        reference: the target's reference ``log Z`` per prompt.
    """
    log_z_estimates = torch.as_tensor(log_z_estimates, dtype=torch.float64)
    if not bool(torch.isfinite(log_z_estimates).all()):
        raise ValueError("an estimate log Ẑ is not finite: the bound is infinite or undefined")
    mean, se = _mean_beside(log_z_estimates, reference, "kl_upper_bound", "estimates")
    return Estimate(reference.value - mean, se)


__all__ = [
    "Estimate",
    "importance_log_z",
    "kl_to_target",
    "kl_upper_bound",
    "log_z_error",
    "reference_log_z",
    "smc_reference",
]
