"""The one sampler interface: ``sample(prompts, num_samples=1, *, generator=None) -> Samples``.

Alignment code (and the α-SPIN trainer) depends only on this. A sampler draws responses for
each prompt from a target density, says how exact it is (``log_q`` where it has a density,
ESS and a log-normalizer estimate where it weights), and counts the model tokens it spent.

For sampler authors: :meth:`Sampler.sample` checks and encodes the prompts, resolves the
generator, times the call, counts model tokens, scores the draws under the target and builds
the :class:`Samples`; a sampler implements :meth:`Sampler.draw` only (docs/samplers.md).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gfn_spin.density import Density, PromptLike
from gfn_spin.devices import resolve_generator
from gfn_spin.samples import Samples, SampleStats, check_context, check_count, check_sampling
from samplers.weighting import (
    check_proposal,
    default_proposal,
    effective_sample_size,
    ess_fraction,
    log_weights_by_prompt,
    logmeanexp,
    model_tokens,
)


@dataclass
class Draws:
    """What :meth:`Sampler.draw` returns: ``num_samples`` draws per prompt, grouped by prompt.

    Attributes:
        response_ids: ``[N, L]`` response tokens, padded past ``lengths``.
        lengths: ``[N]`` response lengths.
        log_q: ``[N]`` the sampler's exact log-density of each draw, or None.
        log_target: ``[N]`` the target's unnormalized log-density when the sampler computed it
            on the way (None: :meth:`Sampler.sample` scores the draws when there is a target).
        stats: :class:`SampleStats` fields the sampler estimated (``ess``, ``log_z``, ...).
    """

    response_ids: torch.Tensor
    lengths: torch.Tensor
    log_q: torch.Tensor | None = None
    log_target: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class Sampler(ABC):
    """Draws responses of length ≤ ``max_new_tokens`` for prompts (strings or token-id lists).

    Token-id prompts are used exactly as given (no special tokens added).
    """

    #: The density samples are meant to follow (None for a plain model sampler without target).
    target: Density | None = None
    max_new_tokens: int

    @property
    @abstractmethod
    def model(self) -> Density:
        """The density that encodes prompts and decodes responses, and whose device the
        sampler's generator lives on."""

    def cost_densities(self) -> Sequence[Density]:
        """The densities whose model passes :meth:`draw` pays for (``stats.tokens``)."""
        return [self.model]

    def tokens_evaluated(self) -> int:
        """Model tokens evaluated so far by :meth:`cost_densities` (no policy counted twice)."""
        return model_tokens(*self.cost_densities())

    @property
    def generator_device(self) -> torch.device:
        """Where the sampler's random draws are made."""
        return self.model.device

    @abstractmethod
    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        """``num_samples`` draws for each checked, encoded prompt (rows grouped by prompt)."""

    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        *,
        generator: torch.Generator | int | None = None,
    ) -> Samples:
        """``num_samples`` draws per prompt; rows grouped by prompt, in prompt order.

        Raises before any model work on an empty prompt list, an empty prompt, a bad count, or
        prompts too long for ``max_new_tokens`` more tokens in the model's context.
        """
        check_count("num_samples", num_samples)
        prompt_ids = encode_checked(self.model, prompts, self.max_new_tokens)
        started, tokens_before = time.perf_counter(), self.tokens_evaluated()
        generator = resolve_generator(generator, self.generator_device)
        with torch.no_grad():
            draws = self.draw(prompt_ids, num_samples, generator)
        tokens = self.tokens_evaluated() - tokens_before
        log_target = draws.log_target
        if log_target is None and self.target is not None:
            rows = [ids for ids in prompt_ids for _ in range(num_samples)]
            with torch.no_grad():
                log_target = self.target.log_prob(rows, draws.response_ids, draws.lengths)
        stats = dict(draws.stats)
        if draws.log_q is not None and log_target is not None:
            for name, value in importance_stats(log_target, draws.log_q, num_samples).items():
                stats.setdefault(name, value)
        device = draws.response_ids.device
        return Samples(
            prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(
                num_samples
            ),
            response_ids=draws.response_ids,
            lengths=draws.lengths,
            texts=self.model.decode(draws.response_ids, draws.lengths),
            log_q=draws.log_q,
            log_target=log_target,
            stats=SampleStats(tokens=tokens, seconds=time.perf_counter() - started, **stats),
        )


class ProposalSampler(Sampler):
    """A sampler that weights draws of a normalized ``proposal`` toward ``target`` (SIR, SMC).

    Prompts are encoded by the target, draws are made on the proposal's device, and the
    forwards of both count as the sampler's cost. ``proposal=None`` uses the target's local
    product (or the target itself when it is normalized).
    """

    def __init__(self, target: Density, proposal: Density | None) -> None:
        self.target = target
        self.proposal = check_proposal(
            target, default_proposal(target) if proposal is None else proposal
        )

    @property
    def model(self) -> Density:
        return self.target

    @property
    def generator_device(self) -> torch.device:
        return self.proposal.device

    def cost_densities(self) -> Sequence[Density]:
        return [self.target, self.proposal]


def importance_stats(
    log_target: torch.Tensor, log_q: torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """Per-prompt diagnostics of draws with an exact ``log_q``, from ``log w = log G̃ − log q``.

    Returns ``[P]`` float64 tensors on the CPU: "ess" (absolute, over the prompt's
    ``num_samples`` draws), "ess_fraction" (``ess / num_samples``), "log_z" (``logmeanexp(log
    w)``, a lower bound on ``log Z`` in expectation) and "elbo" (``mean(log w)``).
    """
    log_w = log_weights_by_prompt(log_target, log_q, num_samples)
    return {
        "ess": effective_sample_size(log_w),
        "ess_fraction": ess_fraction(log_w),
        "log_z": logmeanexp(log_w),
        "elbo": log_w.mean(1),
    }


def encode_checked(
    density: Density, prompts: Sequence[PromptLike], max_new_tokens: int
) -> list[list[int]]:
    """``prompts`` as token ids, refused before any model work when the list is empty or a bare
    string, a prompt is empty, or a prompt is too long for ``max_new_tokens`` more tokens in
    ``density``'s context.

    The one check every sampler's ``sample`` (and a GFlowNet's ``fit``) runs first.
    """
    check_prompts(prompts)
    prompt_ids = density.encode_prompts(prompts)
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    check_context(density, prompt_ids, max_new_tokens)
    return prompt_ids


def check_prompts(prompts: Sequence[PromptLike]) -> None:
    """Raise before any model work when ``prompts`` is empty or a bare string."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a str")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")


__all__ = [
    "Draws",
    "ProposalSampler",
    "Sampler",
    "SampleStats",
    "Samples",
    "check_count",
    "check_prompts",
    "check_sampling",
    "encode_checked",
    "importance_stats",
]
