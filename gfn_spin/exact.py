"""Exact enumeration of a density's responses, and divergences between enumerated distributions.

For small vocabularies and length caps every response can be listed, so a sampler's error
is a number (TV, KL) instead of an anecdote. The prefix tree is expanded level by level in
batches: one forward step per level with cached keys/values, never one full pass per response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gfn_spin.density import Density, unique_policies


@dataclass
class ExactDistribution:
    """All responses of one prompt with their normalized log-probabilities.

    Attributes:
        responses: tuples of token ids (no EOS), in a fixed enumeration order.
        logprobs: ``[R]`` normalized log-probabilities (float64).
        log_z: log of the total unnormalized mass (0 for a normalized density).
    """

    responses: list[tuple[int, ...]]
    logprobs: torch.Tensor
    log_z: float

    def index(self) -> dict[tuple[int, ...], int]:
        """Map from response to its position in ``responses``."""
        return {r: i for i, r in enumerate(self.responses)}

    def empirical_logprobs(self, draws: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Log of the empirical frequencies of ``draws`` over this support ``[R]``.

        Raises if a draw is outside the support (a sampler produced an impossible response).
        """
        position = self.index()
        counts = torch.zeros(len(self.responses), dtype=torch.float64)
        for draw in draws:
            if draw not in position:
                raise ValueError(f"draw {draw} is not in the enumerated support")
            counts[position[draw]] += 1
        return (counts / max(len(draws), 1)).log()

    def sample_indices(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` exact i.i.d. draws (indices into ``responses``)."""
        return torch.multinomial(self.logprobs.exp(), count, replacement=True, generator=generator)


def count_responses(alphabet: int, max_new_tokens: int) -> int:
    """Responses of length 0..L over an alphabet of ``alphabet`` non-EOS tokens."""
    return sum(alphabet**k for k in range(max_new_tokens + 1))


@torch.no_grad()
def exact_distribution(
    density: Density,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    allowed_token_ids: Sequence[int] | None = None,
    max_responses: int = 2_000_000,
    batch_size: int = 8192,
) -> ExactDistribution:
    """Enumerate every response of length ≤ ``max_new_tokens`` and its exact probability.

    Args:
        density: any density (a policy, a mixture; a geometric mixture is normalized here).
        prompt_ids: one prompt's token ids (used as given).
        max_new_tokens: the length cap L (the stop at L is forced, DESIGN §1).
        allowed_token_ids: the tokens a response may contain (EOS is added). Defaults to the
            policy's ``allowed_token_ids`` when it has one, else the whole vocabulary. Mass on
            other tokens is dropped, which is exact when the density forbids them.
        max_responses: refuse (before any model work) when the tree has more responses.
        batch_size: prefixes per forward step (bounds memory).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    eos = density.eos_token_id
    if allowed_token_ids is None:
        allowed_token_ids = response_alphabet(density)
    alphabet = sorted({int(t) for t in allowed_token_ids} - {eos})
    total = count_responses(len(alphabet), max_new_tokens)
    if total > max_responses:
        raise ValueError(
            f"enumeration too large: {total:,} responses (alphabet {len(alphabet)}, "
            f"max_new_tokens={max_new_tokens}) > max_responses={max_responses:,}; lower "
            "max_new_tokens, restrict allowed_token_ids, or raise max_responses"
        )
    device = density.device
    alphabet_t = torch.tensor(alphabet, dtype=torch.long, device=device)
    width = len(alphabet)

    responses: list[tuple[int, ...]] = []
    logps: list[torch.Tensor] = []
    # Depth-first over chunks of one level: bounded memory, one forward per chunk and level.
    stack = [
        (
            density.start([list(prompt_ids)]),
            torch.zeros(1, 0, dtype=torch.long, device=device),
            torch.zeros(1, dtype=torch.float64, device=device),
        )
    ]
    while stack:
        state, prefixes, prefix_logp = stack.pop()
        depth = prefixes.shape[1]
        step = state.next_logprobs.double()
        if depth == max_new_tokens:
            logps.append(prefix_logp)  # forced stop: no EOS factor
            responses.extend(map(tuple, prefixes.tolist()))
            continue
        logps.append(prefix_logp + step[:, eos])
        responses.extend(map(tuple, prefixes.tolist()))
        if width == 0:
            continue
        child_logp = (prefix_logp[:, None] + step[:, alphabet_t]).reshape(-1)
        parents = torch.arange(len(prefixes), device=device).repeat_interleave(width)
        tokens = alphabet_t.repeat(len(prefixes))
        children = torch.cat([prefixes[parents], tokens[:, None]], dim=1)
        if depth + 1 == max_new_tokens:
            # Children stop at the cap (forced stop, no EOS factor): they need no forward.
            # Same order as pushing and popping them would give; saves ~3/4 of the work.
            logps.append(child_logp)
            responses.extend(map(tuple, children.tolist()))
            continue
        for lo in reversed(range(0, len(children), batch_size)):
            part = slice(lo, lo + batch_size)
            child_state = density.advance(state.select(parents[part]), tokens[part])
            stack.append((child_state, children[part], child_logp[part]))

    logprobs = torch.cat(logps).cpu()
    log_z = torch.logsumexp(logprobs, 0)
    return ExactDistribution(responses, logprobs - log_z, float(log_z))


def response_alphabet(density: Density) -> list[int]:
    """Tokens a response may contain: those all leaf policies allow (else the whole vocabulary)."""
    leaves = unique_policies(getattr(density, "components", [density]))
    sets = [getattr(p, "allowed_token_ids", None) for p in leaves]
    if all(s is not None for s in sets):
        return sorted(set.intersection(*(set(s) for s in sets)))
    return list(range(density.vocab_size))


def divergences(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> dict[str, float]:
    """TV, KL(p‖q), KL(q‖p) and Jensen-Shannon between two distributions on one support.

    Inputs are aligned log-probabilities (``-inf`` allowed for zero mass). ``0 log 0 = 0``;
    a KL is ``inf`` when the first argument has mass where the second has none.
    """
    if p_logprobs.shape != q_logprobs.shape:
        raise ValueError(
            f"p_logprobs {tuple(p_logprobs.shape)} and q_logprobs {tuple(q_logprobs.shape)} "
            "must be aligned on one support"
        )
    p_log, q_log = p_logprobs.double(), q_logprobs.double()
    p, q = p_log.exp(), q_log.exp()

    def kl(a: torch.Tensor, a_log: torch.Tensor, b_log: torch.Tensor) -> float:
        terms = torch.where(a > 0, a * (a_log - b_log), torch.zeros_like(a))
        return float(terms.sum())

    m_log = torch.logaddexp(p_log, q_log) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return {
        "tv": float(0.5 * (p - q).abs().sum()),
        "kl_pq": kl(p, p_log, q_log),
        "kl_qp": kl(q, q_log, p_log),
        "js": 0.5 * kl(p, p_log, m_log) + 0.5 * kl(q, q_log, m_log),
    }
