"""Sequential Monte Carlo toward a geometric mixture (or any density), token by token.

Particles extend from an autoregressive proposal q; at every step each particle's weight is
multiplied by the incremental weight ``g(v|s_k) / q(v|s_k)``, where g are the target's step
scores and v the sampled token (⊤ included: a particle that emits EOS is finished). With the
local product as proposal this is ``Z_loc(s_k)`` whatever v is (docs/mixtures.md), so weights are known
before the token is drawn. The stop at the cap L is forced, with no factor (``Z_loc(s_L) = 1``).
When a population's ESS falls under ``ess_threshold · N`` it is resampled (multinomial);
finished particles keep their weight, stop extending, and take part in resampling (a copy of a
finished particle stays finished).

Twisted SMC (``twist=``): the intermediate potential of a particle at ``s_k`` is
``γ_k(s_k) = g̃(y_{1:k}) · ψ(s_k)``, the target's prefix product ``g̃(y_{1:k}) = Π_{j<k}
g(y_{j+1}|s_j)`` times a twist ψ that looks ahead (ψ ≡ 1 without a twist). A finished particle's
potential is its target density ``G̃(y)`` (ψ = 1 at ⊤ and at the forced stop at L). The initial
weight is ``γ_0(s_0) = ψ(s_0)`` and the incremental weight of ``s_k → s_k·v`` is
``γ_{k+1}(s_k v) / (γ_k(s_k) q(v|s_k))``, so the weights along any path multiply to
``G̃(y) / q(y)`` whatever ψ is: only the variance depends on ψ. With ``twist="flow"``, ``γ_k`` is
the prefix flow of modified SubTB (docs/gflownet.md), ``F(s_k) = R(s_k⊤) / q(⊤|s_k)`` with
``R(s_k⊤) = G̃(y_{1:k}⊤)``: then ``ψ(s) = g(⊤|s) / q(⊤|s)``, stopping has incremental weight 1, and
a proposal that samples the target exactly makes every incremental weight 1 and ``Ẑ = Z``.

``Ẑ = Π_epochs mean(w)`` (product over resampling epochs of the mean weight, the initial weight
included) is an unbiased estimate of the target's normalizer ``Z`` for any ψ > 0; ``log Ẑ`` is
biased low (Jensen). The law of a draw picked ∝ w from the final population tends to the target
as N → ∞ (consistent, biased at finite N, first order O(1/N)); without resampling it is exactly
SIR with K = N.

Why one module over 400 lines: it is one algorithm read top to bottom, the decoding loop
(``SMCSampler._run``: start, extend, look ahead, carry on, pick) and the weighting rules it
calls, whose weights must multiply to G̃/q along every path; splitting it would scatter one
loop's invariants over files. The rules are branches inside that loop, so they stay next to
it rather than behind an interface with one caller (which rules apply is decided in
:mod:`samplers.weighting`; the twists, which have several callers, live in
:mod:`samplers.smc_twists`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gfn_spin.density import Density, PromptLike
from gfn_spin.samples import check_count
from gfn_spin.scores import position_mask, weighted_logsum
from samplers.base import Draws, ProposalSampler, encode_checked
from samplers.smc_twists import Twist, TwistInputs, resolve_twist
from samplers.weighting import (
    Weighting,
    applicable_weightings,
    effective_sample_size,
    logmeanexp,
)


@dataclass
class _Populations:
    """The particles of one batch of G populations of ``n`` each, mid-decoding (``B = G·n``
    global rows; the decode states hold only the live particles' rows, ``alive``).

    Attributes:
        prompts: each population's prompt token ids (G lists).
        n: particles per population.
        response_ids: ``[B, L]`` prefixes, padded. lengths: ``[B]``. finished: ``[B]`` bool.
        log_w: ``[B]`` float64 log-weights since the last resampling.
        path_log_target: ``[B]`` float64 ``log g̃`` of each path so far.
        log_z: ``[G]`` float64 ``log Ẑ`` of the finished resampling epochs.
        resamples: ``[G]`` resampling steps so far.
        alive: global row of each decode-state row.
        log_psi: ``[B]`` float64 ``log ψ`` of each particle's current state (0 untwisted).
        proposal_state, target_state: the decode states (target's only for "general").
        increments: ``[B, L+1]`` float64 per-step log-weights when decoding forced paths.
    """

    prompts: list[list[int]]
    n: int
    response_ids: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    log_w: torch.Tensor
    path_log_target: torch.Tensor
    log_z: torch.Tensor
    resamples: torch.Tensor
    alive: torch.Tensor
    log_psi: torch.Tensor
    proposal_state: Any
    target_state: Any
    increments: torch.Tensor | None

    def add(self, where: torch.Tensor, values: torch.Tensor, column: int) -> None:
        """Multiply the weights of rows ``where`` by ``exp(values)`` (at step ``column``)."""
        self.log_w[where] += values
        if self.increments is not None:
            self.increments[where, column] += values

    def reorder(self, ancestors: torch.Tensor, twisted: bool) -> None:
        """Global rows become copies of their ``ancestors`` (after resampling)."""
        self.response_ids, self.lengths = self.response_ids[ancestors], self.lengths[ancestors]
        self.finished = self.finished[ancestors]
        self.path_log_target = self.path_log_target[ancestors]
        if twisted:
            self.log_psi = self.log_psi[ancestors]

    def select_states(self, keep: torch.Tensor) -> None:
        """Keep decode-state rows ``keep``, in that order."""
        self.proposal_state = self.proposal_state.select(keep)
        if self.target_state is not None:
            self.target_state = self.target_state.select(keep)


class SMCSampler(ProposalSampler):
    """Sequential Monte Carlo with adaptive multinomial resampling and an unbiased ``Ẑ``.

    Use it for a geometric mixture when the local product (the default proposal) drifts from
    the target over long responses: resampling prunes particles whose prefixes the target
    dislikes, which SIR cannot do. Use :class:`~samplers.ImportanceResampler` when the proposal
    is already close (ESS/K high), :class:`~samplers.ExactSampler` on tiny worlds. With a trained
    GFlowNet, pass its ``.policy`` as ``proposal`` and ``twist="flow"``: its prefix flow then
    looks ahead when resampling (GFlowNet-twisted SMC), and the closer the GFlowNet is to the
    target, the closer every incremental weight is to 1.

    ``num_samples`` semantics: each output draw comes from its own independent population of
    ``num_particles`` particles (one particle picked ∝ its final weight), so draws are
    independent and their law tends to the target as N grows. All particles of all populations
    and prompts are extended in one batch per step (``batch_size`` caps a batch; populations
    are never split). Cost in model tokens per draw: ``N·(|x| + n̄)`` per proposal component,
    plus the same per target component unless the proposal is the target itself, the target's
    local product, or a residual on it (a density whose ``local`` is the target's local product
    and whose states carry its component states, as the residual GFlowNet policy does): then
    the target's step scores come with the proposal's. No teacher-forced pass is needed:
    ``log_target`` is accumulated along each particle's path.

    A population whose weights all become zero (the target forbids every particle) cannot
    produce a draw: ``sample`` raises a RuntimeError.

    ``stats``: ``log_z`` ``[P]`` (``log`` of the mean over the prompt's populations of ``Ẑ``),
    ``log_z_populations`` ``[P, num_samples]`` (each population's ``log Ẑ``), ``ess`` ``[P]``
    (absolute ESS of the final weights, mean over populations; ``ess_fraction`` is it over N),
    ``log_weights`` ``[P, num_samples, N]`` (each population's final weights since its last
    resampling), ``resamples`` ``[P]`` (mean resampling steps per population), ``tokens``,
    ``seconds``, ``num_particles``.

    Args:
        target: the density to sample (a GeometricMixture typically; any density works).
        num_particles: N, particles per population.
        proposal: a normalized density; None uses the target's local product (or the target
            itself when it is normalized).
        twist: the look-ahead of the intermediate potentials (see the module docstring): None
            (ψ ≡ 1, the target's prefix), ``"flow"`` (:func:`flow_twist`, the prefix flow
            ``F(s) = R(s⊤) / q(⊤|s)`` of the proposal read as a GFlowNet), or a :data:`Twist`
            callable (a learned twist head).
        ess_threshold: resample a population when its ESS < ``ess_threshold · N`` (0: never,
            which is SIR; 1: at every step).
        max_new_tokens: the length cap L.
        batch_size: particles per batch (whole populations; at least one population).
        weighting: where the target's step scores come from. "auto" picks the cheapest that
            applies: "exact" (the proposal is the normalized target: w ≡ 1), "local_product"
            (the proposal is the target's local product: w = Z_loc(s_k), no target states),
            "components" (the proposal is a residual on it: scores from its component states),
            else "general" (the target decoded beside the proposal). A named choice must apply;
            "general" always does (for checking a fast path against it).
    """

    def __init__(
        self,
        target: Density,
        num_particles: int,
        *,
        proposal: Density | None = None,
        twist: str | Twist | None = None,
        ess_threshold: float = 0.5,
        max_new_tokens: int,
        batch_size: int = 65536,
        weighting: Weighting = "auto",
    ) -> None:
        super().__init__(target, proposal)
        self.num_particles = check_count("num_particles", num_particles)
        self.twist = resolve_twist(twist)
        if not 0.0 <= float(ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold={ess_threshold} must be in [0, 1]")
        self.ess_threshold = float(ess_threshold)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        self.batch_size = check_count("batch_size", batch_size)
        applicable = applicable_weightings(self.proposal, target)
        if weighting == "auto":
            weighting = applicable[0]
        elif weighting not in applicable:
            raise ValueError(
                f"weighting={weighting!r} does not apply to this target and proposal; it may be "
                f"one of {applicable} or 'auto'"
            )
        self.weighting: Weighting = weighting

    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        return self.populations(prompt_ids, num_samples, generator)

    def populations(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        """``num_samples`` independent populations per encoded prompt and one draw from each,
        with every stat :meth:`sample` reports, under no model-token accounting of its own:
        the entry for samplers that run SMC inside theirs (SIR weighted while decoding is SMC
        that never resamples)."""
        populations = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
        per_batch = max(1, self.batch_size // self.num_particles)
        results = [
            self._run([prompt_ids[i] for i in populations[lo : lo + per_batch]], generator)
            for lo in range(0, len(populations), per_batch)
        ]
        merged = {key: torch.cat([r[key] for r in results]) for key in results[0]}
        per_prompt = (len(prompt_ids), num_samples)
        log_z_populations = merged["log_z"].view(per_prompt).cpu()
        ess = merged["ess"].view(per_prompt).mean(1).cpu()
        return Draws(
            merged["response_ids"],
            merged["lengths"],
            log_target=merged["log_target"],
            stats={
                "ess": ess,
                "ess_fraction": ess / self.num_particles,
                "log_z": logmeanexp(log_z_populations),
                "log_z_populations": log_z_populations,
                "log_weights": merged["log_weights"].view(*per_prompt, -1).double().cpu(),
                "resamples": merged["resamples"].view(per_prompt).double().mean(1).cpu(),
                "num_particles": self.num_particles,
            },
        )

    @torch.no_grad()
    def log_weight_increments(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """The log-weights this sampler gives the given complete paths, step by step.

        For checking a twist or a proposal on chosen responses: the same decoding code as
        :meth:`sample`, fed the given tokens instead of sampled ones, without resampling.

        Args:
            prompts: B prompts (one per path).
            response_ids: ``[B, L]`` responses (L = ``max_new_tokens``), padded past ``lengths``.
            lengths: ``[B]`` response lengths n ≤ L (n = L: the stop at the cap is forced).
                Every token must have positive proposal probability.

        Returns:
            ``[B, L+1]`` float64: column 0 the initial log-weight ``log ψ(s_0)``, column k+1 the
            log incremental weight of the step from ``s_k`` (token ``y_{k+1}``, or ⊤ at k = n
            when n < L), 0 past the path's end. Each row sums to ``log G̃(y) − log q(y)``.
        """
        prompt_ids = encode_checked(self.target, prompts, self.max_new_tokens)
        width = self.max_new_tokens
        device = self.proposal.device
        response_ids, lengths = response_ids.to(device), lengths.to(device)
        if response_ids.shape != (len(prompt_ids), width) or lengths.shape != (len(prompt_ids),):
            raise ValueError(
                f"response_ids {tuple(response_ids.shape)} and lengths {tuple(lengths.shape)} "
                f"must be [{len(prompt_ids)}, {width}] and [{len(prompt_ids)}] (one per prompt, "
                "padded to max_new_tokens)"
            )
        if bool(((lengths < 0) | (lengths > width)).any()):
            raise ValueError(f"lengths must lie in [0, max_new_tokens={width}]")
        forced = torch.where(
            position_mask(lengths, width), response_ids, self.proposal.eos_token_id
        )
        return self._run(prompt_ids, None, forced=forced)["increments"]

    def _run(
        self,
        population_prompts: list[list[int]],
        generator: torch.Generator | None,
        forced: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch of G independent populations (one prompt each); one draw per population.

        ``forced`` ``[G, L]``: decode these tokens (EOS where a path stops) with one particle
        per population and no resampling, and return only the per-step log-weights.
        """
        populations = self._start(population_prompts, forced is not None)
        for step in range(self.max_new_tokens):
            token, going_on = self._extend(populations, step, generator, forced)
            if step == self.max_new_tokens - 1:
                break  # every live particle is now at s_L: forced stop, no factor, ψ(s_L) = 1
            in_state = self._look_ahead(populations, step, token, going_on)
            if not self._carry_on(populations, token, in_state, generator, forced is not None):
                break
        if populations.increments is not None:
            return {"increments": populations.increments}
        return self._pick(populations, generator)

    def _start(self, population_prompts: list[list[int]], forced: bool) -> _Populations:
        """Every particle at ``s_0`` (one per population when ``forced``), with ``γ_0 = ψ(s_0)``
        as its initial weight under a twist."""
        n = 1 if forced else self.num_particles
        width = self.max_new_tokens
        groups, device = len(population_prompts), self.proposal.device
        count = groups * n
        rows = [p for p in population_prompts for _ in range(n)]

        def zeros(size: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, device=device)

        populations = _Populations(
            prompts=population_prompts,
            n=n,
            response_ids=torch.full(
                (count, width), self.proposal.pad_token_id, dtype=torch.long, device=device
            ),
            lengths=zeros(count, torch.long),
            finished=zeros(count, torch.bool),
            log_w=zeros(count, torch.float64),  # since the last resampling
            path_log_target=zeros(count, torch.float64),
            log_z=zeros(groups, torch.float64),
            resamples=zeros(groups, torch.long),
            alive=torch.arange(count, device=device),  # global row of each state row
            log_psi=zeros(count, torch.float64),
            proposal_state=self.proposal.start(rows),
            target_state=self.target.start(rows) if self.weighting == "general" else None,
            increments=(
                torch.zeros(count, width + 1, dtype=torch.float64, device=device)
                if forced
                else None
            ),
        )
        if self.twist is not None:
            alive = populations.alive
            populations.log_psi[alive] = self._log_twist(
                population_prompts,
                alive // n,
                populations.response_ids[:, :0],
                populations.path_log_target,
                populations.proposal_state,
                populations.target_state,
            )
            # γ_0(s_0) = ψ(s_0): Ẑ estimates Σ_y G̃(y), not Z / ψ(s_0).
            populations.add(alive, populations.log_psi[alive], 0)
        return populations

    def _extend(
        self,
        populations: _Populations,
        step: int,
        generator: torch.Generator | None,
        forced: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (or read from ``forced``) each live particle's token at ``s_step`` and weight it;
        returns the tokens and which particles go on (did not stop)."""
        alive, eos = populations.alive, self.proposal.eos_token_id
        proposal_state = populations.proposal_state
        logp_q = proposal_state.next_logprobs
        if forced is None:
            token = torch.multinomial(logp_q.exp(), 1, generator=generator).squeeze(1)
        else:
            token = forced[alive, step]
        step_q = logp_q.gather(1, token[:, None]).squeeze(1).double()
        step_target = self._target_step(proposal_state, populations.target_state, token, step_q)
        increment = step_target - step_q
        if self.twist is not None:
            # ψ(s_k) leaves the potential whether the particle moves on or stops. Where it
            # is 0 the weight is already 0: keep it there (no −inf + inf).
            previous = populations.log_psi[alive]
            increment = increment - previous.masked_fill(torch.isneginf(previous), 0.0)
        populations.add(alive, increment, step + 1)
        populations.path_log_target[alive] += step_target
        going_on = token != eos
        populations.response_ids[alive[going_on], step] = token[going_on]
        populations.lengths[alive[going_on]] += 1
        populations.finished[alive[~going_on]] = True
        return token, going_on

    def _look_ahead(
        self, populations: _Populations, step: int, token: torch.Tensor, going_on: torch.Tensor
    ) -> torch.Tensor:
        """Under a twist, move the particles that go on to ``s_{step+1}`` (the potential needs
        their states before resampling) and weight them by ``ψ``; returns the global row of
        each state row (states at ``s_step`` without a twist: the token is not fed yet)."""
        alive = populations.alive
        if self.twist is None:
            return alive
        if not bool(going_on.any()):
            return alive[going_on]  # none: every particle has stopped
        moved = alive[going_on]
        populations.proposal_state, populations.target_state = self._advance(
            populations.proposal_state, populations.target_state, going_on, token[going_on]
        )
        psi = self._log_twist(
            populations.prompts,
            moved // populations.n,
            populations.response_ids[moved, : step + 1],
            populations.path_log_target[moved],
            populations.proposal_state,
            populations.target_state,
        )
        populations.add(moved, psi, step + 1)
        populations.log_psi[moved] = psi
        return moved

    def _carry_on(
        self,
        populations: _Populations,
        token: torch.Tensor,
        in_state: torch.Tensor,
        generator: torch.Generator | None,
        forced: bool,
    ) -> bool:
        """Resample the populations whose ESS fell (never when ``forced``), keep the states of
        the unfinished particles and feed them their token; False when none is left."""
        count, groups = len(populations.finished), len(populations.prompts)
        device = populations.log_w.device
        if not forced:
            self._check_alive(populations.log_w, groups)
        next_token = torch.full((count,), -1, dtype=torch.long, device=device)
        next_token[populations.alive] = token
        state_row = torch.full((count,), -1, dtype=torch.long, device=device)
        state_row[in_state] = torch.arange(len(in_state), device=device)
        ancestors = (
            None
            if forced
            else self._resample(
                populations.log_w, populations.log_z, populations.resamples, groups, generator
            )
        )
        if ancestors is not None:
            populations.reorder(ancestors, twisted=self.twist is not None)
            next_token, state_row = next_token[ancestors], state_row[ancestors]
        alive = populations.alive = (~populations.finished).nonzero().squeeze(1)
        if len(alive) == 0:
            return False
        keep = state_row[alive]
        if len(keep) != len(populations.proposal_state.next_logprobs) or bool(
            (keep != torch.arange(len(keep), device=device)).any()
        ):
            populations.select_states(keep)
        if self.twist is None:
            populations.proposal_state = self.proposal.advance(
                populations.proposal_state, next_token[alive]
            )
            if populations.target_state is not None:
                populations.target_state = self.target.advance(
                    populations.target_state, next_token[alive]
                )
        return True

    def _pick(
        self, populations: _Populations, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """One particle per population, ∝ its final weight, and the populations' ``log Ẑ``."""
        groups, n = len(populations.prompts), populations.n
        self._check_alive(populations.log_w, groups)
        by_group = populations.log_w.view(groups, n)
        populations.log_z += logmeanexp(by_group)
        pick = torch.multinomial(torch.softmax(by_group, 1), 1, generator=generator).squeeze(1)
        chosen = torch.arange(groups, device=by_group.device) * n + pick
        return {
            "response_ids": populations.response_ids[chosen],
            "lengths": populations.lengths[chosen],
            "log_target": populations.path_log_target[chosen].float(),
            "log_z": populations.log_z,
            "ess": effective_sample_size(by_group),
            "log_weights": by_group,
            "resamples": populations.resamples,
        }

    def _advance(
        self, proposal_state: Any, target_state: Any, going_on: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[Any, Any]:
        """States of the rows that go on (``going_on`` ``[B]`` mask), advanced by ``tokens``."""
        if not bool(going_on.all()):
            keep = going_on.nonzero().squeeze(1)
            proposal_state = proposal_state.select(keep)
            target_state = target_state.select(keep) if target_state is not None else None
        proposal_state = self.proposal.advance(proposal_state, tokens)
        if target_state is not None:
            target_state = self.target.advance(target_state, tokens)
        return proposal_state, target_state

    def _log_twist(
        self,
        population_prompts: list[list[int]],
        population: torch.Tensor,
        prefixes: torch.Tensor,
        log_target_prefix: torch.Tensor,
        proposal_state: Any,
        target_state: Any,
    ) -> torch.Tensor:
        """``log ψ(s_k)`` ``[B]`` float64 of the state rows; raises on NaN or ``+inf``."""
        log_psi = self.twist(
            TwistInputs(
                prompts=population_prompts,
                population=population,
                response_ids=prefixes,
                log_target_prefix=log_target_prefix,
                target_logprobs=self._target_logprobs(proposal_state, target_state),
                proposal_state=proposal_state,
                eos_token_id=self.proposal.eos_token_id,
            )
        )
        log_psi = torch.as_tensor(log_psi, device=log_target_prefix.device).double()
        if log_psi.shape != log_target_prefix.shape:
            raise ValueError(
                f"the twist returned shape {tuple(log_psi.shape)}; it must return log ψ of "
                f"each state, shape {tuple(log_target_prefix.shape)}"
            )
        if bool((torch.isnan(log_psi) | torch.isposinf(log_psi)).any()):
            raise ValueError(
                "the twist returned NaN or +inf: log ψ must be finite, or -inf where the target "
                "has no mass below the state"
            )
        return log_psi

    def _target_logprobs(self, proposal_state: Any, target_state: Any) -> torch.Tensor:
        """The target's step log-scores ``log g(·|s_k)`` ``[B, V]`` at the state rows."""
        if self.weighting == "exact":
            return proposal_state.next_logprobs
        if self.weighting == "local_product":
            return proposal_state.next_logprobs + proposal_state.log_z_local[:, None]
        if self.weighting == "components":
            return self._from_components(proposal_state)
        return target_state.next_logprobs

    def _from_components(self, proposal_state: Any) -> torch.Tensor:
        """The target's step scores ``Σ_c w_c log π_c(·|s)`` from the proposal's component states."""
        return weighted_logsum(
            [s.next_logprobs for s in proposal_state.components], self.target.weights
        )

    def _target_step(
        self, proposal_state: Any, target_state: Any, token: torch.Tensor, step_q: torch.Tensor
    ) -> torch.Tensor:
        """The target's step score ``log g(v|s_k)`` of each sampled token (EOS included)."""
        if self.weighting == "exact":
            return step_q
        if self.weighting == "local_product":
            return step_q + proposal_state.log_z_local.double()
        if self.weighting == "components":
            scores = self._from_components(proposal_state)
            return scores.gather(1, token[:, None]).squeeze(1).double()
        return target_state.next_logprobs.gather(1, token[:, None]).squeeze(1).double()

    def _resample(
        self,
        log_w: torch.Tensor,
        log_z: torch.Tensor,
        resamples: torch.Tensor,
        groups: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor | None:
        """Resample the populations whose ESS < threshold·N in place; global ancestor rows or None."""
        n = self.num_particles
        by_group = log_w.view(groups, n)
        low = (effective_sample_size(by_group) < self.ess_threshold * n).nonzero().squeeze(1)
        if len(low) == 0:
            return None
        picks = torch.multinomial(
            torch.softmax(by_group[low], 1), n, replacement=True, generator=generator
        )
        ancestors = torch.arange(groups * n, device=log_w.device).view(groups, n)
        ancestors[low] = low[:, None] * n + picks
        log_z[low] += logmeanexp(by_group[low])
        resamples[low] += 1
        by_group[low] = 0.0  # a view of log_w: weights restart at 1 after resampling
        return ancestors.flatten()

    def _check_alive(self, log_w: torch.Tensor, groups: int) -> None:
        dead = torch.isneginf(log_w.view(groups, self.num_particles)).all(1)
        if bool(dead.any()):
            raise RuntimeError(
                f"{int(dead.sum())} SMC population(s) have all weights zero (the target gives "
                "zero density to every particle): use a proposal whose support covers the "
                "target's, or more particles"
            )
