"""The interface every density over responses implements: policies, mixtures, GFlowNet policies.

A density scores complete responses (teacher forcing, :class:`~gfn_spin.scores.TokenScores`)
and extends prefixes one token at a time (for sampling, SMC and exact enumeration):

- ``start(prompt_ids) -> state``: one row per prompt; ``state.next_logprobs`` is ``[B, V]``;
- ``advance(state, tokens) -> state``: append one token per row (consumes ``state``);
- ``state.select(index) -> state``: rows ``index`` of a state, as a new state (resampling,
  branching a prefix tree).

``normalized`` is True for autoregressive densities (each step's scores are a distribution:
policies, arithmetic mixtures, local products); False for an unnormalized geometric mixture,
whose step scores multiply to ``G̃(y)`` but do not sum to one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from gfn_spin.scores import TokenScores, position_mask

PromptLike = str | Sequence[int]


class DecodeState(Protocol):
    """What ``start``/``advance`` return: next-token log-scores ``[B, V]`` plus model caches."""

    next_logprobs: torch.Tensor

    def select(self, index: torch.Tensor) -> DecodeState: ...


class Density(ABC):
    """A (possibly unnormalized) density over responses of length ≤ L given a prompt."""

    #: True when every step's scores are normalized (an autoregressive model).
    normalized: bool = True

    @property
    @abstractmethod
    def eos_token_id(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def tokenizer(self) -> Any: ...

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's PAD id (0 is a valid id), else EOS; padding is always masked."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return self.eos_token_id if pad is None else int(pad)

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def tokens_evaluated(self) -> int:
        """Model tokens run through forwards so far (all components together)."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        """Token ids of each prompt (token-id prompts are returned exactly as given)."""

    @abstractmethod
    def step_logprobs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced next-token log-scores at every state ``s_k``, k = 0..L: ``[B, L+1, V]``."""

    @abstractmethod
    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        """Token scores (docs/conventions.md) of ``response_ids [B, L]`` (L = the length cap)."""

    @abstractmethod
    def start(self, prompt_ids: Sequence[Sequence[int]]) -> DecodeState: ...

    @abstractmethod
    def advance(self, state: Any, tokens: torch.Tensor) -> DecodeState: ...

    def log_prob(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Sequence log-density ``log π(y|x)`` (unnormalized for a geometric mixture), ``[B]``."""
        return self.score(prompts, response_ids, lengths).sequence_logprob()

    def decode(self, response_ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Response texts (special tokens skipped)."""
        rows = [ids[:n].tolist() for ids, n in zip(response_ids, lengths.tolist(), strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


def scores_from_steps(
    step_logprobs: torch.Tensor,
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    eos: int,
    *,
    log_normalizer: torch.Tensor | None = None,
) -> TokenScores:
    """Token scores from full teacher-forced step scores ``[B, L+1, V]``, masked as docs/conventions.md says.

    ``log_normalizer`` ``[B, L+1]``, when given, is subtracted from the picked entries: pass
    unnormalized logits and their logsumexp to normalize only the entries that are used.
    """
    batch, width = response_ids.shape
    steps = torch.arange(width + 1, device=response_ids.device)
    token = step_logprobs[:, :width].gather(2, response_ids.clamp_min(0)[..., None]).squeeze(-1)
    eos_scores = step_logprobs[..., eos]
    if log_normalizer is not None:
        token, eos_scores = token - log_normalizer[:, :width], eos_scores - log_normalizer
    token = token.masked_fill(~position_mask(lengths, width), 0.0)
    eos_scores = eos_scores.masked_fill(
        (steps[None, :] > lengths[:, None]) | (steps[None, :] == width), 0.0
    )
    return TokenScores(token, eos_scores, lengths)


def check_compatible(components: Sequence[Density], argument: str = "components") -> None:
    """Raise a clear error unless all components share vocabulary size and EOS token."""
    if len(components) == 0:
        raise ValueError(f"{argument} is empty: give at least one density")
    eos = {c.eos_token_id for c in components}
    vocab = {c.vocab_size for c in components}
    if len(eos) > 1:
        raise ValueError(
            f"{argument} use different EOS token ids {sorted(eos)}; mixtures need one shared "
            "vocabulary and EOS token (use models with the same tokenizer)"
        )
    if len(vocab) > 1:
        raise ValueError(
            f"{argument} have different vocabulary sizes {sorted(vocab)}; mixtures need one "
            "shared vocabulary (use models with the same tokenizer)"
        )


def unique_policies(components: Sequence[Any]) -> list[Any]:
    """The distinct leaf policies under (possibly nested) mixtures, for token counting."""
    found: dict[int, Any] = {}
    stack = list(components)
    while stack:
        item = stack.pop()
        children = getattr(item, "components", None)
        if children is None:
            found[id(item)] = item
        else:
            stack.extend(children)
    return list(found.values())
