"""Arithmetic and geometric mixtures of densities, and the local (token-level) product.

The math, and what is exact and what is not: docs/mixtures.md.

- :class:`ArithmeticMixture` ``M = Σ_c w_c π_c``: normalized and autoregressive, with the exact
  next-token conditional ``M(v|s_k) = Σ_c ω_c(s_k) π_c(v|s_k)``, ``ω_c ∝ w_c π_c(y_{1:k}|x)``.
- :class:`GeometricMixture` ``G̃ = Π_c π_c^{w_c}``: unnormalized (its normalizer is the
  intractable quantity samplers estimate); scores and step scores are exact.
- :class:`LocalProduct` ``q_loc(v|s) ∝ Π_c π_c(v|s)^{w_c}``: normalized per step; a cheap
  autoregressive proposal for the geometric mixture, not the geometric mixture itself.

Every mixture scores responses from one teacher-forced pass per component, and components may
themselves be mixtures (a geometric mixture of a base policy and an arithmetic history mixture
is the α-SPIN reference).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gfn_spin.density import (
    DecodeState,
    Density,
    PromptLike,
    check_compatible,
    scores_from_steps,
    unique_policies,
)
from gfn_spin.scores import TokenScores, combine_scores, weighted_logsum


def _as_weights(weights: Sequence[float] | torch.Tensor, count: int) -> list[float]:
    values = [float(w) for w in (weights.tolist() if torch.is_tensor(weights) else weights)]
    if len(values) != count:
        raise ValueError(f"weights has {len(values)} entries for {count} components")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"weights must be finite numbers, got {values}")
    return values


class _Composite(Density):
    """Shared plumbing: components, tokenizer, device and token count come from the components."""

    def __init__(self, components: Sequence[Density], weights: Sequence[float] | torch.Tensor):
        components = list(components)
        check_compatible(components)
        self.components = components
        self.weights = _as_weights(weights, len(components))

    @property
    def tokenizer(self) -> Any:
        return self.components[0].tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.components[0].eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.components[0].vocab_size

    @property
    def device(self) -> torch.device:
        return self.components[0].device

    @property
    def tokens_evaluated(self) -> int:
        return sum(p.tokens_evaluated for p in unique_policies(self.components))

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        return self.components[0].encode_prompts(prompts)


# -- arithmetic mixture -----------------------------------------------------------------------


@dataclass
class ArithmeticState:
    """Component states plus each component's log-probability of the prefix so far ``[B, C]``."""

    components: list[DecodeState]
    log_posterior_unnorm: torch.Tensor
    next_logprobs: torch.Tensor

    def select(self, index: torch.Tensor) -> ArithmeticState:
        return ArithmeticState(
            [s.select(index) for s in self.components],
            self.log_posterior_unnorm[index],
            self.next_logprobs[index],
        )


class ArithmeticMixture(_Composite):
    """``M = Σ_c w_c π_c`` over normalized components; weights on the simplex."""

    normalized = True

    def __init__(self, components: Sequence[Density], weights: Sequence[float] | torch.Tensor):
        super().__init__(components, weights)
        if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(
                f"weights={self.weights} must be non-negative and sum to 1 for an arithmetic "
                "mixture; divide by their sum"
            )
        if not all(c.normalized for c in self.components):
            raise ValueError(
                "components of an ArithmeticMixture must be normalized densities (policies, "
                "arithmetic mixtures, local products), not unnormalized geometric mixtures"
            )
        self._log_weights = torch.tensor(self.weights).log()

    def _mix(self, log_posterior_unnorm: torch.Tensor, per_component: torch.Tensor) -> torch.Tensor:
        """``logsumexp_c ω_c + x_c`` for ``per_component [C, ...]`` and ``log ω`` ``[C, ...]``."""
        # A prefix that no weighted component can produce (its mass is already 0) has no
        # posterior (softmax of all -inf is NaN): use the prior weights, so steps stay normalized.
        dead = torch.isneginf(log_posterior_unnorm).all(dim=0, keepdim=True)
        if bool(dead.any()):
            shape = (-1,) + (1,) * (log_posterior_unnorm.dim() - 1)
            prior = self._log_weights.to(log_posterior_unnorm.device, log_posterior_unnorm.dtype)
            log_posterior_unnorm = torch.where(dead, prior.view(shape), log_posterior_unnorm)
        log_omega = torch.log_softmax(log_posterior_unnorm, dim=0)
        return torch.logsumexp(log_omega + per_component, dim=0)

    def _prefix_log_weights(self, prefix_logprobs: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (prefix_logprobs.dim() - 1)
        return self._log_weights.to(prefix_logprobs.device).view(shape) + prefix_logprobs

    def step_logprobs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        prompts = self.encode_prompts(prompts)
        steps = torch.stack(
            [c.step_logprobs(prompts, response_ids, lengths) for c in self.components]
        )
        prefix = torch.stack(
            [
                scores_from_steps(
                    s, response_ids.to(s.device), lengths.to(s.device), self.eos_token_id
                ).prefix_logprobs()
                for s in steps
            ]
        )
        return self._mix(self._prefix_log_weights(prefix)[..., None], steps)

    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        prompts = self.encode_prompts(prompts)
        scores = [c.score(prompts, response_ids, lengths) for c in self.components]
        log_post = self._prefix_log_weights(torch.stack([s.prefix_logprobs() for s in scores]))
        tokens = self._mix(log_post[..., :-1], torch.stack([s.token_logprobs for s in scores]))
        eos = self._mix(log_post, torch.stack([s.eos_logprobs for s in scores]))
        return TokenScores(tokens, eos, scores[0].lengths)

    def start(self, prompt_ids: Sequence[Sequence[int]]) -> ArithmeticState:
        states = [c.start(prompt_ids) for c in self.components]
        log_post = self._log_weights.to(states[0].next_logprobs.device)[None, :].expand(
            len(prompt_ids), -1
        )
        return self._state(states, log_post.clone())

    def _state(self, states: list[DecodeState], log_post: torch.Tensor) -> ArithmeticState:
        per_component = torch.stack([s.next_logprobs for s in states], dim=1)  # [B, C, V]
        next_logprobs = self._mix(log_post.T[..., None], per_component.transpose(0, 1))
        return ArithmeticState(states, log_post, next_logprobs)

    def advance(self, state: ArithmeticState, tokens: torch.Tensor) -> ArithmeticState:
        tokens = tokens.to(state.next_logprobs.device)
        step = torch.stack(
            [s.next_logprobs.gather(1, tokens[:, None]).squeeze(1) for s in state.components], dim=1
        )
        states = [
            c.advance(s, tokens) for c, s in zip(self.components, state.components, strict=True)
        ]
        return self._state(states, state.log_posterior_unnorm + step)


# -- geometric mixture and local product ------------------------------------------------------


@dataclass
class ProductState:
    """Component states; ``next_logprobs`` are the weighted sums (normalized for the local product)."""

    components: list[DecodeState]
    next_logprobs: torch.Tensor
    log_z_local: torch.Tensor

    def select(self, index: torch.Tensor) -> ProductState:
        return ProductState(
            [s.select(index) for s in self.components],
            self.next_logprobs[index],
            self.log_z_local[index],
        )


class GeometricMixture(_Composite):
    """Unnormalized ``G̃(y) = Π_c π_c(y)^{w_c}`` (any real weights; typically ``[1-α, α]``).

    Step scores ``Σ_c w_c log π_c(v|s)`` multiply to ``G̃`` along a response, so the same
    prefix-tree and SMC machinery as for autoregressive models applies; they are not normalized.
    """

    normalized = False

    def __init__(self, components: Sequence[Density], weights: Sequence[float] | torch.Tensor):
        super().__init__(components, weights)
        if not all(c.normalized for c in self.components):
            raise ValueError("components of a GeometricMixture must be normalized densities")

    def local_product(self) -> LocalProduct:
        """The token-level product with the same components and weights (an SMC/SIR proposal)."""
        return LocalProduct(self.components, self.weights)

    def _combine_steps(self, steps: Sequence[torch.Tensor]) -> torch.Tensor:
        return weighted_logsum(steps, self.weights)

    def step_logprobs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        prompts = self.encode_prompts(prompts)
        return self._combine_steps(
            [c.step_logprobs(prompts, response_ids, lengths) for c in self.components]
        )

    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        prompts = self.encode_prompts(prompts)
        return combine_scores(
            [c.score(prompts, response_ids, lengths) for c in self.components], self.weights
        )

    def _state(self, states: list[DecodeState]) -> ProductState:
        combined = self._combine_steps([s.next_logprobs for s in states])
        return ProductState(states, combined, torch.logsumexp(combined, dim=-1))

    def start(self, prompt_ids: Sequence[Sequence[int]]) -> ProductState:
        return self._state([c.start(prompt_ids) for c in self.components])

    def advance(self, state: ProductState, tokens: torch.Tensor) -> ProductState:
        return self._state(
            [c.advance(s, tokens) for c, s in zip(self.components, state.components, strict=True)]
        )


class LocalProduct(GeometricMixture):
    """``q_loc(v|s) ∝ Π_c π_c(v|s)^{w_c}``, normalized at every step (autoregressive).

    Exact identity used by SMC: ``G̃(y) / q_loc(y) = Π_{k=0..n} Z_loc(s_k)`` with
    ``Z_loc(s_L) = 1`` at the forced stop; ``state.log_z_local`` holds ``log Z_loc(s_k)``.
    """

    normalized = True

    def _combine_steps(self, steps: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.log_softmax(super()._combine_steps(steps), dim=-1)

    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        steps = self.step_logprobs(prompts, response_ids, lengths)
        return scores_from_steps(
            steps, response_ids.to(steps.device), lengths.to(steps.device), self.eos_token_id
        )

    def _state(self, states: list[DecodeState]) -> ProductState:
        combined = weighted_logsum([s.next_logprobs for s in states], self.weights)
        log_z = torch.logsumexp(combined, dim=-1)
        return ProductState(states, combined - log_z[:, None], log_z)
