"""Exact normalizers, sampling and divergences for bounded-context densities, beyond enumeration.

When every next-token law depends only on the last ``k`` tokens (prompt and response together),
a density over responses of length ≤ L is a Markov chain on contexts ``c = (t_1..t_k)``, and the
future normalizer of a state depends only on its context and on how many tokens remain. For a
per-token score table ``g(v|c)`` (a policy's log-probabilities, or a geometric mixture's
``Σ_c w_c log π_c(v|c)``) the backward recursion

    log F_0(c) = 0                                  (forced stop at the cap: no EOS factor)
    log F_r(c) = logaddexp( g(⊤|c), logsumexp_v [ g(v|c) + log F_{r-1}(c·v) ] )

gives ``log Z(x) = log F_L(c(x))`` for every prompt at once (``c·v`` drops the oldest token and
appends v). Cost: ``L · A^k · A`` additions for an alphabet of A tokens, instead of the
``A^L`` responses of enumeration. The same tables give exact ancestral sampling of the
normalized target (``p(v|c, r) = g(v|c) F_{r-1}(c·v) / F_r(c)``), exact ``log p(y)``, and,
for a proposal q that is itself bounded-context, exact ``KL(q‖p)``, ``KL(p‖q)`` and the
population ESS ``(E_q w)² / E_q w²`` of the weights ``w = G̃/q`` (expectations by the same
backward recursion). For a proposal that is not bounded-context (a GFlowNet policy), use
:func:`monte_carlo_kl` and :func:`ess_fraction` on its draws: ``log p`` stays exact, only the
expectation over q is estimated, with its standard error.

What is exact: the recursion, in float64, over tables read from the model once per context
(:meth:`ContextTables.from_density`). The tables are as exact as the model's forward; that the
model's law truly ignores tokens older than k is a property of the model (a one-layer
sliding-window attention model with window k has it; see docs/scaled_world.md) that
:func:`check_bounded_context` verifies on given prompts.

Why one module over 400 lines: the tables, the backward recursion, sampling and the
expectation recursions all index the same context layout; split, each piece would import the
others' private indexing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange, repeat

from gfn_spin.density import Density
from gfn_spin.devices import resolve_generator
from gfn_spin.samples import Samples, check_count
from gfn_spin.scores import position_mask

#: Largest number of contexts ``A^k`` a table may have (memory: ``A^k · (A+1)`` float64).
MAX_CONTEXTS = 1 << 18


@dataclass
class ContextTables:
    """Next-token log-scores of a bounded-context density at every context.

    Attributes:
        logprobs: ``[A^k, A+1]`` float64; row ``c`` is the context whose tokens are
            ``alphabet[c_1]..alphabet[c_k]`` (``c = Σ_i c_i A^{k-i}``, oldest token most
            significant); column ``j < A`` scores ``alphabet[j]``, column ``A`` scores EOS.
            Log-probabilities for a normalized density, log-scores for a geometric mixture.
        alphabet: the A token ids a response may contain (EOS excluded).
        eos_token_id: the EOS (⊤) token id.
        context: k, the number of trailing tokens the law depends on.
    """

    logprobs: torch.Tensor = field(repr=False)
    alphabet: list[int] = field(repr=False)
    eos_token_id: int
    context: int

    def __post_init__(self) -> None:
        expected = (len(self.alphabet) ** self.context, len(self.alphabet) + 1)
        if tuple(self.logprobs.shape) != expected:
            raise ValueError(
                f"logprobs has shape {tuple(self.logprobs.shape)}; an alphabet of "
                f"{len(self.alphabet)} tokens and context {self.context} need {expected}"
            )

    @property
    def num_symbols(self) -> int:
        return len(self.alphabet)

    @property
    def num_contexts(self) -> int:
        return self.logprobs.shape[0]

    @classmethod
    @torch.no_grad()
    def from_density(
        cls,
        density: Density,
        alphabet: Sequence[int],
        context: int,
        *,
        batch_size: int = 8192,
    ) -> ContextTables:
        """Read a density's next-token law at every context: ``A^k`` prompts of k tokens each.

        The density's law must depend on the last ``context`` tokens only (check with
        :func:`check_bounded_context`); a density that reads further back gets a table that
        describes it at no real state. Costs ``A^k · k`` model tokens per policy.
        """
        alphabet = [int(t) for t in alphabet]
        eos = density.eos_token_id
        if context < 1:
            raise ValueError(f"context={context} must be >= 1")
        if eos in alphabet or len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError("alphabet must hold distinct token ids, without the EOS token")
        count = len(alphabet) ** context
        if count > MAX_CONTEXTS:
            raise ValueError(
                f"{len(alphabet)}^{context} = {count:,} contexts exceed {MAX_CONTEXTS:,}; lower "
                "the context or the alphabet"
            )
        tokens = torch.tensor(alphabet, dtype=torch.long)
        columns = torch.cat([tokens, torch.tensor([eos])]).to(density.device)
        rows = []
        for lo in range(0, count, batch_size):
            index = torch.arange(lo, min(lo + batch_size, count))
            state = density.start(tokens[context_digits(index, len(alphabet), context)].tolist())
            rows.append(state.next_logprobs[:, columns].double().cpu())
        return cls(torch.cat(rows), alphabet, eos, context)

    def combine(self, others: Sequence[ContextTables], weights: Sequence[float]) -> ContextTables:
        """``Σ_c w_c · table_c`` over ``[self, *others]`` (a geometric mixture's step scores);
        a zero weight contributes nothing, even where its table is ``-inf``."""
        tables = [self, *others]
        if len(weights) != len(tables):
            raise ValueError(f"weights has {len(weights)} entries for {len(tables)} tables")
        for other in others:
            if (other.alphabet, other.eos_token_id, other.context) != (
                self.alphabet,
                self.eos_token_id,
                self.context,
            ):
                raise ValueError("tables must share alphabet, EOS token and context to combine")
        total = torch.zeros_like(self.logprobs)
        for table, weight in zip(tables, weights, strict=True):
            if float(weight) != 0.0:
                total = total + float(weight) * table.logprobs
        return ContextTables(total, self.alphabet, self.eos_token_id, self.context)

    def successor(self) -> torch.Tensor:
        """``[A^k, A]``: the context after appending ``alphabet[j]`` to context ``c``."""
        size = self.num_symbols
        keep = size ** (self.context - 1)  # the k-1 most recent tokens survive
        rows = torch.arange(self.num_contexts) % keep
        return rows[:, None] * size + torch.arange(size)[None, :]

    def symbol_positions(self, token_ids: torch.Tensor, argument: str) -> torch.Tensor:
        """Positions in ``alphabet`` of ``token_ids`` (any shape); raises on a foreign token."""
        largest = int(token_ids.max()) if token_ids.numel() else 0
        lookup = torch.full((max(max(self.alphabet), largest) + 1,), -1)
        lookup[torch.tensor(self.alphabet)] = torch.arange(self.num_symbols)
        positions = lookup[token_ids.clamp_min(0)]
        if bool(((positions < 0) | (token_ids < 0)).any()):
            raise ValueError(
                f"{argument} holds tokens outside the alphabet of {self.num_symbols} tokens; a "
                "bounded-context table covers only contexts made of alphabet tokens"
            )
        return positions

    def prompt_symbols(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[P, k]`` alphabet positions of each prompt's last k tokens."""
        short = [i for i, p in enumerate(prompt_ids) if len(p) < self.context]
        if short:
            raise ValueError(
                f"prompts {short[:5]} have fewer than context={self.context} tokens; the law at "
                "the first response token needs k prompt tokens from the alphabet"
            )
        tails = torch.tensor([list(p)[len(p) - self.context :] for p in prompt_ids])
        return self.symbol_positions(tails, "the last k tokens of a prompt")

    def context_index(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[P]`` the context of each prompt's first response token."""
        return digits_to_index(self.prompt_symbols(prompt_ids), self.num_symbols)


def context_digits(index: torch.Tensor, size: int, context: int) -> torch.Tensor:
    """``[..., k]`` the alphabet positions (oldest first) of context indices ``index``."""
    powers = size ** torch.arange(context - 1, -1, -1)
    return (index[..., None] // powers) % size


def digits_to_index(digits: torch.Tensor, size: int) -> torch.Tensor:
    """Context index of ``[..., k]`` alphabet positions (oldest first)."""
    powers = size ** torch.arange(digits.shape[-1] - 1, -1, -1)
    return (digits * powers).sum(-1)


def state_contexts(
    tables: ContextTables, prompt_ids: Sequence[Sequence[int]], response_ids: torch.Tensor
) -> torch.Tensor:
    """``[B, L+1]`` the context of every state ``s_0..s_L`` of ``response_ids [B, L]`` (all
    alphabet tokens: fill the padding with one)."""
    symbols = tables.symbol_positions(response_ids.cpu(), "response_ids")
    window = torch.cat([tables.prompt_symbols(prompt_ids), symbols], dim=1)
    return digits_to_index(window.unfold(1, tables.context, 1), tables.num_symbols)


def log_future(tables: ContextTables, max_new_tokens: int) -> torch.Tensor:
    """``[L+1, A^k]``: ``log F_r(c)``, the log of the total score of all continuations from
    context c with r tokens left (the stop at r = 0 is forced, as in docs/conventions.md).
    """
    size = tables.num_symbols
    successor = tables.successor()
    scores = tables.logprobs
    future = [torch.zeros(tables.num_contexts, dtype=torch.float64)]
    for _ in range(max_new_tokens):
        go_on = torch.logsumexp(scores[:, :size] + future[-1][successor], dim=1)
        future.append(torch.logaddexp(scores[:, size], go_on))
    return torch.stack(future)


def expected_sum(
    law: torch.Tensor | Callable[[int], torch.Tensor],
    values: torch.Tensor,
    successor: torch.Tensor,
    max_new_tokens: int,
) -> torch.Tensor:
    """``[A^k]``: ``E[Σ_t f(c_t, v_t)]`` over a chain of at most L moves, from each context.

    ``law`` is the chain's log-law ``[A^k, A+1]`` (normalized rows, EOS last), or a callable
    giving it with r tokens left (a law that depends on the remaining length); ``values``
    ``[A^k, A+1]`` is f of each move. The stop at r = 0 is forced and adds nothing. A move of
    probability 0 adds nothing whatever its value (0 · ∞ = 0).
    """

    def weighted(probs: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
        return torch.where(probs > 0, probs * terms, torch.zeros((), dtype=terms.dtype)).sum(1)

    size = successor.shape[1]
    fixed = None if callable(law) else law.exp()
    here = None if fixed is None else weighted(fixed, values)
    value = torch.zeros(successor.shape[0], dtype=torch.float64)
    for remaining in range(1, max_new_tokens + 1):
        probs = fixed if fixed is not None else law(remaining).exp()
        now = here if here is not None else weighted(probs, values)
        value = now + weighted(probs[:, :size], value[successor])
    return value


class BoundedContextTarget:
    """The normalized law ``p(y|x) = G̃(y|x) / Z(x)`` of bounded-context step scores, exactly.

    Args:
        tables: step scores ``g(v|c)`` at every context (a policy's, or a geometric mixture's:
            :meth:`ContextTables.combine`).
        max_new_tokens: the length cap L (the stop at L is forced).

    The backward table ``log F_r(c)`` (``[L+1, A^k]`` float64) is computed once here; every
    method below is exact given ``tables``.
    """

    def __init__(self, tables: ContextTables, max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens={max_new_tokens!r} must be an integer")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        self.tables = tables
        self.max_new_tokens = max_new_tokens
        self.log_future = log_future(tables, max_new_tokens)
        self._successor = tables.successor()

    def log_z(self, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[P]`` exact ``log Z(x)`` of each prompt."""
        return self.log_future[self.max_new_tokens, self.tables.context_index(prompt_ids)]

    def log_unnormalized(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """``[B]`` ``log G̃(y|x)``: the sum of step scores along each response (one row per
        response; ``prompt_ids`` aligned with the rows). Padding past ``lengths`` may be any
        alphabet token or the EOS/PAD id."""
        width = response_ids.shape[1]
        if width != self.max_new_tokens:
            raise ValueError(
                f"response_ids has {width} columns; give them padded to max_new_tokens="
                f"{self.max_new_tokens}"
            )
        lengths = lengths.cpu()
        inside = position_mask(lengths, width)
        filler = self.tables.alphabet[0]
        padded = torch.where(inside, response_ids.cpu(), filler)
        contexts = state_contexts(self.tables, prompt_ids, padded)
        symbols = self.tables.symbol_positions(padded, "response_ids")
        scores = self.tables.logprobs
        tokens = scores[contexts[:, :width], symbols].masked_fill(~inside, 0.0).sum(1)
        stop_context = contexts.gather(1, lengths[:, None]).squeeze(1)
        stop = torch.where(
            lengths < width,
            scores[stop_context, self.tables.num_symbols],
            torch.zeros((), dtype=torch.float64),
        )
        return tokens + stop

    def log_prob(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """``[B]`` exact normalized ``log p(y|x)``."""
        return self.log_unnormalized(prompt_ids, response_ids, lengths) - self.log_z(prompt_ids)

    def step_law(self, remaining: int, contexts: torch.Tensor | None = None) -> torch.Tensor:
        """``[C, A+1]`` the normalized law of the next move with ``remaining`` ≥ 1 tokens left,
        at ``contexts`` ``[C]`` (None: all ``A^k``): ``log g(v|c) + log F_{r-1}(c·v) −
        log F_r(c)`` (EOS last). Rows of contexts with no mass (``F_r = 0``) are ``-inf``."""
        size = self.tables.num_symbols
        before, now = self.log_future[remaining - 1], self.log_future[remaining]
        if contexts is None:
            law, successor = self.tables.logprobs.clone(), self._successor
        else:
            law, successor, now = (
                self.tables.logprobs[contexts],
                self._successor[contexts],
                now[contexts],
            )
        law[:, :size] += before[successor]
        finite = torch.isfinite(now)
        return torch.where(finite[:, None], law - now[:, None], torch.full_like(law, -math.inf))

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_samples: int = 1,
        *,
        generator: torch.Generator | int | None = None,
        tokenizer: Any | None = None,
    ) -> Samples:
        """``num_samples`` exact i.i.d. draws per prompt (prompt-major order, like the samplers).

        ``log_q`` is the exact normalized log-density and ``log_target`` the unnormalized one;
        ``stats["log_z"]`` is the exact ``log Z`` per prompt, ``stats["ess"]`` is ``num_samples``.
        ``texts`` are decoded with ``tokenizer`` when one is given (the tables have none), else
        empty.
        """
        check_count("num_samples", num_samples)
        generator = resolve_generator(generator, torch.device("cpu"))
        log_z = self.log_z(prompt_ids)
        if not bool(torch.isfinite(log_z).all()):
            raise ValueError("a prompt has no response of positive score (log Z = -inf)")
        width, size = self.max_new_tokens, self.tables.num_symbols
        prompt_index = repeat(torch.arange(len(prompt_ids)), "p -> (p s)", s=num_samples)
        context = self.tables.context_index(prompt_ids)[prompt_index]
        symbols = torch.zeros(len(prompt_index), width, dtype=torch.long)
        lengths = torch.full((len(prompt_index),), width, dtype=torch.long)
        running = torch.ones(len(prompt_index), dtype=torch.bool)
        for t in range(width):
            law = self.step_law(width - t, context)
            move = torch.multinomial(law.exp(), 1, generator=generator).squeeze(1)
            stops = running & (move == size)
            lengths[stops] = t
            running &= ~stops
            symbols[:, t] = torch.where(running, move, 0)
            context = torch.where(running, self._successor[context, move.clamp_max(size - 1)], 0)
            if not bool(running.any()):
                break
        alphabet = torch.tensor(self.tables.alphabet)
        eos = self.tables.eos_token_id
        response_ids = torch.where(position_mask(lengths, width), alphabet[symbols], eos)
        rows = [prompt_ids[i] for i in prompt_index.tolist()]
        log_target = self.log_unnormalized(rows, response_ids, lengths)
        return Samples(
            prompt_index=prompt_index,
            response_ids=response_ids,
            lengths=lengths,
            texts=[]
            if tokenizer is None
            else tokenizer.batch_decode(
                [ids[:n].tolist() for ids, n in zip(response_ids, lengths.tolist(), strict=True)],
                skip_special_tokens=True,
            ),
            log_q=log_target - log_z[prompt_index],
            log_target=log_target,
            stats={"log_z": log_z, "ess": torch.full_like(log_z, float(num_samples))},
        )

    def kl_from(self, proposal: ContextTables, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[P]`` exact ``KL(q‖p)`` for a normalized bounded-context q (``proposal``)."""
        self._check_same_chain(proposal)
        values = proposal.logprobs - self.tables.logprobs
        cross = expected_sum(proposal.logprobs, values, self._successor, self.max_new_tokens)
        return cross[self.tables.context_index(prompt_ids)] + self.log_z(prompt_ids)

    def kl_to(self, other: ContextTables, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[P]`` exact ``KL(p‖q)`` for a normalized bounded-context q (``other``)."""
        self._check_same_chain(other)
        values = self.tables.logprobs - other.logprobs
        cross = expected_sum(self.step_law, values, self._successor, self.max_new_tokens)
        return cross[self.tables.context_index(prompt_ids)] - self.log_z(prompt_ids)

    def proposal_ess(
        self, proposal: ContextTables, prompt_ids: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """``[P]`` exact population ``ESS/N = (E_q w)² / E_q w²`` of ``w = G̃/q`` (the limit of
        importance sampling's ESS/N as N grows), for a bounded-context q. Responses q cannot
        draw count in neither moment (q missing target mass shows in ``kl_to``, not here)."""
        self._check_same_chain(proposal)
        reachable = torch.isfinite(proposal.logprobs)
        minus_inf = torch.full_like(proposal.logprobs, -math.inf)
        target = torch.where(reachable, self.tables.logprobs, minus_inf)
        square = torch.where(reachable, 2 * self.tables.logprobs - proposal.logprobs, minus_inf)
        index = self.tables.context_index(prompt_ids)
        first = log_future(self._like(target), self.max_new_tokens)[-1, index]
        second = log_future(self._like(square), self.max_new_tokens)[-1, index]
        return torch.exp(2 * first - second)

    def length_blind_projection(self, prompt_ids: Sequence[Sequence[int]]) -> ContextTables:
        """The bounded-context law that ignores how many tokens remain and is closest to p in
        ``KL(p‖q)`` over ``prompt_ids`` (a uniform mix): the best that a proposal reading only
        the last k tokens can do, such as a sliding-window policy with a LoRA adapter.

        ``KL(p‖q) = const − Σ_{c,v} N(c, v) log q(v|c)``, with ``N(c, v)`` the expected number of
        moves v from context c under p (forced stops excluded), so the optimum is
        ``q(v|c) = N(c, v) / Σ_v N(c, v)``; the counts come from a forward pass of the chain's
        occupancy. Contexts p never visits get the uniform law (they do not enter KL(p‖q)).
        """
        size, successor = self.tables.num_symbols, self._successor
        occupancy = torch.zeros(self.tables.num_contexts, dtype=torch.float64)
        start = self.tables.context_index(prompt_ids)
        occupancy.index_add_(
            0, start, torch.full((len(start),), 1.0 / len(start), dtype=torch.float64)
        )
        counts = torch.zeros(self.tables.num_contexts, size + 1, dtype=torch.float64)
        for remaining in range(self.max_new_tokens, 0, -1):
            moves = occupancy[:, None] * self.step_law(remaining).exp()  # -inf rows: 0 mass
            counts += moves
            # Mass moved from context c by symbol v lands on successor[c, v].
            occupancy = torch.zeros_like(occupancy).index_add_(
                0, rearrange(successor, "c v -> (c v)"), rearrange(moves[:, :size], "c v -> (c v)")
            )
        total = counts.sum(1, keepdim=True)
        law = torch.where(total > 0, counts / total.clamp_min(1e-300), 1.0 / (size + 1))
        return self._like(law.log())

    def _like(self, logprobs: torch.Tensor) -> ContextTables:
        table = self.tables
        return ContextTables(logprobs, table.alphabet, table.eos_token_id, table.context)

    def _check_same_chain(self, other: ContextTables) -> None:
        mine = (self.tables.alphabet, self.tables.eos_token_id, self.tables.context)
        if (other.alphabet, other.eos_token_id, other.context) != mine:
            raise ValueError(
                "the tables describe different chains (alphabet, EOS token or context differ); "
                "read both with ContextTables.from_density on the same alphabet and context"
            )


def monte_carlo_kl(
    log_q: torch.Tensor, log_target: torch.Tensor, log_z: float
) -> tuple[float, float]:
    """``KL(q‖p)`` estimated from draws of q, and its standard error.

    ``KL(q‖p) = E_q[log q(y) − log G̃(y)] + log Z``, averaged over ``y_i ~ q`` (one prompt):
    unbiased, with standard error ``std/√n`` of the per-draw terms (sample std, n−1). Exact up
    to that Monte Carlo error when ``log q`` (the sampler's own density) and ``log Z`` are
    exact, for any q that can score its own draws (a GFlowNet policy).
    """
    terms = log_q.double() - log_target.double() + log_z
    if terms.numel() < 2:
        raise ValueError("give at least two draws to estimate a standard error")
    return float(terms.mean()), float(terms.std() / math.sqrt(terms.numel()))


def ess_fraction(
    log_q: torch.Tensor, log_target: torch.Tensor, log_z: float | None = None
) -> float:
    """ESS/N of the importance weights ``w = G̃/q`` of draws from q (one prompt).

    Without ``log_z``: the self-normalized ``(Σ w)² / (N Σ w²)``, in (0, 1]. With the exact
    ``log_z``: ``1 / mean((w/Z)²)``, an estimate of the population ``Z² / E_q w²`` that uses
    ``E_q[w] = Z`` instead of estimating it; it is not capped at 1. Both read high when the
    draws miss the heavy tail of w, the second visibly so (a value above 1); for a
    bounded-context q, :meth:`BoundedContextTarget.proposal_ess` gives the population value.
    """
    log_w = log_target.double() - log_q.double()
    if log_z is None:
        log_ess = 2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)
        return float(torch.exp(log_ess) / log_w.numel())
    mean_square = torch.logsumexp(2 * (log_w - log_z), 0) - math.log(log_w.numel())
    return float(torch.exp(-mean_square))


@torch.no_grad()
def check_bounded_context(
    density: Density,
    tables: ContextTables,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
) -> float:
    """Largest ``|log g(v|s) − table(v|c(s))|`` over every state of the given responses.

    The density is scored by teacher forcing on the full prompts (no truncation), so a density
    that reads tokens older than the context shows a gap; a bounded-context one shows only
    floating-point rounding. Columns outside the alphabet and EOS are not compared.
    """
    steps = density.step_logprobs(prompt_ids, response_ids, lengths).double().cpu()
    columns = torch.tensor([*tables.alphabet, tables.eos_token_id])
    width = response_ids.shape[1]
    lengths = lengths.cpu()
    inside = position_mask(lengths + 1, width + 1)  # states 0..n
    padded = torch.where(position_mask(lengths, width), response_ids.cpu(), tables.alphabet[0])
    contexts = state_contexts(tables, prompt_ids, padded)
    gap = (steps[..., columns] - tables.logprobs[contexts]).abs()
    # -inf on both sides (a masked token) is no gap.
    gap = torch.where(torch.isnan(gap), torch.zeros_like(gap), gap)
    return float(gap[inside].max())
