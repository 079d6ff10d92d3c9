"""Exact enumeration of a density's responses, and divergences between enumerated distributions.

For small vocabularies and length caps every response can be listed, so a sampler's error
is a number (TV, KL) instead of an anecdote. The prefix tree is expanded level by level in
batches: one forward step per level with cached keys/values, never one full pass per response.

Why one module over 400 lines: enumeration, the divergences between enumerated laws and SIR's
exact output law (computed from the enumeration) are the exact side of every sampler
comparison, and they share the enumeration's types.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

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
        max_new_tokens: the length cap L (the stop at L is forced, docs/conventions.md).
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
        # Children in (prefix, token) order, the order in which they are listed.
        child_logp = rearrange(prefix_logp[:, None] + step[:, alphabet_t], "p a -> (p a)")
        parents = repeat(torch.arange(len(prefixes), device=device), "p -> (p a)", a=width)
        tokens = repeat(alphabet_t, "a -> (p a)", p=len(prefixes))
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


@dataclass
class SIROutputLaw:
    """The exact law of one SIR draw over an enumerated support, and how exactly it is known.

    Attributes:
        logprobs: ``[R]`` log-probabilities of the drawn response (float64; ``-inf`` where the
            proposal or the target puts no mass), conditional on some candidate having a
            positive weight (the sampler raises otherwise).
        precision: bound on the relative error of every ``exp(logprobs)`` entry: the
            quadrature error estimated against half the node spacing, plus rigorous bounds on
            the truncated ends of the integral. TV computed from this law is off by at most
            ``precision``, KL(target‖law) by at most about ``precision``.
        num_nodes: quadrature nodes of the final rule.
        no_draw_prob: probability that all K candidates have zero weight (no draw possible).
    """

    logprobs: torch.Tensor
    precision: float
    num_nodes: int
    no_draw_prob: float


def sir_output_law(
    proposal_logprobs: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    num_candidates: int,
    *,
    rtol: float = 1e-8,
    max_halvings: int = 8,
) -> SIROutputLaw:
    """Exact law of sampling-importance-resampling with K candidates, to relative ``rtol``.

    SIR draws K i.i.d. candidates from q, weights ``w(y) = G̃(y)/q(y)`` and outputs one with
    probability ``∝ w``. Its output law is ``p_K(y) = K·q(y)·w(y)·E[1/(w(y) + S)]`` with ``S``
    the sum of K − 1 i.i.d. weights ``w(Y')``, ``Y' ~ q``. The expectation is the Laplace
    integral ``∫_0^∞ e^{−t·w(y)} φ(t)^{K−1} dt`` with ``φ(t) = Σ_z q(z) e^{−t·w(z)}`` summed
    over the support, computed by the trapezoidal rule in ``u = log t`` (whose error falls
    exponentially with the node density for this smooth, doubly decaying integrand). The node
    spacing is halved until two successive rules agree to ``rtol/2`` for every response; the
    ends of the range are chosen so that each truncated part is below ``rtol/8`` (bounds: the
    integrand is at most 1, and ``∫_T^∞ ≤ φ(T)^{K−1} e^{−T·w}/w``, both relative to the lower
    bound ``E[1/(w + S)] ≥ max(1/(w + E S), P(S = 0)/w)``). Weights are normalized to
    ``E_q[w] = 1`` and handled in log space, so neither huge nor tiny weights overflow.

    Use it to measure SIR's error exactly on a world whose responses can be enumerated (its
    TV and KL to the target), where a few hundred draws would only show their noise floor.
    :func:`sir_output_laws` computes several K on one proposal at the cost of about one.

    Args:
        proposal_logprobs: ``[R]`` log q over the support (``-inf`` allowed; normalized here
            over the support given).
        target_log_unnormalized: ``[R]`` log G̃ aligned with ``proposal_logprobs`` (any
            scale; ``-inf`` where the target forbids a response).
        num_candidates: K ≥ 1.
        rtol: relative precision required of every ``p_K(y)``; raises if not reached.
        max_halvings: most halvings of the initial node spacing (1 in ``log t``).

    Raises:
        ValueError: on misaligned inputs, K < 1, or when no response has both q > 0 and
            G̃ > 0 (SIR could never draw).
        RuntimeError: when ``rtol`` is not reached within ``max_halvings`` halvings.
    """
    return sir_output_laws(
        proposal_logprobs,
        target_log_unnormalized,
        [num_candidates],
        rtol=rtol,
        max_halvings=max_halvings,
    )[0]


def sir_output_laws(
    proposal_logprobs: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    num_candidates: Sequence[int],
    *,
    rtol: float = 1e-8,
    max_halvings: int = 8,
    chunk_elements: int = 1 << 22,
) -> list[SIROutputLaw]:
    """:func:`sir_output_law` for several K on one proposal and target, sharing the work.

    One node grid covers every K (the union of their ranges, which only shrinks each one's
    truncation), and the ``[R, nodes]`` block of ``t·w`` and ``φ`` is computed once for all.
    ``chunk_elements`` bounds the block evaluated at once (memory). Returns one law per K, in
    the order given.
    """
    ks, log_q, log_g = _check_sir_inputs(
        proposal_logprobs, target_log_unnormalized, num_candidates, rtol
    )
    weights = _SIRWeights.of(log_q, log_g, chunk_elements)
    multi = sorted(set(ks) - {1})
    rules, quad_error, n = None, torch.zeros(len(multi), dtype=torch.float64), 0
    if multi:
        u_lo, u_hi = weights.integration_range(multi, rtol)
        rules, quad_error, n = weights.integrate(multi, u_lo, u_hi, rtol, max_halvings)

    laws = []
    for k in ks:
        no_draw = math.exp(k * weights.log_q0) if weights.log_q0 > -math.inf else 0.0
        if no_draw >= 1.0 - 1e-12:
            raise ValueError("the proposal puts all but a negligible mass on zero-weight responses")
        log_draw = math.log1p(-no_draw)
        out = torch.full_like(log_q, -math.inf)
        if k == 1:  # p_1 = q on the responses with positive weight
            out[weights.positive] = weights.lq - log_draw
            laws.append(SIROutputLaw(out, 0.0, 0, no_draw))
            continue
        j = multi.index(k)
        precision = float(quad_error[j]) + rtol / 4
        if precision > rtol:
            raise RuntimeError(
                f"SIR law (K={k}) reached relative precision {precision:.2e} > rtol={rtol:.2e} "
                f"after {max_halvings} halvings ({n + 1} nodes); raise max_halvings or rtol"
            )
        out[weights.positive] = math.log(k) + weights.log_p + rules[:, j] - log_draw
        total = float(torch.logsumexp(out, 0).exp())
        if abs(total - 1.0) > 2 * precision + 1e-12:
            raise RuntimeError(f"SIR law (K={k}) sums to {total!r}, off by more than its precision")
        laws.append(SIROutputLaw(out, precision, n + 1, no_draw))
    return laws


def _check_sir_inputs(
    proposal_logprobs: torch.Tensor,
    target_log_unnormalized: torch.Tensor,
    num_candidates: Sequence[int],
    rtol: float,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The inputs of :func:`sir_output_laws` checked: the Ks, and log q and log G̃ as float64
    on the CPU."""
    if proposal_logprobs.shape != target_log_unnormalized.shape or proposal_logprobs.dim() != 1:
        raise ValueError(
            f"proposal_logprobs {tuple(proposal_logprobs.shape)} and target_log_unnormalized "
            f"{tuple(target_log_unnormalized.shape)} must be aligned 1-D tensors"
        )
    ks = [int(k) for k in num_candidates]
    if not ks or min(ks) < 1:
        raise ValueError(
            f"num_candidates={list(num_candidates)} must be a non-empty list of K >= 1"
        )
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol={rtol} must be in (0, 1)")
    log_q = proposal_logprobs.detach().double().cpu()
    log_g = target_log_unnormalized.detach().double().cpu()
    if torch.isnan(log_q).any() or torch.isnan(log_g).any() or (log_q == math.inf).any():
        raise ValueError("proposal_logprobs and target_log_unnormalized must not hold NaN or +inf")
    return ks, log_q, log_g


@dataclass
class _SIRWeights:
    """SIR's importance weights over the responses it can draw, and the Laplace integrand of
    :func:`sir_output_law` built from them (``[M]`` tensors over those M responses).

    Attributes:
        positive: ``[R]`` mask of the responses with q > 0 and G̃ > 0.
        lq: log q on them; ``log_p``: the target normalized over them; ``lw``: log w =
            log_p − lq, so that ``E_q[w] = 1``.
        log_q0: log of q's mass on zero-weight responses (``-inf`` if none).
        per: nodes evaluated at once (``chunk_elements // M``, memory).
    """

    positive: torch.Tensor
    lq: torch.Tensor
    log_p: torch.Tensor
    lw: torch.Tensor
    log_q0: float
    per: int

    @classmethod
    def of(cls, log_q: torch.Tensor, log_g: torch.Tensor, chunk_elements: int) -> _SIRWeights:
        log_q = log_q - torch.logsumexp(log_q, 0)
        positive = torch.isfinite(log_q) & (log_g > -math.inf)
        if not bool(positive.any()):
            raise ValueError(
                "no response has both proposal and target mass: SIR could never draw; give a "
                "proposal whose support meets the target's"
            )
        zero_weight = torch.isfinite(log_q) & ~positive
        log_q0 = float(torch.logsumexp(log_q[zero_weight], 0)) if zero_weight.any() else -math.inf
        # Target normalized over the responses SIR can draw: p̃(y) = q(y)·w(y) with E_q[w] = 1.
        lg = log_g[positive]
        log_p = lg - torch.logsumexp(lg, 0)
        lq = log_q[positive]
        lw = log_p - lq
        return cls(positive, lq, log_p, lw, log_q0, max(1, chunk_elements // len(lw)))

    def log_phi(self, u: torch.Tensor) -> torch.Tensor:
        """log φ(e^u) for nodes ``u`` ``[N]``."""
        lq, lw, per = self.lq, self.lw, self.per
        s = torch.cat(
            [
                torch.logsumexp(lq[:, None] - torch.exp(u[None, lo : lo + per] + lw[:, None]), 0)
                for lo in range(0, len(u), per)
            ]
        )
        return torch.logaddexp(s, torch.full_like(s, self.log_q0)) if self.log_q0 > -math.inf else s

    def integration_range(self, multi: list[int], rtol: float) -> tuple[float, float]:
        """The range ``[u_lo, u_hi]`` of ``u = log t`` outside which the integral of every K in
        ``multi`` (all > 1) loses at most ``rtol/8`` of its lower bound at each end."""
        lw, log_q0 = self.lw, self.log_q0
        log_budget = math.log(rtol / 8)
        u_lo, u_hi = math.inf, -math.inf
        for k in set(multi):
            km1 = float(k - 1)
            # Lower bound on log E[1/(w + S)]: Jensen (E S = K − 1), or the event S = 0.
            log_lower = -torch.logaddexp(lw, torch.full_like(lw, math.log(km1)))
            if log_q0 > -math.inf:
                log_lower = torch.maximum(log_lower, km1 * log_q0 - lw)
            # Left end: ∫_0^{t_lo} ≤ t_lo ≤ (rtol/8)·lower bound for every response.
            start = log_budget + float(log_lower.min())
            u_lo = min(u_lo, start)
            # Right end: step up in log t until φ(T)^{K−1} e^{−T·w}/w ≤ (rtol/8)·lower bound.
            end = start
            for _ in range(100_000):
                end += 1.0
                at = torch.tensor([end], dtype=torch.float64)
                tail = km1 * self.log_phi(at) - torch.exp(end + lw) - lw - log_lower
                if float(tail.max()) <= log_budget:
                    break
            else:
                raise RuntimeError(
                    "could not bound the tail of the SIR-law integral; check the inputs"
                )
            u_hi = max(u_hi, end)
        return u_lo, u_hi

    def log_sums(self, u: torch.Tensor, km1s: torch.Tensor) -> torch.Tensor:
        """``[M, len(km1s)]``: log Σ_nodes e^u·e^{−e^u·w}·φ(e^u)^{K−1} for each K − 1 in
        ``km1s``.

        Summed in linear space after a shift by ``log w + 1`` (``u − e^u·w ≤ −log w − 1`` and
        ``φ ≤ 1``, so no term exceeds 1); rows whose sum falls below 1e-250 are summed again in
        log space.
        """
        lq, lw, per, log_q0 = self.lq, self.lw, self.per, self.log_q0
        shift = lw[:, None] + 1.0
        sums = torch.zeros(len(lw), len(km1s), dtype=torch.float64)
        for lo in range(0, len(u), per):
            uu = u[lo : lo + per]
            tw = torch.exp(uu[None, :] + lw[:, None])  # [M, N]
            lphi = torch.logsumexp(lq[:, None] - tw, 0)
            if log_q0 > -math.inf:
                lphi = torch.logaddexp(lphi, torch.full_like(lphi, log_q0))
            base = uu[None, :] - tw + shift
            for j, c in enumerate(km1s):
                sums[:, j] += torch.exp(base + c * lphi).sum(1)
        out = sums.log() - shift
        small = (sums < 1e-250).any(1)
        if bool(small.any()):
            rows = small.nonzero().squeeze(1)
            parts = []
            for lo in range(0, len(u), per):
                uu = u[lo : lo + per]
                lphi = self.log_phi(uu)
                base = uu[None, :] - torch.exp(uu[None, :] + lw[rows, None])
                parts.append(torch.stack([torch.logsumexp(base + c * lphi, 1) for c in km1s], 1))
            out[rows] = torch.logsumexp(torch.stack(parts, 0), 0)
        return out

    def integrate(
        self, multi: list[int], u_lo: float, u_hi: float, rtol: float, max_halvings: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The trapezoidal rule in ``u`` over ``[u_lo, u_hi]`` for every K in ``multi``, its
        spacing halved until two successive rules agree to ``rtol/2``: the ``[M, len(multi)]``
        log integrals, the ``[len(multi)]`` relative change of the last halving, and the final
        number of intervals."""
        km1s = torch.tensor([k - 1 for k in multi], dtype=torch.float64)
        n = max(2, math.ceil(u_hi - u_lo))
        h = (u_hi - u_lo) / n
        ends = torch.tensor([u_lo, u_hi], dtype=torch.float64)
        log_sum = torch.logaddexp(
            self.log_sums(ends, km1s) - math.log(2.0),
            self.log_sums(u_lo + h * torch.arange(1, n, dtype=torch.float64), km1s),
        )
        rules = log_sum + math.log(h)
        quad_error = torch.full((len(multi),), math.inf, dtype=torch.float64)
        for _ in range(max_halvings):
            mids = u_lo + h * (torch.arange(n, dtype=torch.float64) + 0.5)
            log_sum = torch.logaddexp(log_sum, self.log_sums(mids, km1s))
            n, h = 2 * n, h / 2
            finer = log_sum + math.log(h)
            quad_error = torch.expm1(rules - finer).abs().amax(0)
            rules = finer
            if float(quad_error.max()) <= rtol / 2:
                break
        return rules, quad_error, n
