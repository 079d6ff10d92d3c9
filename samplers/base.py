"""The one sampler interface: ``sample(prompts, num_samples=1, *, generator=None) -> Samples``.

Alignment code (and the α-SPIN trainer) depends only on this. A sampler draws responses for
each prompt from a target density, says how exact it is (``log_q`` where it has a density,
ESS and a log-normalizer estimate where it weights), and counts the model tokens it spent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from gfn_spin.density import Density, PromptLike
from gfn_spin.samples import Samples, check_context, check_count, check_sampling


class Sampler(ABC):
    """Draws responses of length ≤ ``max_new_tokens`` for prompts (strings or token-id lists).

    Token-id prompts are used exactly as given (no special tokens added).
    """

    #: The density samples are meant to follow (None for a plain model sampler without target).
    target: Density | None = None
    max_new_tokens: int

    @abstractmethod
    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        *,
        generator: torch.Generator | int | None = None,
    ) -> Samples:
        """``num_samples`` draws per prompt; rows grouped by prompt, in prompt order."""

    def _score_target(self, prompt_ids: list[list[int]], samples: Samples) -> torch.Tensor | None:
        """Unnormalized target log-density of each draw (None without a target)."""
        if self.target is None:
            return None
        rows = [prompt_ids[i] for i in samples.prompt_index.tolist()]
        with torch.no_grad():
            return self.target.log_prob(rows, samples.response_ids, samples.lengths)


def encode_within_context(
    density: Density, prompts: Sequence[PromptLike], max_new_tokens: int
) -> list[list[int]]:
    """``prompts`` as token ids, refused before any model work when they are empty, a bare
    string, or too long for ``max_new_tokens`` more tokens in ``density``'s context.

    The one check every sampler's ``sample`` (and a GFlowNet's ``fit``) runs first.
    """
    check_prompts(prompts)
    prompt_ids = density.encode_prompts(prompts)
    check_context(density, prompt_ids, max_new_tokens)
    return prompt_ids


def check_prompts(prompts: Sequence[PromptLike]) -> None:
    """Raise before any model work when ``prompts`` is empty or a bare string."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a str")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")


__all__ = [
    "Sampler",
    "Samples",
    "check_context",
    "check_count",
    "check_prompts",
    "check_sampling",
    "encode_within_context",
]
