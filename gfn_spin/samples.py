"""``Samples``: what every sampler returns, and ancestral sampling from an autoregressive density.

Defined here (not in ``samplers``) because policies sample too; ``samplers.Samples`` is this
class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from einops import repeat

from gfn_spin.density import Density, PromptLike, unique_policies
from gfn_spin.devices import resolve_generator


@dataclass
class SampleStats(Mapping):
    """What a ``sample`` call measured: cost, and how exact its draws are.

    For callers comparing samplers. Per-prompt fields are ``[P]`` tensors (P the prompts given
    to ``sample``) or None where the sampler does not estimate them. The fields can also be read
    by name (``stats["ess"]``), like the dict with at least "ess", "log_z" and "tokens" that the
    sampler interface promises (docs/samplers.md); a field that is None reads as None.

    Attributes:
        tokens: model tokens the sampler evaluated to produce the draws (every forward pass of
            every policy, prompts included; scoring the draws for ``log_target`` alone is not
            counted where it is only a diagnostic).
        seconds: wall time of the call.
        ess: ``[P]`` absolute effective sample size ``(Σ w)² / Σ w²`` of the importance
            weights: of one population (SMC) or block of candidates (SIR), averaged over the
            prompt's draws; of the prompt's draws G̃/q (a sampler with an exact ``log_q``).
        ess_fraction: ``[P]`` ``ess`` divided by the number of weights it was computed from
            (N, K or ``num_samples``): 1 for a proposal equal to the target.
        log_z: ``[P]`` estimate (or exact value) of the target's log-normalizer.
        elbo: ``[P]`` mean of ``log G̃ − log q`` over the prompt's draws (exact ``log_q`` only).
        log_z_populations: ``[P, num_samples]`` each SMC population's (or SIR draw's) ``log Ẑ``.
        log_weights: ``[P, num_samples, K or N]`` the importance log-weights of every SIR draw's
            K candidates, or of every SMC population's N particles since its last resampling
            (all of them with resampling off): what a pilot reads the weight distribution from.
        resamples: ``[P]`` mean resampling steps per SMC population.
        num_candidates: SIR's K.
        num_particles: SMC's N.
    """

    tokens: int = 0
    seconds: float = 0.0
    ess: torch.Tensor | None = None
    ess_fraction: torch.Tensor | None = None
    log_z: torch.Tensor | None = None
    elbo: torch.Tensor | None = None
    log_z_populations: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    resamples: torch.Tensor | None = None
    num_candidates: int | None = None
    num_particles: int | None = None

    #: Fields always listed by iteration, even when None (the interface's promised keys).
    REQUIRED = ("tokens", "seconds", "ess", "log_z")

    def __getitem__(self, key: str) -> Any:
        if key not in _STAT_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (
            name for name in _STAT_NAMES if name in self.REQUIRED or getattr(self, name) is not None
        )

    def __len__(self) -> int:
        return sum(1 for _ in self)


_STAT_NAMES = tuple(f.name for f in fields(SampleStats))


@dataclass
class Samples:
    """Draws from a sampler, one row per draw.

    Attributes:
        prompt_index: ``[N]`` index of each draw's prompt in the list given to ``sample``.
        response_ids: ``[N, L]`` response tokens, padded past ``lengths`` (no EOS inside).
        lengths: ``[N]`` response lengths n (a response of length L was stopped by the cap).
        texts: decoded responses.
        log_q: ``[N]`` the sampler's exact log-density of each draw, or None where the sampler
            has none (importance resampling, SMC).
        log_target: ``[N]`` the target's unnormalized log-density, or None without a target.
        stats: a :class:`SampleStats` (cost, ESS, ``log Ẑ``).
    """

    prompt_index: torch.Tensor
    response_ids: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]
    log_q: torch.Tensor | None = None
    log_target: torch.Tensor | None = None
    stats: SampleStats = field(default_factory=SampleStats)

    def __len__(self) -> int:
        return len(self.lengths)

    def responses(self) -> list[tuple[int, ...]]:
        """Each draw's response as a tuple of token ids (the key used by exact enumeration)."""
        return [
            tuple(ids[:n].tolist())
            for ids, n in zip(self.response_ids, self.lengths.tolist(), strict=True)
        ]


def pad_responses(
    responses: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` padded response ids and ``[B]`` lengths (the forced stop sits at column L)."""
    ids = torch.full((len(responses), max_new_tokens), pad_token_id, dtype=torch.long)
    for row, response in enumerate(responses):
        ids[row, : len(response)] = torch.tensor(list(response), dtype=torch.long)
    return ids, torch.tensor([len(r) for r in responses], dtype=torch.long)


def check_count(name: str, value: int) -> int:
    """Validate a positive count argument (num_samples, num_candidates, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse a temperature that is not a finite number > 0, or top_p outside (0, 1]."""
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    if not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


def context_length(density: Density) -> int | None:
    """The shortest context (``max_position_embeddings``) among the models under ``density``."""
    limits = [getattr(p, "max_context", None) for p in unique_policies([density])]
    limits = [int(limit) for limit in limits if isinstance(limit, int)]
    return min(limits) if limits else None


def check_context(
    density: Density, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int
) -> None:
    """Refuse, before any model work, prompts that leave no room for ``max_new_tokens``.

    Every sampler calls this with its length cap: a response runs up to ``max_new_tokens``
    tokens past its prompt, and positions beyond the model's context are undefined.
    """
    limit = context_length(density)
    if limit is None or not prompt_ids:
        return
    longest = max(len(p) for p in prompt_ids)
    if max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of {limit} tokens; lower max_new_tokens below {limit}"
        )
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {limit} tokens; shorten the prompts to at most "
            f"{limit - max_new_tokens} tokens (keep their last tokens) or lower max_new_tokens"
        )


def _sampling_logprobs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution actually sampled from: tempered, then nucleus-truncated, renormalized."""
    if temperature != 1.0:
        logprobs = torch.log_softmax(logprobs / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logprobs.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    return logprobs


def _draw_tokens(logprobs: torch.Tensor, generator: torch.Generator, step: int) -> torch.Tensor:
    """One token per row of ``logprobs`` ``[B, V]`` -> ``[B]``; non-finite probabilities are
    reported as the density's fault, naming the response position ``step``."""
    try:
        return torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
    except RuntimeError as error:  # torch's "probability tensor contains inf/nan"
        if bool(torch.isfinite(logprobs).any(-1).all()):
            raise
        raise FloatingPointError(
            f"the density's next-token probabilities are NaN or inf at response position "
            f"{step}: its weights (or a component's) are not finite or far too large"
        ) from error


@torch.no_grad()
def ancestral_sample(
    density: Density,
    prompts: Sequence[PromptLike],
    num_samples: int = 1,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | int | None = None,
    on_state: Callable[[int, torch.Tensor, Any], None] | None = None,
) -> Samples:
    """Draw ``num_samples`` responses per prompt from an autoregressive ``density``.

    ``on_state(k, rows, state)``, when given, sees every decoding state s_k before its token
    is drawn (``rows``: the output rows the state's rows belong to), so a caller can keep what
    the models computed there (a teacher's log-probs, the components' features) instead of
    running them again.

    One batched decoding loop over all draws with the KV cache; rows that stopped are dropped
    from the batch as they accumulate. ``log_q`` is the log-density of the distribution sampled
    (tempered / truncated when ``temperature``/``top_p`` differ from 1). The stop at
    ``max_new_tokens`` is forced. Cost: one model token per component per generated token.
    """
    if not density.normalized:
        raise ValueError(
            "ancestral sampling needs a normalized (autoregressive) density; for a "
            "GeometricMixture use its local_product() or a sampler from `samplers`"
        )
    check_count("num_samples", num_samples)
    check_count("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_p)
    started, tokens_before = time.perf_counter(), density.tokens_evaluated
    prompt_ids = density.encode_prompts(prompts)
    if len(prompt_ids) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    check_context(density, prompt_ids, max_new_tokens)
    device = density.device
    generator = resolve_generator(generator, device)
    rows = [ids for ids in prompt_ids for _ in range(num_samples)]
    count, eos = len(rows), density.eos_token_id
    pad = density.pad_token_id

    response_ids = torch.full((count, max_new_tokens), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(count, dtype=torch.long, device=device)
    log_q = torch.zeros(count, device=device)
    active = torch.arange(count, device=device)  # global row of each state row
    state = density.start(rows)
    for step in range(max_new_tokens):
        if on_state is not None:
            on_state(step, active, state)
        logprobs = _sampling_logprobs(state.next_logprobs, temperature, top_p)
        token = _draw_tokens(logprobs, generator, step)
        log_q[active] += logprobs.gather(1, token[:, None]).squeeze(1)
        going_on = token != eos
        response_ids[active[going_on], step] = token[going_on]
        lengths[active[going_on]] += 1
        if not bool(going_on.any()) or step == max_new_tokens - 1:
            break
        if not bool(going_on.all()):
            # Drop finished rows so that later steps only pay for live prefixes.
            keep = going_on.nonzero().squeeze(1)
            state, active, token = state.select(keep), active[keep], token[keep]
        state = density.advance(state, token)

    prompt_index = repeat(torch.arange(len(prompt_ids), device=device), "p -> (p s)", s=num_samples)
    return Samples(
        prompt_index=prompt_index,
        response_ids=response_ids,
        lengths=lengths,
        texts=density.decode(response_ids, lengths),
        log_q=log_q,
        stats=SampleStats(
            tokens=density.tokens_evaluated - tokens_before,
            seconds=time.perf_counter() - started,
        ),
    )
