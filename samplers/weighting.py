"""Proposals and importance weights: the helpers SIR and SMC share.

For sampler authors: the default proposal of a target, the checks a proposal must pass, which
proposals are the target's local product (or a residual on it) and so which SMC weightings
apply, token accounting across densities, and numerically safe ESS / log-mean-exp of
log-weights.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from gfn_spin.density import Density, check_compatible, unique_policies
from gfn_spin.mixtures import LocalProduct

#: Where SMC reads the target's step scores g(·|s): see :class:`samplers.SMCSampler`'s
#: ``weighting``.
Weighting = Literal["auto", "exact", "local_product", "components", "general"]


def model_tokens(*densities: Density) -> int:
    """Model tokens evaluated so far by the distinct policies under ``densities`` (no double count)."""
    return sum(p.tokens_evaluated for p in unique_policies(densities))


def default_proposal(target: Density) -> Density:
    """The local product for a geometric mixture; the target itself when it is autoregressive."""
    if target.normalized:
        return target
    local_product = getattr(target, "local_product", None)
    if local_product is None:
        raise ValueError(
            "proposal=None needs a GeometricMixture target (its local product is the default "
            "proposal) or a normalized target; give an autoregressive proposal explicitly"
        )
    return local_product()


def check_proposal(target: Density, proposal: Density) -> Density:
    """Raise unless ``proposal`` is autoregressive and shares ``target``'s vocabulary and EOS."""
    if not proposal.normalized:
        raise ValueError(
            "proposal must be a normalized (autoregressive) density such as a Policy, an "
            "ArithmeticMixture or a LocalProduct; for a GeometricMixture use .local_product()"
        )
    check_compatible([target, proposal], "target and proposal")
    return proposal


def effective_sample_size(log_weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``(Σ w)² / Σ w²`` along ``dim`` from log-weights (``-inf`` allowed; 0 when all are ``-inf``).

    The absolute ESS; divide by the number of weights for its fraction (1 for equal weights).
    """
    ess = torch.exp(2 * torch.logsumexp(log_weights, dim) - torch.logsumexp(2 * log_weights, dim))
    return torch.nan_to_num(ess, nan=0.0)


def ess_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """:func:`effective_sample_size` over the last axis divided by its length (float64)."""
    return effective_sample_size(log_weights.double()) / log_weights.shape[-1]


def log_weights_by_prompt(
    log_target: torch.Tensor, log_q: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """``[P, n]`` float64 log-weights ``log G̃ − log q`` on the CPU, one row per prompt, of
    draws made ``n = num_samples`` per prompt (rows grouped by prompt, as every sampler
    returns them): what the ESS, ``log Ẑ`` and KL estimates of a sampler with a density read."""
    return (log_target - log_q).double().view(-1, num_samples).cpu()


def logmeanexp(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log mean exp`` along ``dim`` (``-inf`` when every entry is ``-inf``)."""
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def is_local_product_of(proposal: Density, target: Density) -> bool:
    """True when ``proposal`` is the token-level product of ``target``'s components and weights."""
    if not isinstance(proposal, LocalProduct) or isinstance(target, LocalProduct):
        return False
    components = getattr(target, "components", None)
    return (
        components is not None
        and len(components) == len(proposal.components)
        and all(a is b for a, b in zip(components, proposal.components, strict=True))
        and list(target.weights) == list(proposal.weights)
    )


def applicable_weightings(proposal: Density, target: Density) -> list[str]:
    """The weightings SMC can use for ``proposal`` and ``target``, cheapest first."""
    if proposal is target:
        return ["exact", "general"]
    if is_local_product_of(proposal, target):
        return ["local_product", "general"]
    if is_residual_on_local_product_of(proposal, target):
        return ["components", "general"]
    return ["general"]


def is_residual_on_local_product_of(proposal: Density, target: Density) -> bool:
    """True when ``proposal`` is a residual on ``target``'s local product (``proposal.local``).

    Such a proposal's decode states carry the states of the target's components (in the
    target's order, field ``components``), so SMC reads the target's step scores from them
    instead of running the components a second time.
    """
    local = getattr(proposal, "local", None)
    return isinstance(local, LocalProduct) and is_local_product_of(local, target)
