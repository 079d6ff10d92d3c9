"""The sampler that draws the generated responses y' of an α-SPIN iteration.

A normalized reference (α = 1, or π_0 at t = 0) is always sampled exactly; a geometric-mixture
reference by the configured sampler (docs/samplers.md compares them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture
from gfn_spin.policy import Policy
from samplers.ancestral import AncestralSampler, ArithmeticMixtureSampler
from samplers.base import Sampler
from samplers.gflownet import GFlowNetSampler
from samplers.importance import ImportanceResampler
from samplers.smc import SMCSampler
from selfplay.config import AlphaSpinConfig, derive_seed
from selfplay.reference import history_mixture


def opponent_sampler(
    config: AlphaSpinConfig,
    reference: Density,
    iterates: Sequence[Policy],
    *,
    max_new_tokens: int,
    iteration: int,
    fit_prompts: Sequence[Sequence[int]] = (),
) -> Sampler:
    """The sampler drawing y' for iteration t (``iterates = [π_0, ..., π_t]``).

    "ancestral" draws from π_t (reference log-probs still come from π_ref), "importance"
    resamples K proposals (M_h, the local product or π_t), "smc" runs N particles from the
    local product, "gflownet" fits a GFlowNet on ``fit_prompts`` first.
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
    if kind == "gflownet":
        gflownet = GFlowNetSampler(
            reference,
            iterates[-1],  # a LoRA iterate carries the GFlowNet's adapter stacked on its own
            config=dataclasses.replace(
                config.gflownet,
                max_new_tokens=max_new_tokens,
                adapter_name=f"gflownet_{iteration}",
                seed=derive_seed(config.seed, "gflownet", iteration),
            ),
        )
        gflownet.fit(list(fit_prompts), progress=False)
        return gflownet
    raise ValueError(f"sampler={kind!r} cannot sample a geometric-mixture reference")
