"""Exact sampling by enumeration: the reference every other sampler is measured against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gfn_spin.density import Density
from gfn_spin.exact import ExactDistribution, count_responses, exact_distribution, response_alphabet
from gfn_spin.samples import check_count
from samplers.base import Draws, Sampler


class ExactSampler(Sampler):
    """Exact i.i.d. draws from any density (normalized here) by enumerating every response.

    Use it on small vocabularies and length caps only (the tiny world: 4 symbols, L = 7 gives
    21,845 responses per prompt); it is the ground truth for tests and benchmarks. Cost: the
    whole prefix tree once per distinct prompt, about ``|x| + Σ_k A^k`` model tokens per
    component (A the response alphabet), then nothing per draw; enumerations are cached per
    prompt, so repeated calls are free. The constructor refuses (before any model work) when
    the tree has more than ``max_responses`` responses.

    ``log_q`` is the exact normalized log-probability of each draw, ``log_target`` the
    unnormalized one (``log_q + log Z``); ``stats.log_z`` ``[P]`` is the exact ``log Z`` (and
    ``stats.ess`` the number of draws: they are independent and exact).

    Args:
        target: the density (a geometric mixture is normalized by the enumeration).
        max_new_tokens: the length cap L.
        allowed_token_ids: the response alphabet (default: the policies' allowed tokens, else
            the whole vocabulary).
        max_responses: the largest enumeration accepted.
    """

    def __init__(
        self,
        target: Density,
        max_new_tokens: int,
        *,
        allowed_token_ids: Sequence[int] | None = None,
        max_responses: int = 2_000_000,
    ) -> None:
        self.target = target
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        if allowed_token_ids is None:
            allowed_token_ids = response_alphabet(target)
        self.allowed_token_ids = sorted({int(t) for t in allowed_token_ids})
        self.max_responses = max_responses
        alphabet = len(set(self.allowed_token_ids) - {target.eos_token_id})
        total = count_responses(alphabet, self.max_new_tokens)
        if total > max_responses:
            raise ValueError(
                f"enumeration too large: {total:,} responses per prompt (alphabet {alphabet}, "
                f"max_new_tokens={self.max_new_tokens}) > max_responses={max_responses:,}; use "
                "ImportanceResampler or SMCSampler, lower max_new_tokens, or restrict "
                "allowed_token_ids"
            )
        self._cache: dict[tuple[int, ...], ExactDistribution] = {}

    def distribution(self, prompt_ids: Sequence[int]) -> ExactDistribution:
        """The enumerated distribution of one prompt (token ids), cached."""
        key = tuple(int(t) for t in prompt_ids)
        if key not in self._cache:
            self._cache[key] = exact_distribution(
                self.target,
                list(key),
                self.max_new_tokens,
                allowed_token_ids=self.allowed_token_ids,
                max_responses=self.max_responses,
            )
        return self._cache[key]

    @property
    def model(self) -> Density:
        return self.target

    @property
    def generator_device(self) -> torch.device:
        return torch.device("cpu")  # draws index the enumeration, which lives on the CPU

    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        pad = self.target.pad_token_id
        response_ids = torch.full(
            (len(prompt_ids) * num_samples, self.max_new_tokens), pad, dtype=torch.long
        )
        lengths, log_q, log_z = [], [], []
        for p, ids in enumerate(prompt_ids):
            dist = self.distribution(ids)
            picks = dist.sample_indices(num_samples, generator=generator)
            for j, index in enumerate(picks.tolist()):
                response = dist.responses[index]
                response_ids[p * num_samples + j, : len(response)] = torch.tensor(response)
                lengths.append(len(response))
            log_q.append(dist.logprobs[picks])
            log_z.append(dist.log_z)
        log_q_t = torch.cat(log_q)
        log_z_t = torch.tensor(log_z, dtype=torch.float64)
        return Draws(
            response_ids,
            torch.tensor(lengths, dtype=torch.long),
            log_q=log_q_t,
            log_target=log_q_t + log_z_t.repeat_interleave(num_samples),
            stats={"log_z": log_z_t},
        )
