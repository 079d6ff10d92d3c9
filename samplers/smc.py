"""Sequential Monte Carlo toward a geometric mixture (or any density), token by token.

Particles extend from an autoregressive proposal q; at every step each particle's weight is
multiplied by the incremental weight ``g(v|s_k) / q(v|s_k)``, where g are the target's step
scores and v the sampled token (⊤ included: a particle that emits EOS is finished). With the
local product as proposal this is ``Z_loc(s_k)`` whatever v is (DESIGN §2), so weights are known
before the token is drawn. The stop at the cap L is forced, with no factor (``Z_loc(s_L) = 1``).
When a population's ESS falls under ``ess_threshold · N`` it is resampled (multinomial);
finished particles keep their weight, stop extending, and take part in resampling (a copy of a
finished particle stays finished).

``Ẑ = Π_epochs mean(w)`` (product over resampling epochs of the mean weight) is an unbiased
estimate of the target's normalizer ``Z``; ``log Ẑ`` is biased low (Jensen). The law of a draw
picked ∝ w from the final population tends to the target as N → ∞ (consistent, biased at
finite N, first order O(1/N)); without resampling it is exactly SIR with K = N.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from gfn_spin.density import Density, PromptLike
from gfn_spin.devices import resolve_generator
from gfn_spin.samples import Samples, check_count
from samplers.base import Sampler
from samplers.weighting import (
    check_proposal,
    default_proposal,
    effective_sample_size,
    encode_checked,
    is_local_product_of,
    logmeanexp,
    model_tokens,
)


class SMCSampler(Sampler):
    """Sequential Monte Carlo with adaptive multinomial resampling and an unbiased ``Ẑ``.

    Use it for a geometric mixture when the local product (the default proposal) drifts from
    the target over long responses: resampling prunes particles whose prefixes the target
    dislikes, which SIR cannot do. Use :class:`~samplers.ImportanceResampler` when the proposal
    is already close (ESS/K high), :class:`~samplers.ExactSampler` on tiny worlds.

    ``num_samples`` semantics: each output draw comes from its own independent population of
    ``num_particles`` particles (one particle picked ∝ its final weight), so draws are
    independent and their law tends to the target as N grows. All particles of all populations
    and prompts are extended in one batch per step (``batch_size`` caps a batch; populations
    are never split). Cost in model tokens per draw: ``N·(|x| + n̄)`` per proposal component,
    plus the same per target component when the proposal is neither the target's local product
    nor the target itself (then the target's step scores are needed too). No teacher-forced
    pass is needed: ``log_target`` is accumulated along each particle's path.

    A population whose weights all become zero (the target forbids every particle) cannot
    produce a draw: ``sample`` raises a RuntimeError.

    ``stats``: "log_z" ``[P]`` (``log`` of the mean over the prompt's populations of ``Ẑ``),
    "log_z_populations" ``[P, num_samples]`` (each population's ``log Ẑ``), "ess" ``[P]``
    (ESS of the final weights, mean over populations), "resamples" ``[P]`` (mean resampling
    steps per population), "tokens", "seconds", "num_particles".

    Args:
        target: the density to sample (a GeometricMixture typically; any density works).
        num_particles: N, particles per population.
        proposal: a normalized density; None uses the target's local product (or the target
            itself when it is normalized).
        ess_threshold: resample a population when its ESS < ``ess_threshold · N`` (0: never,
            which is SIR; 1: at every step).
        max_new_tokens: the length cap L.
        batch_size: particles per batch (whole populations; at least one population).
    """

    def __init__(
        self,
        target: Density,
        num_particles: int,
        *,
        proposal: Density | None = None,
        ess_threshold: float = 0.5,
        max_new_tokens: int,
        batch_size: int = 65536,
    ) -> None:
        self.target = target
        self.proposal = check_proposal(
            target, default_proposal(target) if proposal is None else proposal
        )
        self.num_particles = check_count("num_particles", num_particles)
        if not 0.0 <= float(ess_threshold) <= 1.0:
            raise ValueError(f"ess_threshold={ess_threshold} must be in [0, 1]")
        self.ess_threshold = float(ess_threshold)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        self.batch_size = check_count("batch_size", batch_size)
        if self.proposal is target:
            self._weighting = "exact"  # the proposal is the (normalized) target: w ≡ 1
        elif is_local_product_of(self.proposal, target):
            self._weighting = "local_product"  # w = Z_loc(s_k), no target states needed
        else:
            self._weighting = "general"

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        *,
        generator: torch.Generator | int | None = None,
    ) -> Samples:
        check_count("num_samples", num_samples)
        prompt_ids = encode_checked(self.target, prompts)
        started, tokens_before = time.perf_counter(), model_tokens(self.target, self.proposal)
        device = self.proposal.device
        generator = resolve_generator(generator, device)
        populations = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
        per_batch = max(1, self.batch_size // self.num_particles)

        results = [
            self._run([prompt_ids[i] for i in populations[lo : lo + per_batch]], generator)
            for lo in range(0, len(populations), per_batch)
        ]
        merged = {key: torch.cat([r[key] for r in results]) for key in results[0]}
        per_prompt = (len(prompt_ids), num_samples)
        log_z_populations = merged["log_z"].view(per_prompt).cpu()
        response_ids, lengths = merged["response_ids"], merged["lengths"]
        return Samples(
            prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(
                num_samples
            ),
            response_ids=response_ids,
            lengths=lengths,
            texts=self.target.decode(response_ids, lengths),
            log_q=None,
            log_target=merged["log_target"],
            stats={
                "ess": merged["ess"].view(per_prompt).mean(1).cpu(),
                "log_z": logmeanexp(log_z_populations),
                "log_z_populations": log_z_populations,
                "resamples": merged["resamples"].view(per_prompt).double().mean(1).cpu(),
                "tokens": model_tokens(self.target, self.proposal) - tokens_before,
                "seconds": time.perf_counter() - started,
                "num_particles": self.num_particles,
            },
        )

    def _run(
        self, population_prompts: list[list[int]], generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """One batch of G independent populations (one prompt each); one draw per population."""
        n, width = self.num_particles, self.max_new_tokens
        groups, device = len(population_prompts), self.proposal.device
        count, eos = groups * n, self.proposal.eos_token_id
        pad = self.proposal.pad_token_id
        rows = [p for p in population_prompts for _ in range(n)]

        response_ids = torch.full((count, width), pad, dtype=torch.long, device=device)
        lengths = torch.zeros(count, dtype=torch.long, device=device)
        finished = torch.zeros(count, dtype=torch.bool, device=device)
        log_w = torch.zeros(count, dtype=torch.float64, device=device)  # since last resampling
        path_log_target = torch.zeros(count, dtype=torch.float64, device=device)
        log_z = torch.zeros(groups, dtype=torch.float64, device=device)
        resamples = torch.zeros(groups, dtype=torch.long, device=device)
        alive = torch.arange(count, device=device)  # global row of each state row
        proposal_state = self.proposal.start(rows)
        target_state = self.target.start(rows) if self._weighting == "general" else None

        for step in range(width):
            logp_q = proposal_state.next_logprobs
            token = torch.multinomial(logp_q.exp(), 1, generator=generator).squeeze(1)
            step_q = logp_q.gather(1, token[:, None]).squeeze(1).double()
            step_target = self._target_step(proposal_state, target_state, token, step_q)
            log_w[alive] += step_target - step_q
            path_log_target[alive] += step_target
            going_on = token != eos
            response_ids[alive[going_on], step] = token[going_on]
            lengths[alive[going_on]] += 1
            finished[alive[~going_on]] = True
            if step == width - 1:
                break  # every live particle is now at s_L: forced stop, Z_loc(s_L) = 1
            self._check_alive(log_w, groups)

            next_token = torch.full((count,), -1, dtype=torch.long, device=device)
            next_token[alive] = token
            state_row = torch.full((count,), -1, dtype=torch.long, device=device)
            state_row[alive] = torch.arange(len(alive), device=device)
            ancestors = self._resample(log_w, log_z, resamples, groups, generator)
            if ancestors is not None:
                response_ids, lengths = response_ids[ancestors], lengths[ancestors]
                finished, path_log_target = finished[ancestors], path_log_target[ancestors]
                next_token, state_row = next_token[ancestors], state_row[ancestors]
            alive = (~finished).nonzero().squeeze(1)
            if len(alive) == 0:
                break
            keep = state_row[alive]
            if len(keep) != len(proposal_state.next_logprobs) or bool(
                (keep != torch.arange(len(keep), device=device)).any()
            ):
                proposal_state = proposal_state.select(keep)
                target_state = target_state.select(keep) if target_state is not None else None
            proposal_state = self.proposal.advance(proposal_state, next_token[alive])
            if target_state is not None:
                target_state = self.target.advance(target_state, next_token[alive])

        self._check_alive(log_w, groups)
        by_group = log_w.view(groups, n)
        log_z += logmeanexp(by_group)
        pick = torch.multinomial(torch.softmax(by_group, 1), 1, generator=generator).squeeze(1)
        chosen = torch.arange(groups, device=device) * n + pick
        return {
            "response_ids": response_ids[chosen],
            "lengths": lengths[chosen],
            "log_target": path_log_target[chosen].float(),
            "log_z": log_z,
            "ess": effective_sample_size(by_group),
            "resamples": resamples,
        }

    def _target_step(
        self, proposal_state: Any, target_state: Any, token: torch.Tensor, step_q: torch.Tensor
    ) -> torch.Tensor:
        """The target's step score ``log g(v|s_k)`` of each sampled token (EOS included)."""
        if self._weighting == "exact":
            return step_q
        if self._weighting == "local_product":
            return step_q + proposal_state.log_z_local.double()
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
