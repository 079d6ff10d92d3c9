"""A local product with a learned residual: the second GFlowNet policy parametrization (docs/gflownet.md).

    q(v|s) ∝ q_loc(v|s) · π_adapter(v|s) / π_init(v|s)

where ``q_loc`` is the token-level product of the target's components, ``π_init`` a policy and
``π_adapter`` the same weights read through a trainable LoRA adapter. The adapter starts at
zero, so ``q`` starts exactly at ``q_loc`` (often much closer to a geometric mixture than any
single policy), and the LoRA only has to learn the correction ``log G̃/q_loc`` carries in the
future-normalizer terms. Sampling costs one pass per component plus one for the adapter (the
init policy's pass is shared when it is itself a component).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gfn_spin.density import DecodeState, Density, PromptLike, scores_from_steps
from gfn_spin.mixtures import LocalProduct
from gfn_spin.policy import Policy
from gfn_spin.scores import TokenScores, weighted_logsum


@dataclass
class ResidualState:
    """Component states, the adapter's state, and the init policy's state (None: shared)."""

    components: list[DecodeState]
    adapter: DecodeState
    init: DecodeState | None
    next_logprobs: torch.Tensor

    def select(self, index: torch.Tensor) -> ResidualState:
        return ResidualState(
            [s.select(index) for s in self.components],
            self.adapter.select(index),
            None if self.init is None else self.init.select(index),
            self.next_logprobs[index],
        )


class ResidualLocalProduct(Density):
    """``q(v|s) ∝ q_loc(v|s) · π_adapter(v|s) / π_init(v|s)``, normalized per step.

    Args:
        local: the local product of the target's components and weights.
        adapter: the trainable policy (``init`` read through a LoRA adapter).
        init: the policy the adapter sits on (read through the base weights).
    """

    normalized = True

    def __init__(self, local: LocalProduct, adapter: Policy, init: Policy) -> None:
        self.local = local
        self.adapter = adapter
        self.init = init
        # When the init policy is one of the components, its pass is reused, not repeated.
        self._init_index = next((i for i, c in enumerate(local.components) if c is init), None)
        # Leaves for token counting and the response vocabulary (see density.unique_policies).
        self.components = [*local.components, adapter, init]

    # -- plumbing ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.adapter.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def tokens_evaluated(self) -> int:
        leaves = {id(p): p for p in [*self.local.components, self.adapter, self.init]}
        return sum(p.tokens_evaluated for p in leaves.values())

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        return self.adapter.encode_prompts(prompts)

    # -- the density -----------------------------------------------------------------------

    def _combine(
        self, component_steps: Sequence[torch.Tensor], adapter_steps: torch.Tensor, init_steps
    ) -> torch.Tensor:
        local = weighted_logsum(component_steps, self.local.weights)
        # Tokens both policies forbid (-inf - -inf) carry no correction; q_loc forbids them.
        finite = torch.isfinite(adapter_steps) & torch.isfinite(init_steps)
        correction = torch.where(finite, adapter_steps - init_steps, 0.0)
        return torch.log_softmax(local + correction, dim=-1)

    def step_logprobs(
        self,
        prompts: Sequence[PromptLike],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        *,
        component_steps: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Step scores ``[B, L+1, V]``; gradients flow through the adapter only.

        ``component_steps``: the components' step scores when the caller already has them
        (the GFlowNet training step scores the target with the same passes).
        """
        prompts = self.encode_prompts(prompts)
        with torch.no_grad():
            if component_steps is None:
                component_steps = [
                    c.step_logprobs(prompts, response_ids, lengths) for c in self.local.components
                ]
            if self._init_index is None:
                init_steps = self.init.step_logprobs(prompts, response_ids, lengths)
            else:
                init_steps = component_steps[self._init_index]
        adapter_steps = self.adapter.step_logprobs(prompts, response_ids, lengths)
        return self._combine(component_steps, adapter_steps, init_steps)

    def score(
        self,
        prompts: Sequence[PromptLike],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        *,
        component_steps: Sequence[torch.Tensor] | None = None,
    ) -> TokenScores:
        steps = self.step_logprobs(prompts, response_ids, lengths, component_steps=component_steps)
        return scores_from_steps(
            steps, response_ids.to(steps.device), lengths.to(steps.device), self.eos_token_id
        )

    def _state(self, components, adapter, init) -> ResidualState:
        init_steps = (
            components[self._init_index].next_logprobs if init is None else init.next_logprobs
        )
        steps = self._combine(
            [s.next_logprobs for s in components], adapter.next_logprobs, init_steps
        )
        return ResidualState(components, adapter, init, steps)

    def start(self, prompt_ids: Sequence[Sequence[int]]) -> ResidualState:
        components = [c.start(prompt_ids) for c in self.local.components]
        init = None if self._init_index is not None else self.init.start(prompt_ids)
        return self._state(components, self.adapter.start(prompt_ids), init)

    def advance(self, state: ResidualState, tokens: torch.Tensor) -> ResidualState:
        components = [
            c.advance(s, tokens)
            for c, s in zip(self.local.components, state.components, strict=True)
        ]
        init = None if state.init is None else self.init.advance(state.init, tokens)
        return self._state(components, self.adapter.advance(state.adapter, tokens), init)
