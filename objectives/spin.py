"""SPIN-family losses (DESIGN.md §3) as pure tensor functions.

For a prompt x with real response y (from the data) and generated response y'
(drawn from the opponent π_ref), the implicit reward of a response is

    r(y) = β · (log p_θ(y|x) − log π̃_ref(y|x))

and the loss is ℓ applied to the reward margin u = r(y) − r(y'):

    "sigmoid": ℓ(u) = log(1 + e^{-u})      (SPIN / DPO)
    "hinge":   ℓ(u) = max(0, 1 − u)
    "ipo":     ℓ(m) = (m − 1/(2β))²         with m = u / β, the unscaled margin

π̃_ref may be unnormalized: its log-normalizer log Z(x) appears in both
log-ratios and cancels in the margin, since y and y' share the prompt x.

All inputs are per-example sequence log-probabilities of shape ``[B]`` (summed
over response tokens). The reference log-probs are usually precomputed and
carry no gradient; the policy log-probs do.

Non-finite log-probs: every log-prob is clamped from below at ``logp_floor``
(default −1e4, below any realistic sequence log-prob: 256 tokens at uniform over
a 32k vocabulary is about −2660). A response that a model deems impossible
(−inf, e.g. after masking) thus becomes "extremely unlikely" instead, so the
margin, the loss and the gradients stay finite (no inf − inf = NaN). The
cost: a policy log-prob below the floor receives no gradient through the
clamp. NaN inputs are not checked (that would need a device sync) and propagate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
DEFAULT_LOGP_FLOOR = -1e4


def _check_beta(beta: float) -> float:
    try:
        beta_value = float(beta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from err
    if not math.isfinite(beta_value) or beta_value <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return beta_value


def _check_floor(logp_floor: float) -> float:
    floor_value = float(logp_floor)
    if not math.isfinite(floor_value):
        raise ValueError(f"logp_floor must be finite, got {logp_floor!r}")
    return floor_value


def _log_ratios(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    logp_floor: float,
) -> tuple[Tensor, Tensor]:
    """Validate shapes, clamp at the floor, return (real, generated) log-ratios ``[B]``."""
    named = {
        "policy_real_logps": policy_real_logps,
        "policy_generated_logps": policy_generated_logps,
        "ref_real_logps": ref_real_logps,
        "ref_generated_logps": ref_generated_logps,
    }
    for name, logps in named.items():
        if not isinstance(logps, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(logps).__name__}")
        if logps.ndim != 1:
            raise ValueError(f"{name} must have shape [B], got {tuple(logps.shape)}")
    shapes = {name: tuple(logps.shape) for name, logps in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob inputs must share one shape [B], got {shapes}")

    # Compute in at least float32: bf16 margins of long sequences lose most digits.
    dtype = policy_real_logps.dtype
    for logps in named.values():
        dtype = torch.promote_types(dtype, logps.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    floor = _check_floor(logp_floor)
    p_real, p_gen, r_real, r_gen = (logps.to(dtype).clamp(min=floor) for logps in named.values())
    return p_real - r_real, p_gen - r_gen


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    logp_floor: float = DEFAULT_LOGP_FLOOR,
) -> Tensor:
    """Per-example SPIN losses ``[B]``; reduce (e.g. ``.mean()``) in the caller.

    Args:
        policy_real_logps: ``[B]`` log p_θ(y|x) of the real responses.
        policy_generated_logps: ``[B]`` log p_θ(y'|x) of the generated responses.
        ref_real_logps: ``[B]`` log π̃_ref(y|x), possibly unnormalized.
        ref_generated_logps: ``[B]`` log π̃_ref(y'|x), possibly unnormalized.
        beta: β > 0, the reward scale (SPIN default 0.1).
        loss_type: "sigmoid" (−log σ(u), computed stably), "hinge"
            (max(0, 1 − u)) or "ipo" ((u/β − 1/(2β))²).
        logp_floor: finite lower clamp applied to all four log-probs so that
            −inf inputs give finite losses and gradients (see module docstring).

    Returns:
        ``[B]`` losses, in float32 or wider.

    Raises:
        ValueError: unknown ``loss_type``, ``beta`` not positive and finite,
            non-finite ``logp_floor``, or inputs that are not one shared ``[B]`` shape.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_beta(beta)
    real_log_ratio, generated_log_ratio = _log_ratios(
        policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps, logp_floor
    )
    unscaled_margin = real_log_ratio - generated_log_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * unscaled_margin)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * unscaled_margin)
    return (unscaled_margin - 1.0 / (2.0 * beta)) ** 2


@torch.no_grad()
def spin_metrics(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    beta: float = 0.1,
    logp_floor: float = DEFAULT_LOGP_FLOOR,
) -> dict[str, float]:
    """Batch-mean diagnostics with TRL's key names, as Python floats.

    Keys: "rewards/real" and "rewards/generated" (mean β·(log p_θ − log π̃_ref)),
    "rewards/margins" (mean real − generated reward), "rewards/accuracies"
    (fraction of pairs with real reward strictly above generated reward),
    "logps/real" and "logps/generated" (mean policy log-probs, after the floor).
    Same inputs, validation and floor as :func:`spin_loss`; an empty batch gives NaN.
    """
    beta = _check_beta(beta)
    real_log_ratio, generated_log_ratio = _log_ratios(
        policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps, logp_floor
    )
    real_rewards = beta * real_log_ratio
    generated_rewards = beta * generated_log_ratio
    floor = _check_floor(logp_floor)
    return {
        "rewards/real": real_rewards.mean().item(),
        "rewards/generated": generated_rewards.mean().item(),
        "rewards/margins": (real_rewards - generated_rewards).mean().item(),
        "rewards/accuracies": (real_rewards > generated_rewards).float().mean().item(),
        "logps/real": policy_real_logps.float().clamp(min=floor).mean().item(),
        "logps/generated": policy_generated_logps.float().clamp(min=floor).mean().item(),
    }
