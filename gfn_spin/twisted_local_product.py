"""A local product with a learned twist: the GFlowNet parametrization that reads every component.

For a geometric mixture ``G̃(y) = Π_c π_c(y)^{w_c}`` the exact sampler is the local product
``q_loc`` reweighted by a twist (docs/gflownet.md):

    q*(v|s) ∝ q_loc(v|s) · ψ(s·v),

where ``ψ(s)`` is the expected product of the local normalizers ``Z_loc`` still to come from
``s`` (and ``ψ(s·⊤) = 1``). :class:`TwistedLocalProduct` learns ``log ψ(s·v)`` for every next
token v at once, with :class:`TwistHead`, a small MLP over what the components already computed
at ``s``: each component's last hidden state (the LM head's input). The head's
last layer starts at zero, so the density starts exactly at ``q_loc``. It needs no pass of its
own: sampling costs one pass per component per token, the same as ``q_loc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gfn_spin.density import Density, PromptLike, scores_from_steps
from gfn_spin.mixtures import LocalProduct
from gfn_spin.policy import Policy, PolicyState
from gfn_spin.scores import TokenScores, position_mask, weighted_logsum

ComponentOutputs = tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]


class TwistHead(nn.Module):
    """``[..., F] -> [..., V]`` log-twist of every next token, from per-state features.

    Args:
        in_features: total feature width (the components' hidden sizes).
        vocab_size: V.
        width: hidden width of the MLP.
        depth: number of hidden layers (≥ 1).
    """

    def __init__(self, in_features: int, vocab_size: int, width: int = 256, depth: int = 2):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"depth={depth} and width={width} must be >= 1")
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.GELU()]
            size = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(size, vocab_size)
        # Zero output layer: the twisted density starts exactly at the local product.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))


def head_inputs(hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """The head's input at each state: the components' last hidden states, concatenated (their
    next-token log-probs are a function of these, so they add nothing)."""
    return torch.cat([h.float() for h in hidden], dim=-1)


def at_valid_states(picked: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` values of the ``N`` True entries of ``valid`` placed in a zero tensor of
    shape ``[*valid.shape, V]``."""
    twist = picked.new_zeros((*valid.shape, picked.shape[-1]))
    return twist.index_put((valid,), picked)


@dataclass
class TwistState:
    """The components' decoding states (with features) and the twisted next-token log-probs."""

    components: list[PolicyState]
    next_logprobs: torch.Tensor

    def select(self, index: torch.Tensor) -> TwistState:
        return TwistState([s.select(index) for s in self.components], self.next_logprobs[index])

    def component_outputs(self) -> list[torch.Tensor]:
        """What the components computed here: every component's next-token log-probs, then
        every component's features (what a training step keeps from a rollout)."""
        return [s.next_logprobs for s in self.components] + [
            s.next_features for s in self.components
        ]


class TwistedLocalProduct(Density):
    """``q(v|s) ∝ q_loc(v|s) · exp(head(features(s))_v)``, normalized per step.

    Args:
        local: the local product of the target's components (each a :class:`Policy`).
        head: the twist head; gradients flow through it only (the components stay frozen).
    """

    normalized = True

    def __init__(self, local: LocalProduct, head: TwistHead) -> None:
        self.check_components(local)
        self.local = local
        self.head = head
        self.components: list[Policy] = list(local.components)

    @staticmethod
    def supports(components: Sequence[Density]) -> bool:
        """Whether every component has hidden states to read (is a :class:`Policy`)."""
        return all(isinstance(c, Policy) for c in components)

    @staticmethod
    def check_components(local: LocalProduct) -> None:
        """Refuse components without hidden states (anything but a :class:`Policy`)."""
        if not TwistedLocalProduct.supports(local.components):
            raise TypeError(
                "a twisted local product reads each component's hidden states: every "
                "component must be a gfn_spin.Policy (use parametrization='residual' or 'lora' "
                "for targets over mixtures)"
            )

    @staticmethod
    def in_features(local: LocalProduct) -> int:
        """Feature width a head for ``local`` takes."""
        TwistedLocalProduct.check_components(local)
        return sum(c.hidden_size for c in local.components)

    # -- plumbing ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.local.tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.local.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.local.vocab_size

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def tokens_evaluated(self) -> int:
        return self.local.tokens_evaluated

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        return self.local.encode_prompts(prompts)

    # -- the density -----------------------------------------------------------------------

    def _combine(
        self,
        steps: Sequence[torch.Tensor],
        hidden: Sequence[torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Twisted step log-probs; with ``valid`` (a mask over the leading dims) the head runs
        on those states only and the others keep the local product (padding: half the states
        of a batch of short responses)."""
        local = weighted_logsum(steps, self.local.weights)
        twist = self._twist(hidden, valid)
        # Tokens the local product forbids stay forbidden (-inf + finite).
        return torch.log_softmax(local + twist.to(local.device), dim=-1)

    def _twist(self, hidden: Sequence[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        """The head's log-twist at every state (zero at states outside ``valid``)."""
        inputs = head_inputs(hidden).to(next(self.head.parameters()).device)
        if valid is None:
            return self.head(inputs)
        valid = valid.to(inputs.device)
        return at_valid_states(self.head(inputs[valid]), valid)  # bf16 under autocast

    @property
    def steps_follow_features(self) -> bool:
        """Whether every component's step scores follow from its features alone."""
        return all(c.logits_follow_features for c in self.components)

    def component_steps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every component's step scores ``[B, L+1, V]`` from its features ``[B, L+1, H_c]``
        through its LM head (no gradients, no model pass)."""
        with torch.no_grad():
            return [
                c.logprobs_from_features(f) for c, f in zip(self.components, features, strict=True)
            ]

    def component_outputs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> ComponentOutputs:
        """Every component's step scores and features by teacher forcing (no gradients), for
        responses no rollout of this density produced (replayed ones)."""
        with torch.no_grad():
            pairs = [
                c.step_logprobs_and_features(prompts, response_ids, lengths)
                for c in self.components
            ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def step_logprobs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Step scores ``[B, L+1, V]``; gradients flow through the head only."""
        return self._combine(*self.component_outputs(prompts, response_ids, lengths))

    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        outputs = self.component_outputs(prompts, response_ids, lengths)
        return self.scores_from_outputs(outputs, response_ids, lengths)

    def scores_from_outputs(
        self, outputs: ComponentOutputs, response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        """Token scores from the components' stored outputs (no model pass)."""
        width = response_ids.shape[1]
        # steps k = 0..n of each response (the EOS step at k = n included)
        steps = self._combine(*outputs, valid=position_mask(lengths + 1, width + 1))
        return scores_from_steps(
            steps, response_ids.to(steps.device), lengths.to(steps.device), self.eos_token_id
        )

    def _state(self, components: list[PolicyState]) -> TwistState:
        steps = self._combine(
            [s.next_logprobs for s in components], [s.next_features for s in components]
        )
        return TwistState(components, steps)

    def start(self, prompt_ids: Sequence[Sequence[int]]) -> TwistState:
        return self._state([c.start(prompt_ids, features=True) for c in self.components])

    def advance(self, state: TwistState, tokens: torch.Tensor) -> TwistState:
        return self._state(
            [c.advance(s, tokens) for c, s in zip(self.components, state.components, strict=True)]
        )
