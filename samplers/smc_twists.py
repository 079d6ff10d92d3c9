"""Twists for SMC: the look-ahead ψ of the intermediate potentials ``g̃(y_{1:k})·ψ(s_k)``.

For users of :class:`samplers.SMCSampler` who bring a learned twist (a GFlowNet's prefix flow,
a twist head): what a twist sees (:class:`TwistInputs`), what it returns (:data:`Twist`), and
the prefix flow of modified SubTB as a ready twist (:func:`flow_twist`). The potentials and why
any positive twist keeps ``Ẑ`` unbiased are in :mod:`samplers.smc`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gfn_spin.density import DecodeState


@dataclass(frozen=True)
class TwistInputs:
    """What a twist sees: B particles, all at states ``s_k`` of the same length k (k < L).

    Attributes:
        prompts: the prompt token ids of each population in the batch.
        population: ``[B]`` index into ``prompts`` of each particle.
        response_ids: ``[B, k]`` the particles' prefixes ``y_{1:k}`` (no EOS inside).
        log_target_prefix: ``[B]`` float64, ``log g̃(y_{1:k}) = Σ_{j<k} log g(y_{j+1}|s_j)``.
        target_logprobs: ``[B, V]`` the target's step log-scores ``log g(·|s_k)`` (unnormalized
            for a geometric mixture; ``target_logprobs[:, eos]`` is its stop score).
        proposal_state: the proposal's decode state at ``s_k`` (``next_logprobs [B, V]``, and
            whatever the proposal carries: caches, component states).
        eos_token_id: the EOS (⊤) token id.
    """

    prompts: list[list[int]]
    population: torch.Tensor
    response_ids: torch.Tensor
    log_target_prefix: torch.Tensor
    target_logprobs: torch.Tensor
    proposal_state: DecodeState
    eos_token_id: int


#: A twist: ``log ψ(s_k)`` ``[B]`` of the states in :class:`TwistInputs` (``-inf`` allowed where
#: the target has no mass below ``s_k``; NaN and ``+inf`` are errors). The potential is
#: ``log g̃(y_{1:k}) + log ψ(s_k)``, so a twist is relative to the target's prefix product: a
#: learned twist head predicts ``log Σ_{y ⊒ s_k} G̃(y) − log g̃(y_{1:k})`` (the log of the
#: expected product of the target's remaining step-score normalizers).
Twist = Callable[[TwistInputs], torch.Tensor]


def flow_twist(inputs: TwistInputs) -> torch.Tensor:
    """The modified-SubTB prefix flow as a twist: ``log ψ(s) = log g(⊤|s) − log q(⊤|s)``.

    The potential ``log g̃(y_{1:k}) + log ψ(s_k) = log R(s_k⊤) − log q(⊤|s_k) = log F(s_k)``: a
    GFlowNet policy at zero SubTB loss has ``F(s_k) = Σ_{y ⊒ s_k} G̃(y)``, the optimal potential.
    Where the flow is not a usable potential (the target forbids stopping at s, or the proposal
    never stops there), ψ = 1: any positive twist keeps ``Ẑ`` unbiased, a zero one would not.
    Returns ``[B]`` float64.
    """
    eos = inputs.eos_token_id
    log_psi = (
        inputs.target_logprobs[:, eos].double()
        - inputs.proposal_state.next_logprobs[:, eos].double()
    )
    return torch.where(torch.isfinite(log_psi), log_psi, 0.0)


TWISTS: dict[str, Twist] = {"flow": flow_twist}


def resolve_twist(twist: str | Twist | None) -> Twist | None:
    """The twist callable for ``SMCSampler(twist=...)``; raises on an unknown name or type."""
    if twist is None or callable(twist):
        return twist
    if isinstance(twist, str) and twist in TWISTS:
        return TWISTS[twist]
    raise ValueError(
        f"twist={twist!r} must be None (the target's prefix as potential), one of "
        f"{sorted(TWISTS)}, or a callable TwistInputs -> log ψ [B] (see samplers.smc_twists.Twist)"
    )
