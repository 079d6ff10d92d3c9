"""Sampling-importance-resampling (SIR) toward any target, from any autoregressive proposal.

For each output draw, K candidates are drawn from the proposal q, weighted by
``log w = log G̃(y) − log q(y)`` (G̃ the unnormalized target) and one is picked with probability
``∝ w``. Draws are independent (fresh candidates for each draw) and their law tends to the
target as K → ∞; at finite K it is biased toward q, to first order by ``ρ/K`` in total variation
with ``ρ = E_q[(w/Z)²] = 1 + χ²(target ‖ q)``. ``logmeanexp(log w)`` is a consistent estimate of
``log Z`` (``mean(w)`` is unbiased for ``Z``).
"""

from __future__ import annotations

from typing import Literal

import torch

from gfn_spin.density import Density
from gfn_spin.samples import ancestral_sample, check_count
from samplers.base import Draws, ProposalSampler
from samplers.smc import SMCSampler
from samplers.weighting import (
    effective_sample_size,
    is_local_product_of,
    is_residual_on_local_product_of,
    logmeanexp,
)

#: How SIR gets its log-weights: see :class:`ImportanceResampler`'s ``weights_from``.
WeightSource = Literal["auto", "decoding", "scoring"]


class ImportanceResampler(ProposalSampler):
    """Sampling-importance-resampling from an autoregressive ``proposal`` toward ``target``.

    Use it when the target is a geometric mixture (or any unnormalized density) and a proposal
    close to it exists (the local product, π_t at α near 1, a trained GFlowNet): it needs no
    training and gives an unbiased ``Ẑ`` and an ESS that says how good the proposal is. It is
    consistent in K but biased at finite K (first order ``ρ/K`` in TV, see the module
    docstring); prefer :class:`~samplers.SMCSampler` when the proposal is poor at long lengths.

    Each of the ``num_samples`` draws per prompt gets ``num_candidates`` fresh candidates (so
    draws are independent). Cost in model tokens per draw: ``K·(|x| + n̄)`` per proposal
    component for sampling plus the same per target component for one teacher-forced scoring
    pass (``n̄`` the mean candidate length). With the target's local product as proposal (the
    default for a geometric mixture), or a policy on it whose states carry the components' (a
    twist, prompt-twist or residual GFlowNet's ``.policy``), there is no scoring pass: the
    weights are accumulated while decoding, exactly as :class:`~samplers.SMCSampler` does with
    resampling switched off.

    If every candidate of a draw has zero target density (all log-weights ``-inf``) no draw is
    possible and ``sample`` raises a RuntimeError (give a proposal whose support covers the
    target's, or more candidates); single ``-inf`` weights are fine.

    ``stats``: ``ess`` ``[P]`` (absolute ESS of a block of K, averaged over the prompt's
    blocks; K when the proposal is the target; ``ess_fraction`` is it over K), ``log_z``
    ``[P]`` (``logmeanexp`` of all the prompt's ``num_samples·K`` log-weights),
    ``log_z_populations`` ``[P, num_samples]`` (each draw's own ``log Ẑ`` from its K candidates,
    independent across draws), ``log_weights`` ``[P, num_samples, K]`` (every candidate's),
    ``tokens``, ``seconds``, ``num_candidates``.

    Args:
        target: the density to sample (any density; unnormalized is fine).
        proposal: a normalized density; None uses the target's local product (or the target
            itself when it is normalized).
        num_candidates: K, candidates per output draw.
        max_new_tokens: the length cap L.
        batch_size: candidates per decoding/scoring batch (bounds memory; whole blocks of K).
        weights_from: "decoding" (the proposal is the target's local product or a policy on it:
            the weights accumulate while decoding, no scoring pass), "scoring" (decode, then one
            teacher-forced target pass over the candidates; any proposal), or "auto" (decoding
            where it applies).
    """

    def __init__(
        self,
        target: Density,
        proposal: Density | None,
        num_candidates: int,
        *,
        max_new_tokens: int,
        batch_size: int = 8192,
        weights_from: WeightSource = "auto",
    ) -> None:
        super().__init__(target, proposal)
        self.num_candidates = check_count("num_candidates", num_candidates)
        self.max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        self.batch_size = check_count("batch_size", batch_size)
        # With the target's own local product as proposal, log w = Σ_k log Z_loc(s_k) is known
        # while decoding, and a policy on it carries the components' step scores: SIR is then
        # SMC that never resamples, and skips the teacher-forced scoring pass (about three
        # quarters of SIR's time on the tiny world).
        local = is_local_product_of(self.proposal, target) or is_residual_on_local_product_of(
            self.proposal, target
        )
        if weights_from == "auto":
            weights_from = "decoding" if local else "scoring"
        if weights_from not in ("decoding", "scoring") or (
            weights_from == "decoding" and not local
        ):
            raise ValueError(
                f"weights_from={weights_from!r} must be 'auto', 'scoring', or 'decoding' (only "
                "with the target's local product, or a policy on it, as proposal)"
            )
        self.weights_from: WeightSource = weights_from
        # SMC that never resamples: the same candidates and weights, accumulated while decoding.
        self._decoder = (
            SMCSampler(
                target,
                num_candidates,
                proposal=self.proposal,
                ess_threshold=0.0,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            if weights_from == "decoding"
            else None
        )

    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        if self._decoder is not None:
            draws = self._decoder.populations(prompt_ids, num_samples, generator)
            keep = ("ess", "ess_fraction", "log_z", "log_z_populations", "log_weights")
            stats = {key: draws.stats[key] for key in keep}
            draws.stats = {**stats, "num_candidates": self.num_candidates}
            return draws
        device = self.proposal.device
        k = self.num_candidates
        blocks = [i for i in range(len(prompt_ids)) for _ in range(num_samples)]
        per_batch = max(1, self.batch_size // k)

        log_weights, chosen_ids, chosen_lengths, chosen_target = [], [], [], []
        for lo in range(0, len(blocks), per_batch):
            part = blocks[lo : lo + per_batch]
            rows = [prompt_ids[i] for i in part for _ in range(k)]
            candidates = ancestral_sample(
                self.proposal, rows, 1, max_new_tokens=self.max_new_tokens, generator=generator
            )
            log_target = self.target.log_prob(rows, candidates.response_ids, candidates.lengths).to(
                device
            )
            log_w = (log_target - candidates.log_q).view(len(part), k)
            dead = torch.isneginf(log_w).all(1)
            if bool(dead.any()):
                raise RuntimeError(
                    f"all {k} candidates of {int(dead.sum())} draw(s) have zero target density "
                    "(log-weights all -inf): use a proposal whose support covers the target's "
                    "or raise num_candidates"
                )
            pick = torch.multinomial(torch.softmax(log_w, 1), 1, generator=generator).squeeze(1)
            row = torch.arange(len(part), device=device) * k + pick
            log_weights.append(log_w)
            chosen_ids.append(candidates.response_ids[row])
            chosen_lengths.append(candidates.lengths[row])
            chosen_target.append(log_target[row])

        log_w = torch.cat(log_weights).view(len(prompt_ids), num_samples, k).double()
        ess = effective_sample_size(log_w).mean(1).cpu()
        return Draws(
            torch.cat(chosen_ids),
            torch.cat(chosen_lengths),
            log_target=torch.cat(chosen_target),
            stats={
                "ess": ess,
                "ess_fraction": ess / k,
                "log_z": logmeanexp(log_w.flatten(1)).cpu(),
                "log_z_populations": logmeanexp(log_w).cpu(),
                "log_weights": log_w.cpu(),
                "num_candidates": k,
            },
        )
