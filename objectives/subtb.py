"""The GFlowNet balance losses for language models, as pure tensor functions.

For whom: the GFlowNet sampler's training step (and anyone training an
autoregressive policy q toward an unnormalized target R over responses).
Every state can terminate, the generation graph is a tree (P_B = 1) and state
flows are derived, not learned (DESIGN §4):

    log F̂(s_k) = log R(s_k⊤) / T − log q(⊤ | s_k)

Shapes (DESIGN §1), B trajectories, length cap L:

    log_pf     [B, L]    log q(y_{k+1} | s_k), 0 past n_b
    log_pterm  [B, L+1]  log q(⊤ | s_k), 0 past n_b and at k = L (forced stop)
    log_reward [B, L+1]  log R(s_k⊤), the target's unnormalized prefix-terminal
                         log-density; values past n_b are ignored
    lengths    [B]       n_b in 0..L (integer)

Every residual of the family is a difference of one per-state potential

    A_k = log F̂(s_k) − Σ_{m<k} log q(y_{m+1} | s_m)

because r_ij = log F̂(s_i) + Σ_{k=i}^{j-1} log q(y_{k+1}|s_k) − log F̂(s_j) = A_i − A_j.
Sub-trajectory balance uses every pair i < j ≤ n_b, modified detailed balance
the pairs j = i + 1, trajectory balance the pair (log Z, n_b).

-inf handling. A target may forbid a prefix (log R(s_k⊤) = -inf). Its flow
would be -inf and every residual touching it infinite (inf/NaN loss, NaN
gradients). The tempered log-reward is instead floored at a finite value set
FORBIDDEN_LOG_REWARD_MARGIN nats below the smallest finite tempered
log-reward of the batch, so the forbidden terminal is e^-30 ≈ 1e-13 times
less likely than the least likely allowed one: "zero" for every practical
purpose, while residuals (and gradients) stay of the size of the batch's own
reward spread. Those residuals push log q(⊤ | s_k) down at the forbidden
state. Policy log-probabilities are clamped at POLICY_LOGPROB_FLOOR, which
only ever touches masked (-inf) tokens. Values past n_b go through
torch.where before any arithmetic, so no garbage there can leak into values
or gradients.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FORBIDDEN_LOG_REWARD_MARGIN",
    "POLICY_LOGPROB_FLOOR",
    "WEIGHTINGS",
    "balance_potentials",
    "modified_db_loss",
    "modified_subtb_loss",
    "subtb_pair_weights",
    "trajectory_balance_loss",
]

WEIGHTINGS = ("batch", "geometric_within")
"""Valid `weighting` values of `modified_subtb_loss`."""

FORBIDDEN_LOG_REWARD_MARGIN = 30.0
"""Nats below the batch's smallest finite tempered log-reward at which a
forbidden (-inf) log-reward is floored by default."""

POLICY_LOGPROB_FLOOR = -1e3
"""Clamp for policy log-probabilities: e^-1000 is zero for every practical
purpose, and the log-softmax of real logits stays far above it, so only
masked (-inf) tokens are affected."""


def _check_inputs(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    reward_temperature: float,
) -> None:
    if log_pf.dim() != 2:
        raise ValueError(f"log_pf must have shape [B, L]; got shape {tuple(log_pf.shape)}")
    batch, cap = log_pf.shape
    if batch == 0:
        raise ValueError("log_pf has an empty batch (B = 0); pass at least one trajectory")
    expected = {
        "log_pterm": (log_pterm, (batch, cap + 1)),
        "log_reward": (log_reward, (batch, cap + 1)),
        "lengths": (lengths, (batch,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but log_pf has shape "
                f"{tuple(log_pf.shape)} = [B, L], so {name} must have shape {shape}"
            )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor; got dtype {lengths.dtype}")
    if not (reward_temperature > 0 and math.isfinite(reward_temperature)):
        raise ValueError(f"reward_temperature must be finite and > 0; got {reward_temperature}")


def _log_reward_floor(
    tempered: torch.Tensor, state_valid: torch.Tensor, log_reward_floor: float | None
) -> torch.Tensor | float:
    """The value below which tempered log-rewards are clamped (see module docstring)."""
    if log_reward_floor is not None:
        return log_reward_floor
    tempered = tempered.detach()
    finite = state_valid & torch.isfinite(tempered)
    smallest = torch.where(finite, tempered, math.inf).amin()
    # A batch without any finite valid log-reward anchors the floor at 0.
    smallest = torch.where(torch.isfinite(smallest), smallest, 0.0)
    return smallest - FORBIDDEN_LOG_REWARD_MARGIN


def balance_potentials(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-state potentials A_k whose differences are the balance residuals.

    For the three losses of this module (and any other pairing of states):
    A_k = log R(s_k⊤)/T − log q(⊤|s_k) − Σ_{m<k} log q(y_{m+1}|s_m), so that
    r_ij = A_i − A_j for every 0 ≤ i < j ≤ n_b.

    Args:
        log_pf: [B, L] token log-probabilities of the policy q.
        log_pterm: [B, L+1] stop log-probabilities of q.
        log_reward: [B, L+1] target prefix-terminal log-densities; -inf allowed.
        lengths: [B] integer n_b in 0..L (not range-checked: that would cost a
            device synchronization on every step).
        reward_temperature: T > 0; the target is R^(1/T).
        log_reward_floor: clamp for tempered log-rewards. None (default): the
            batch's smallest finite valid tempered log-reward minus
            FORBIDDEN_LOG_REWARD_MARGIN, which only changes -inf entries. A
            float: that absolute value (it clamps finite values too).

    Returns:
        potentials: [B, L+1], finite everywhere, 0 past n_b.
        state_valid: [B, L+1] bool, True where the state s_k exists (k ≤ n_b).
    """
    _check_inputs(log_pf, log_pterm, log_reward, lengths, reward_temperature)
    cap = log_pf.shape[1]
    positions = torch.arange(cap + 1, device=lengths.device)
    state_valid = positions.unsqueeze(0) <= lengths.unsqueeze(1)
    step_valid = state_valid[:, 1:]  # transition s_k -> s_{k+1} exists iff k + 1 <= n_b

    # torch.where, not a multiplied mask: 0 * inf would be NaN in values and gradients.
    log_pf = torch.where(step_valid, log_pf, 0.0).clamp_min(POLICY_LOGPROB_FLOOR)
    log_pterm = torch.where(state_valid, log_pterm, 0.0).clamp_min(POLICY_LOGPROB_FLOOR)
    tempered = torch.where(state_valid, log_reward, 0.0) / reward_temperature
    tempered = torch.clamp(tempered, min=_log_reward_floor(tempered, state_valid, log_reward_floor))

    log_flow = tempered - log_pterm
    prefix_logprob = torch.cat([log_pf.new_zeros(log_pf.shape[0], 1), log_pf.cumsum(dim=1)], dim=1)
    potentials = torch.where(state_valid, log_flow - prefix_logprob, 0.0)
    return potentials, state_valid


def subtb_pair_weights(
    lengths: torch.Tensor,
    max_len: int,
    subtb_lambda: float,
    weighting: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized SubTB pair weights λ^(j-i-1) on valid pairs, in factored form.

    The weight of pair (i, j) of trajectory b is
    ``pair_weights[i, j] * end_weights[b, j]``: a matrix shared by the batch
    and a per-trajectory factor on the end state (which also holds the mask
    j ≤ n_b), so no [B, L+1, L+1] weight tensor is ever built.

    Args:
        lengths: [B] integer n_b.
        max_len: the length cap L.
        subtb_lambda: λ ≥ 0.
        weighting: one of WEIGHTINGS; decides the rescaling used when λ > 1.
        dtype: floating dtype of the result.

    Returns:
        pair_weights: [L+1, L+1], zero unless i < j.
        end_weights: [B, L+1], zero unless j ≤ n_b.
        For λ ≤ 1 the products are exactly λ^(j-i-1). For λ > 1 that
        overflows on long trajectories, so they are divided by λ^(N-1), with N
        the trajectory's own length ("geometric_within") or the batch's longest
        ("batch"): λ^(j-i-1-(N-1)) = μ^i · μ^(N-j) with μ = 1/λ, both factors ≤ 1.
        Both losses are ratios of weighted sums, so the rescaling leaves them
        unchanged, and the largest weight of each normalizer is exactly 1.
    """
    positions = torch.arange(max_len + 1, device=lengths.device)
    starts, ends = positions.to(dtype).unsqueeze(1), positions.to(dtype).unsqueeze(0)
    is_pair = starts < ends
    end_valid = positions.unsqueeze(0) <= lengths.unsqueeze(1)
    if subtb_lambda <= 1.0:
        pair_weights = torch.where(is_pair, torch.pow(subtb_lambda, ends - starts - 1), 0.0)
        return pair_weights, end_valid.to(dtype)
    shrink = 1.0 / subtb_lambda
    pair_weights = torch.where(is_pair, torch.pow(shrink, starts).expand_as(is_pair), 0.0)
    longest = lengths.amax() if weighting == "batch" else lengths
    steps_to_longest = (longest.to(dtype).reshape(-1, 1) - ends).clamp_min(0.0)
    return pair_weights, torch.where(end_valid, torch.pow(shrink, steps_to_longest), 0.0)


def modified_subtb_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    subtb_lambda: float = 1.0,
    weighting: str = "batch",
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Modified sub-trajectory balance loss (DESIGN §4), vectorized over pairs in O(B·L) memory.

    Loss = Σ_b Σ_{i<j≤n_b} λ^(j-i-1) r_ij² / normalizer, where
    "batch" normalizes by Σ_b Σ_{i<j≤n_b} λ^(j-i-1) (the published LM recipe)
    and "geometric_within" normalizes each trajectory by its own weight sum,
    then averages over the trajectories with n_b ≥ 1 (torchgfn's default).

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring.
        subtb_lambda: λ ≥ 0, the geometric discount on sub-trajectory length
            (λ = 0 keeps only one-step pairs, i.e. modified detailed balance).
        weighting: "batch" or "geometric_within".
        reward_temperature: T > 0; the target is R^(1/T).
        log_reward_floor: see `balance_potentials`.

    Returns:
        A scalar tensor. When no trajectory has a pair (all n_b = 0) it is 0,
        still connected to the inputs' graph.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if not (subtb_lambda >= 0 and math.isfinite(subtb_lambda)):
        raise ValueError(f"subtb_lambda must be finite and >= 0; got {subtb_lambda}")
    potentials, state_valid = balance_potentials(
        log_pf,
        log_pterm,
        log_reward,
        lengths,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    # Σ_{i<j} w_ij e_j (A_i − A_j)², expanded so that no [B, L+1, L+1] tensor is built:
    #   Σ_i A_i² (e Wᵀ)_i + Σ_j e_j A_j² colsum(W)_j − 2 Σ_j e_j A_j (A W)_j.
    # The expansion cancels when the A_k are large next to their differences; centring each
    # trajectory on its valid states (residuals are shift-invariant) bounds the terms by the
    # residuals themselves. The centre is detached: a common shift has zero gradient.
    centre = potentials.detach().sum(dim=1, keepdim=True) / state_valid.sum(dim=1, keepdim=True)
    # CUDA may run float32 products in TF32 (10-bit mantissa) and autocast in bf16: these
    # products are tiny, so they run in float64 there, and never under autocast.
    dtype = torch.float64 if potentials.device.type == "cuda" else potentials.dtype
    with torch.autocast(potentials.device.type, enabled=False):
        centred = (potentials - centre).to(dtype)
        pair_weights, end_weights = subtb_pair_weights(
            lengths, log_pf.shape[1], subtb_lambda, weighting, dtype=dtype
        )
        start_totals = end_weights @ pair_weights.T  # [B, L+1]: Σ_j w_ij e_j per start i
        end_totals = end_weights * pair_weights.sum(dim=0)  # [B, L+1]: e_j Σ_i w_ij per end j
        cross = centred @ pair_weights  # [B, L+1]: Σ_i w_ij A_i per end j
        per_state = centred * (start_totals + end_totals) - 2.0 * end_weights * cross
        weighted = (centred * per_state).sum(dim=1).to(potentials.dtype)  # [B]
        normalizer = end_totals.sum(dim=1).to(potentials.dtype)  # [B]
    # Any normalizer with a pair holds a weight equal to 1 (see subtb_pair_weights),
    # so clamping at 1 only turns 0/0 (no pair at all) into 0.
    if weighting == "batch":
        return weighted.sum() / normalizer.sum().clamp_min(1.0)
    per_trajectory = weighted / normalizer.clamp_min(1.0)
    return per_trajectory.sum() / (lengths >= 1).sum().clamp_min(1)


def modified_db_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Modified detailed balance (Deleu et al., 2022) for all-states-terminal trees.

    Mean over all valid transitions k -> k+1 (k < n_b) of the batch of
    (log F̂(s_k) + log q(y_{k+1}|s_k) − log F̂(s_{k+1}))², i.e. the SubTB
    pairs j = i + 1 only (equal to modified_subtb_loss with λ = 0, "batch"),
    computed in O(B·L) instead of O(B·L²).

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring.
        reward_temperature: T > 0; the target is R^(1/T).
        log_reward_floor: see `balance_potentials`.

    Returns:
        A scalar tensor (0, connected to the graph, if there is no transition).
    """
    potentials, state_valid = balance_potentials(
        log_pf,
        log_pterm,
        log_reward,
        lengths,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    residuals = potentials[:, :-1] - potentials[:, 1:]  # r_{k,k+1} = A_k - A_{k+1}
    step_valid = state_valid[:, 1:]
    squared = torch.where(step_valid, residuals.square(), 0.0)
    return squared.sum() / step_valid.sum().clamp_min(1)


def trajectory_balance_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    log_z: torch.Tensor,
    *,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Trajectory balance on complete responses, mean over the batch.

    (log Z_b + Σ_{k<n_b} log q(y_{k+1}|s_k) + log q(⊤|s_{n_b}) − log R(s_{n_b}⊤)/T)²,
    i.e. (log Z_b − A_{n_b})².

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring.
        log_z: [B] learned per-prompt log-normalizer, gathered by the caller.
        reward_temperature: T > 0; the target is R^(1/T).
        log_reward_floor: see `balance_potentials`.

    Returns:
        A scalar tensor.
    """
    if tuple(log_z.shape) != (log_pf.shape[0],):
        raise ValueError(
            f"log_z has shape {tuple(log_z.shape)} but log_pf has shape "
            f"{tuple(log_pf.shape)} = [B, L], so log_z must have shape ({log_pf.shape[0]},)"
        )
    potentials, _ = balance_potentials(
        log_pf,
        log_pterm,
        log_reward,
        lengths,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    final_potential = potentials.gather(1, lengths.long().unsqueeze(1)).squeeze(1)
    return (log_z - final_potential).square().mean()
