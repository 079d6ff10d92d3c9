"""Token scores: the one tensor convention for per-token log-densities.

The convention, its padding and its -inf rules: docs/conventions.md.

For a batch of B responses with length cap L:

- ``token_logprobs[b, k] = log π(y_{k+1} | s_k)`` for k = 0..L-1, 0 past ``lengths[b]``;
- ``eos_logprobs[b, k] = log π(⊤ | s_k)`` for k = 0..L, 0 past ``lengths[b]`` and at k = L
  (the stop at the cap is forced);
- ``lengths[b] = n``.

Every density in the toolkit (a policy, a mixture, a trained GFlowNet) returns its scores in
this form, so losses, samplers and divergences never need to know where scores came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """Per-token log-densities of a batch of responses (shapes ``[B, L]``, ``[B, L+1]``, ``[B]``)."""

    token_logprobs: torch.Tensor
    eos_logprobs: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_new_tokens(self) -> int:
        return self.token_logprobs.shape[1]

    def sequence_logprob(self) -> torch.Tensor:
        """``log π(y|x)`` of each complete response, ``[B]``."""
        eos_at_end = self.eos_logprobs.gather(1, self.lengths[:, None]).squeeze(1)
        return self.token_logprobs.sum(1) + eos_at_end

    def prefix_logprobs(self) -> torch.Tensor:
        """``log π(y_{1:k}|x)`` (no stop), ``[B, L+1]``; column 0 is 0, constant past n."""
        zero = self.token_logprobs.new_zeros(self.token_logprobs.shape[0], 1)
        return torch.cat([zero, self.token_logprobs.cumsum(1)], dim=1)

    def prefix_terminal_logprobs(self) -> torch.Tensor:
        """``log π(y_{1:k}⊤|x)`` for k = 0..L, ``[B, L+1]``; -inf past n (no such prefix)."""
        terminal = self.prefix_logprobs() + self.eos_logprobs
        exists = position_mask(self.lengths + 1, terminal.shape[1])  # prefixes k = 0..n
        return terminal.masked_fill(~exists, float("-inf"))

    def to(self, device: torch.device | str) -> TokenScores:
        return TokenScores(
            self.token_logprobs.to(device), self.eos_logprobs.to(device), self.lengths.to(device)
        )


def weighted_logsum(
    logprobs: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """``Σ_c w_c · logprobs[c]`` with ``0 · (-inf) = 0``, and -inf wherever a weighted component
    gives -inf.

    A component with weight 0 must not contribute, even where it gives -inf (a token it
    forbids); plain multiplication would turn that into NaN. A token that a component with a
    nonzero weight forbids stays forbidden whatever the weight's sign: the product's support is
    the intersection of the weighted components' supports (with a negative weight, plain
    arithmetic would give ``+inf + (-inf) = NaN``).
    """
    total = torch.zeros_like(logprobs[0])
    forbidden = torch.zeros_like(total, dtype=torch.bool)
    for logp, weight in zip(logprobs, weights, strict=True):
        weight = float(weight)
        if weight != 0.0:
            forbidden = forbidden | torch.isneginf(logp)
            total = total + weight * logp
    return total.masked_fill(forbidden, float("-inf"))


def combine_scores(
    scores: Sequence[TokenScores], weights: Sequence[float] | torch.Tensor
) -> TokenScores:
    """Geometric combination ``Σ_c w_c · scores_c`` (unnormalized log-densities)."""
    return TokenScores(
        weighted_logsum([s.token_logprobs for s in scores], weights),
        weighted_logsum([s.eos_logprobs for s in scores], weights),
        scores[0].lengths,
    )


def position_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean ``[B, width]`` mask of the positions ``k < lengths[b]``."""
    steps = torch.arange(width, device=lengths.device)
    return steps[None, :] < lengths[:, None]
