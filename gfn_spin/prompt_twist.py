"""A twist that reads the whole prompt: attention from each state over the prompt's hidden states.

For the GFlowNet's ``"prompt_twist"`` form (docs/gflownet.md, section 2). The twisted local
product ``q(v|s) ∝ q_loc(v|s) · exp(h_v(s))`` of :mod:`gfn_spin.twisted_local_product` reads
only the components' last hidden states at ``s``, which carry what the *next* token needs.
The optimal twist ``log ψ(s·v)`` is about the future: on an echo-like task it depends on prompt
tokens the current step does not need, and a head that cannot see them fits each prompt's
quirks instead of a rule, which does not transfer to new prompts. Here the head also attends
from the state's features over every component's last hidden state at every prompt token, kept
from the prefill (no extra model pass), tagged with the token's distance from the prompt's end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from gfn_spin.density import PromptLike
from gfn_spin.policy import PolicyState
from gfn_spin.twisted_local_product import (
    ComponentOutputs,
    TwistedLocalProduct,
    TwistHead,
    TwistState,
    at_valid_states,
    head_inputs,
)

#: Prompt tokens further than this from the prompt's end share one position tag.
MAX_PROMPT_DISTANCE = 64


class PromptAttentionTwistHead(nn.Module):
    """``([N, F], [N, P, F], [N, P] bool) -> [N, V]``: the log-twist of every next token from a
    state's features and its prompt's features (``mask`` True at prompt tokens, False at padding).

    Multi-head attention (query: the state; keys and values: the prompt tokens, keys plus a
    learned tag of the distance from the prompt's end) gives a context of ``attention`` values,
    and a :class:`TwistHead` MLP maps ``[features, context]`` to the log-twist; its zero last
    layer makes the density start at the local product.

    Args:
        in_features: F, the components' hidden sizes summed.
        vocab_size: V.
        width, depth: the MLP's hidden width and layers.
        attention: width of the attention's queries, keys and values (a multiple of ``heads``).
        heads: attention heads.
    """

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        width: int = 256,
        depth: int = 2,
        attention: int = 64,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if attention < 1 or heads < 1 or attention % heads:
            raise ValueError(f"attention={attention} must be a positive multiple of heads={heads}")
        self.heads = heads
        self.query = nn.Linear(in_features, attention)
        self.key = nn.Linear(in_features, attention)
        self.value = nn.Linear(in_features, attention)
        self.distance = nn.Embedding(MAX_PROMPT_DISTANCE, attention)
        self.mlp = TwistHead(in_features + attention, vocab_size, width, depth)

    def forward(
        self, features: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        width = memory.shape[-2]
        # Prompts are left-padded, so they all end in the last column.
        distance = torch.arange(width - 1, -1, -1, device=memory.device)
        keys = self.key(memory) + self.distance(distance.clamp(max=MAX_PROMPT_DISTANCE - 1))
        keys = rearrange(keys, "n p (h d) -> n h p d", h=self.heads)
        values = rearrange(self.value(memory), "n p (h d) -> n h p d", h=self.heads)
        query = rearrange(self.query(features), "n (h d) -> n h d", h=self.heads)
        logits = torch.einsum("nhd,nhpd->nhp", query, keys) / math.sqrt(query.shape[-1])
        # A row without prompt tokens (never produced by a prompt) attends evenly, not to
        # nothing (a NaN softmax).
        mask = mask | ~mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        context = torch.einsum("nhp,nhpd->nhd", logits.softmax(-1), values)
        return self.mlp(torch.cat([features, rearrange(context, "n h d -> n (h d)")], dim=-1))


def prompt_memory(components: Sequence[PolicyState]) -> list[torch.Tensor]:
    """``[memory [B, P, F], mask [B, P]]`` from states started with ``features=True``: every
    component's last hidden states over the prompt, concatenated, zero at padding (whose hidden
    states are undefined), and the mask of prompt tokens (float, so it can be recorded)."""
    first = components[0]
    width = first.prompt_features.shape[1]
    mask = first.attention_mask[:, :width].float()
    memory = torch.cat([s.prompt_features for s in components], dim=-1)
    return [torch.where(mask[..., None] > 0, memory, 0.0), mask]


@dataclass
class PromptTwistState(TwistState):
    """A :class:`TwistState` whose outputs also carry the prompt memory (per row)."""

    def select(self, index: torch.Tensor) -> PromptTwistState:
        return PromptTwistState(
            [s.select(index) for s in self.components], self.next_logprobs[index]
        )

    def component_outputs(self) -> list[torch.Tensor]:
        """The twist state's outputs, then the prompt memory and its mask."""
        return super().component_outputs() + prompt_memory(self.components)


class PromptTwistedLocalProduct(TwistedLocalProduct):
    """``q(v|s) ∝ q_loc(v|s) · exp(head(features(s), prompt features)_v)``, normalized per step.

    Its features list is every component's state features, then the prompt memory ``[B, P, F]``
    and mask ``[B, P]`` of :func:`prompt_memory`, one per row (not per state).
    """

    def _twist(self, hidden: Sequence[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        count = len(self.components)
        device = next(self.head.parameters()).device
        inputs = head_inputs(hidden[:count]).to(device)
        memory, mask = hidden[count].to(device), hidden[count + 1].to(device) > 0
        if inputs.dim() == 2:  # decoding: one state per row
            return self.head(inputs, memory, mask)
        # [B, L+1, F]: the head runs on the valid states only (padding keeps q_loc)
        if valid is None:
            valid = torch.ones(inputs.shape[:2], dtype=torch.bool, device=device)
        valid = valid.to(device)
        rows = valid.nonzero()[:, 0]
        return at_valid_states(self.head(inputs[valid], memory[rows], mask[rows]), valid)

    def component_outputs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> ComponentOutputs:
        """Teacher-forced outputs (replayed responses) plus the prompt memory, from one more
        prefill of the prompts per component (counted in the components' tokens)."""
        steps, features = super().component_outputs(prompts, response_ids, lengths)
        with torch.no_grad():
            memory = prompt_memory([c.start(prompts, features=True) for c in self.components])
        return steps, list(features) + memory

    def _state(self, components: list[PolicyState]) -> PromptTwistState:
        state = PromptTwistState(components, None)
        outputs = state.component_outputs()
        count = len(components)
        state.next_logprobs = self._combine(outputs[:count], outputs[count:])
        return state
