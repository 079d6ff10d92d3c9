"""The GFlowNet balance losses for language models, as pure tensor functions.

For whom: the GFlowNet sampler's training step (and anyone training an
autoregressive policy q toward an unnormalized target R over responses).
Every state can terminate, the generation graph is a tree (P_B = 1) and state
flows are derived, not learned (docs/gflownet.md):

    log F̂(s_k) = log R(s_k⊤) / T − log q(⊤ | s_k)

Shapes (docs/conventions.md), B trajectories, length cap L:

    log_pf     [B, L]    log q(y_{k+1} | s_k), 0 past n_b
    log_pterm  [B, L+1]  log q(⊤ | s_k), 0 past n_b and at k = L (forced stop)
    log_reward [B, L+1]  log R(s_k⊤), the target's unnormalized prefix-terminal
                         log-density; values past n_b are ignored
    lengths    [B]       n_b in 0..L (integer)

Every residual of the family is a difference of one per-state potential

    A_k = log F̂(s_k) − Σ_{m<k} log q(y_{m+1} | s_m)

because r_ij = log F̂(s_i) + Σ_{k=i}^{j-1} log q(y_{k+1}|s_k) − log F̂(s_j) = A_i − A_j.
Sub-trajectory balance uses every pair i < j ≤ n_b, modified detailed balance
the pairs j = i + 1. The terminal-only losses (trajectory balance and the
log-variance loss) read each trajectory through its terminal log-ratio

    δ_b = log prior(y_b) + log R(s_{n_b}⊤)/T − log q(y_b),
    log q(y_b) = Σ_{k<n_b} log q(y_{k+1}|s_k) + log q(⊤|s_{n_b}),

which is A_{n_b} when there is no prior. Trajectory balance regresses δ_b on
a given log Z_b; the log-variance loss replaces log Z_b by the mean of δ over
the trajectories that share the prompt.

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

Why one module over 400 lines: every loss here is a function of the same per-state potentials
(:func:`balance_potentials`) under the same input checks and -inf rules; split apart, each file
would import the others' private helpers, and the conventions above would be written once per
file.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FORBIDDEN_LOG_REWARD_MARGIN",
    "POLICY_LOGPROB_FLOOR",
    "TERMINATION_GRADIENTS",
    "WEIGHTINGS",
    "balance_potentials",
    "log_variance_loss",
    "modified_db_loss",
    "modified_subtb_loss",
    "subtb_pair_weights",
    "terminal_log_ratios",
    "trajectory_balance_loss",
]

WEIGHTINGS = ("batch", "geometric_within")
"""Valid `weighting` values of `modified_subtb_loss`."""

TERMINATION_GRADIENTS = ("all", "anchor")
"""Valid `termination_gradient` values of `modified_subtb_loss`."""

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


def _pair_sums(
    potentials: torch.Tensor,
    state_valid: torch.Tensor,
    lengths: torch.Tensor,
    width: int,
    subtb_lambda: float,
    weighting: str,
    with_anchor: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per trajectory ``[B]``: Σ_{i<j≤n_b} w_ij r_ij² and its normalizer Σ w_ij e_j; with
    ``with_anchor`` also the full window's residual r_{0,n_b} and its weight (else None)."""
    ends = lengths.long().unsqueeze(1)
    anchor = anchor_weight = None
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
            lengths, width, subtb_lambda, weighting, dtype=dtype
        )
        start_totals = end_weights @ pair_weights.T  # [B, L+1]: Σ_j w_ij e_j per start i
        end_totals = end_weights * pair_weights.sum(dim=0)  # [B, L+1]: e_j Σ_i w_ij per end j
        cross = centred @ pair_weights  # [B, L+1]: Σ_i w_ij A_i per end j
        per_state = centred * (start_totals + end_totals) - 2.0 * end_weights * cross
        weighted = (centred * per_state).sum(dim=1).to(potentials.dtype)  # [B]
        normalizer = end_totals.sum(dim=1).to(potentials.dtype)  # [B]
        if with_anchor:
            # r_{0,n_b} = A_0 − A_{n_b}; its window weight λ^(n_b-1) (rescaled like the rest).
            anchor = (centred[:, 0] - centred.gather(1, ends).squeeze(1)).to(potentials.dtype)
            anchor_weight = (pair_weights[0] * end_weights).gather(1, ends).squeeze(1)
            anchor_weight = anchor_weight.to(potentials.dtype)
    return weighted, normalizer, anchor, anchor_weight


def _anchor_stop_terms(
    weighted: torch.Tensor,
    anchor: torch.Tensor,
    anchor_weight: torch.Tensor,
    log_pterm: torch.Tensor,
    state_valid: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``termination_gradient="anchor"``: the stop terms (detached everywhere else) put back into
    the full window's residual r_{0,n_b} = log F̂(s_0) + log q(y_b) − log R(s_{n_b}⊤)/T; returns
    the weighted sums ``[B]`` and r_{0,n_b} ``[B]``, their values unchanged.

    The token log-probabilities and the rewards keep the gradient of every window; the gradient
    with respect to log_pterm is exactly that of λ^(n_b-1) r_{0,n_b}² / normalizer summed over b
    (same normalizer as the loss), so it is nonzero only at k = 0 and k = n_b. This is a
    semi-gradient: it still vanishes at balance, where every residual is 0.
    """
    # ∂r_{0,n}/∂log q(⊤|s_0) = −1 and ∂r_{0,n}/∂log q(⊤|s_n) = +1. Adding (x − x.detach()) leaves
    # every value as it is (x is finite after the clamp, so x − x is exactly 0) and restores the
    # gradient. The added term is built on the detached residual, so it sends gradient to the
    # stop terms only and the token and reward gradients stay those of the plain loss.
    stops = torch.where(state_valid, log_pterm, 0.0).clamp_min(POLICY_LOGPROB_FLOOR)
    shift = stops.gather(1, lengths.long().unsqueeze(1)).squeeze(1) - stops[:, 0]
    shift = shift - shift.detach()
    frozen = anchor.detach()
    weighted = weighted + anchor_weight * ((frozen + shift).square() - frozen.square())
    return weighted, anchor + shift


def _check_options(
    subtb_lambda: float, weighting: str, termination_gradient: str, tb_anchor_weight: float
) -> None:
    """Raise on an option of :func:`modified_subtb_loss` outside its range."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if not (subtb_lambda >= 0 and math.isfinite(subtb_lambda)):
        raise ValueError(f"subtb_lambda must be finite and >= 0; got {subtb_lambda}")
    if termination_gradient not in TERMINATION_GRADIENTS:
        raise ValueError(
            f"termination_gradient must be one of {TERMINATION_GRADIENTS}; "
            f"got {termination_gradient!r}"
        )
    if not (tb_anchor_weight >= 0 and math.isfinite(tb_anchor_weight)):
        raise ValueError(f"tb_anchor_weight must be finite and >= 0; got {tb_anchor_weight}")


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
    termination_gradient: str = "all",
    tb_anchor_weight: float = 0.0,
) -> torch.Tensor:
    """Modified sub-trajectory balance loss (docs/gflownet.md), vectorized over pairs in O(B·L) memory.

    Loss = Σ_b Σ_{i<j≤n_b} λ^(j-i-1) r_ij² / normalizer, where
    "batch" normalizes by Σ_b Σ_{i<j≤n_b} λ^(j-i-1) (the published LM recipe)
    and "geometric_within" normalizes each trajectory by its own weight sum,
    then averages over the trajectories with n_b ≥ 1 (torchgfn's default).

    Termination gradient. Every stop log-probability log q(⊤|s_k) enters the
    derived flows of all the windows that start or end at s_k, so one shift of
    a stop logit can shrink many residuals at once, whatever the rest of the
    policy does. ``termination_gradient`` decides which windows may move it:
    "all", every window (the plain gradient of the loss); "anchor", only the
    full-trajectory window (0, n_b), trajectory balance with log Z = log F̂(s_0)
    (:func:`_anchor_stop_terms`; the loss value is unchanged bit for bit).

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring.
        subtb_lambda: λ ≥ 0, the geometric discount on sub-trajectory length
            (λ = 0 keeps only one-step pairs, i.e. modified detailed balance).
        weighting: "batch" or "geometric_within".
        reward_temperature: T > 0; the target is R^(1/T).
        log_reward_floor: see `balance_potentials`.
        termination_gradient: one of TERMINATION_GRADIENTS (see above).
        tb_anchor_weight: w ≥ 0. Adds w · Σ_{b: n_b≥1} r_{0,n_b}² / #{b: n_b ≥ 1}
            (the trajectory-balance residual of each trajectory, log Z = log F̂(s_0)).
            Its gradient follows the (0, n_b) window's rule above, so under
            "anchor" it also moves log q(⊤|s_0) and log q(⊤|s_{n_b}).

    Returns:
        A scalar tensor. When no trajectory has a pair (all n_b = 0) it is 0,
        still connected to the inputs' graph.
    """
    _check_options(subtb_lambda, weighting, termination_gradient, tb_anchor_weight)
    anchored = termination_gradient == "anchor"
    potentials, state_valid = balance_potentials(
        log_pf,
        log_pterm.detach() if anchored else log_pterm,
        log_reward,
        lengths,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    weighted, normalizer, anchor, anchor_weight = _pair_sums(
        potentials,
        state_valid,
        lengths,
        log_pf.shape[1],
        subtb_lambda,
        weighting,
        anchored or tb_anchor_weight > 0,
    )
    if anchored:
        weighted, anchor = _anchor_stop_terms(
            weighted, anchor, anchor_weight, log_pterm, state_valid, lengths
        )
    # Any normalizer with a pair holds a weight equal to 1 (see subtb_pair_weights),
    # so clamping at 1 only turns 0/0 (no pair at all) into 0.
    has_pair = (lengths >= 1).sum().clamp_min(1)
    if weighting == "batch":
        loss = weighted.sum() / normalizer.sum().clamp_min(1.0)
    else:
        loss = (weighted / normalizer.clamp_min(1.0)).sum() / has_pair
    if tb_anchor_weight > 0:
        # r_{0,0} = 0 for n_b = 0, so the sum runs over the trajectories with a pair.
        loss = loss + tb_anchor_weight * anchor.square().sum() / has_pair
    return loss


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


def terminal_log_ratios(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Terminal log-ratio of each complete response: δ_b = log prior(y_b) + log R(y_b⊤)/T − log q(y_b).

    With log q(y_b) = Σ_{k<n_b} log q(y_{k+1}|s_k) + log q(⊤|s_{n_b}) (the stop
    term is 0 at the cap) and R(y_b⊤) = log_reward[b, n_b]: the only reward
    entry read, so the caller may leave the other entries at anything. Without
    a prior δ_b = A_{n_b} (see `balance_potentials`). With a prior the target is
    prior(y) · R(y)^(1/T), relative trajectory balance's "prior × correction";
    the temperature tempers R only. E_q[δ] ≤ log Z ≤ log E_q[e^δ] (per prompt).

    -inf handling: the terminal target t_b = log prior(y_b) + log R(y_b⊤)/T is
    clamped at the batch's smallest finite target minus
    FORBIDDEN_LOG_REWARD_MARGIN (or at ``log_reward_floor`` when given), and
    policy log-probabilities at POLICY_LOGPROB_FLOOR, as in the other losses.

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring.
        log_prior: [B] or None, log prior(y_b) of the complete response; -inf allowed.
        reward_temperature: T > 0.
        log_reward_floor: None (relative floor, touches only -inf targets) or an
            absolute clamp on the terminal target t_b.

    Returns:
        [B] tensor, finite, in float32 for lower-precision inputs (a sum of L
        bf16 log-probabilities would lose the nats the losses resolve), else in
        the inputs' dtype.
    """
    _check_inputs(log_pf, log_pterm, log_reward, lengths, reward_temperature)
    batch, cap = log_pf.shape
    if log_prior is not None and tuple(log_prior.shape) != (batch,):
        raise ValueError(
            f"log_prior has shape {tuple(log_prior.shape)} but log_pf has shape "
            f"{tuple(log_pf.shape)} = [B, L], so log_prior must have shape ({batch},)"
        )
    dtype = torch.promote_types(log_pf.dtype, torch.float32)
    ends = lengths.long().unsqueeze(1)
    step_valid = torch.arange(cap, device=lengths.device).unsqueeze(0) < ends
    with torch.autocast(log_pf.device.type, enabled=False):
        # torch.where, not a multiplied mask: 0 * inf would be NaN in values and gradients.
        tokens = torch.where(step_valid, log_pf.to(dtype), 0.0).clamp_min(POLICY_LOGPROB_FLOOR)
        stop = log_pterm.to(dtype).gather(1, ends).squeeze(1).clamp_min(POLICY_LOGPROB_FLOOR)
        log_q = tokens.sum(dim=1) + stop
        target = log_reward.to(dtype).gather(1, ends).squeeze(1) / reward_temperature
        if log_prior is not None:
            target = target + log_prior.to(dtype)
        every = torch.ones_like(target, dtype=torch.bool)
        target = torch.clamp(target, min=_log_reward_floor(target, every, log_reward_floor))
    return target - log_q


def trajectory_balance_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    log_z: torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Trajectory balance on complete responses, mean over the batch.

    (log Z_b + log q(y_b) − log prior(y_b) − log R(s_{n_b}⊤)/T)² = (log Z_b − δ_b)²,
    δ_b from `terminal_log_ratios`. With ``log_prior`` this is relative
    trajectory balance (target prior · R^(1/T)); without it, and with no
    forbidden terminal, (log Z_b − A_{n_b})².

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring; only
            log_reward[b, n_b] is read.
        log_z: [B] log-normalizer of each row (a learned per-prompt log Z
            gathered by the caller, or any estimate), or a scalar shared by all rows.
        log_prior: [B] or None, see `terminal_log_ratios`.
        reward_temperature: T > 0; the reward is R^(1/T).
        log_reward_floor: see `terminal_log_ratios`.

    Returns:
        A scalar tensor (float32 for lower-precision inputs).
    """
    if log_z.dim() != 0 and tuple(log_z.shape) != (log_pf.shape[0],):
        raise ValueError(
            f"log_z has shape {tuple(log_z.shape)} but log_pf has shape "
            f"{tuple(log_pf.shape)} = [B, L], so log_z must have shape ({log_pf.shape[0]},) "
            "or be a scalar"
        )
    ratios = terminal_log_ratios(
        log_pf,
        log_pterm,
        log_reward,
        lengths,
        log_prior=log_prior,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    return (log_z.to(ratios.dtype) - ratios).square().mean()


def log_variance_loss(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    group: torch.Tensor,
    *,
    log_prior: torch.Tensor | None = None,
    reward_temperature: float = 1.0,
    log_reward_floor: float | None = None,
) -> torch.Tensor:
    """Log-variance (VarGrad) loss: trajectory balance with each prompt's batch log Z.

    With δ_b from `terminal_log_ratios` and G_g = {b : group_b = g}, N_g = |G_g|:

        log Ẑ_g = (1/N_g) Σ_{b∈G_g} δ_b
        s²_g    = Σ_{b∈G_g} (δ_b − log Ẑ_g)² / (N_g − 1)
        Loss    = mean of s²_g over the groups with N_g ≥ 2

    s²_g is the unbiased sample variance of δ within the prompt; a group of
    one trajectory has none and is left out (all singletons: the loss is 0,
    connected to the graph). log Ẑ_g is not detached, and it does not matter:
    Σ_{b∈G_g} (δ_b − log Ẑ_g) = 0, so the gradient through log Ẑ_g is zero
    and ∇s²_g = 2/(N_g − 1) Σ_b (δ_b − log Ẑ_g) ∇δ_b, i.e. the TB gradient at
    the batch's log Z, scaled by N_g/(N_g − 1). The loss is 0 with zero
    gradient exactly when q(y) ∝ prior(y) R(y)^(1/T) on each group's draws.
    With ``log_prior`` (e.g. a proposal the target factors through) this is
    the log-variance form of relative trajectory balance.

    Args:
        log_pf, log_pterm, log_reward, lengths: see the module docstring; only
            log_reward[b, n_b] is read.
        group: [B] integer prompt index of each trajectory (any values;
            equal values share a log Ẑ).
        log_prior: [B] or None, see `terminal_log_ratios`.
        reward_temperature: T > 0; the reward is R^(1/T).
        log_reward_floor: see `terminal_log_ratios`.

    Returns:
        A scalar tensor (float32 for lower-precision inputs). Built from a
        [B, B] same-prompt mask, so it needs no device synchronization.
    """
    if tuple(group.shape) != (log_pf.shape[0],):
        raise ValueError(
            f"group has shape {tuple(group.shape)} but log_pf has shape "
            f"{tuple(log_pf.shape)} = [B, L], so group must have shape ({log_pf.shape[0]},)"
        )
    if group.dtype.is_floating_point or group.dtype.is_complex or group.dtype == torch.bool:
        raise ValueError(f"group must be an integer tensor of prompt indices; got {group.dtype}")
    ratios = terminal_log_ratios(
        log_pf,
        log_pterm,
        log_reward,
        lengths,
        log_prior=log_prior,
        reward_temperature=reward_temperature,
        log_reward_floor=log_reward_floor,
    )
    same = group.unsqueeze(1) == group.unsqueeze(0)  # [B, B]
    size = same.sum(dim=1)  # [B]: N_g of each trajectory's group
    group_mean = torch.where(same, ratios.unsqueeze(0), 0.0).sum(dim=1) / size
    centred = ratios - group_mean
    eligible = size >= 2
    per_trajectory = torch.where(eligible, centred.square() / (size - 1).clamp_min(1), 0.0)
    # Count each eligible group once, at its first member: an exact integer count.
    order = torch.arange(group.shape[0], device=group.device)
    first = ~(same & (order.unsqueeze(0) < order.unsqueeze(1))).any(dim=1)
    num_groups = (eligible & first).sum().clamp_min(1)
    return per_trajectory.sum() / num_groups
