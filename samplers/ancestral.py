"""Exact samplers for autoregressive models: a policy, an arithmetic mixture, a local product."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture
from gfn_spin.samples import ancestral_sample, check_count, check_sampling
from samplers.base import Draws, Sampler


class AncestralSampler(Sampler):
    """Plain ancestral sampling from an autoregressive ``model``; ``log_q`` is exact.

    Use it for any normalized density (a policy, an arithmetic mixture, a local product, a
    trained GFlowNet policy). Cost: one model token per component per generated token.
    ``target`` (optional) adds the target's log-density to each draw, and per-prompt ESS and
    ``log Ẑ`` of the weights G̃/q to ``stats``, for diagnostics (that scoring pass is not
    counted in ``stats.tokens``).
    """

    def __init__(
        self,
        model: Density,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        target: Density | None = None,
    ) -> None:
        if not model.normalized:
            raise ValueError(
                "AncestralSampler needs a normalized (autoregressive) model; for a "
                "GeometricMixture use ImportanceResampler, SMCSampler or GFlowNetSampler"
            )
        self._model = model
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        check_sampling(temperature, top_p)
        self.temperature = temperature
        self.top_p = top_p
        self.target = target

    @property
    def model(self) -> Density:
        return self._model

    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        samples = ancestral_sample(
            self.model,
            prompt_ids,
            num_samples,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            generator=generator,
        )
        return Draws(samples.response_ids, samples.lengths, log_q=samples.log_q)


class ArithmeticMixtureSampler(AncestralSampler):
    """Exact samples from ``Σ_c w_c π_c`` with exact ``log_q`` (the mixture's own density).

    Samples token by token from the posterior-weighted conditional (docs/mixtures.md), so one draw
    costs one model token per component per generated token.
    """

    def __init__(
        self,
        components: Sequence[Density],
        weights: Sequence[float] | torch.Tensor,
        *,
        max_new_tokens: int,
        **kwargs,
    ) -> None:
        super().__init__(
            ArithmeticMixture(components, weights), max_new_tokens=max_new_tokens, **kwargs
        )
