"""SPIN-family losses as pure tensor functions (the α-SPIN reading: docs/alpha_spin.md).

For a prompt x with real response y (from the data) and generated response y' (drawn from the
opponent π_ref), the implicit reward of a response is

    r(y) = β · (log p_θ(y|x) − log π̃_ref(y|x))

and the loss is ℓ applied to the reward margin u = r(y) − r(y') = β·m, with m the unscaled
margin (the difference of the two log-ratios):

    "sigmoid":  −log σ(u)                     (SPIN, DPO)
    "hinge":    max(0, 1 − u)
    "ipo":      (m − 1/(2β))²                 (Azar et al.: summed log-ratios)
    "ipo_mean": (m̄ − 1/(2β))²                 (TRL's IPO: per-token mean log-ratios)

with m̄ = (log p_θ(y) − log π̃_ref(y)) / n_y − (log p_θ(y') − log π̃_ref(y')) / n_y', where n
counts the scored tokens of each response (``real_lengths`` and ``generated_lengths``).

π̃_ref may be unnormalized: its log-normalizer log Z(x) appears in both log-ratios and cancels
in m, since y and y' share the prompt x. In m̄ it cancels only when n_y = n_y', so "ipo_mean"
needs a normalized reference (or equal lengths).

All log-probability inputs are per-example sequence log-probabilities of shape ``[B]`` (summed
over response tokens). The reference log-probs are usually precomputed and carry no gradient;
the policy log-probs do. Finite log-probs are used as given, however negative: a 4,000-token
response at −2.5 nats per token (−10,000) gets its exact loss and gradient.

−inf means probability zero: the model cannot produce that response (say, a token outside a
policy's allowed vocabulary). A pair with a −inf among its four log-probs has no finite margin
(its log-ratios are ±inf, or inf − inf), so it carries no training signal: its loss is 0 and it
sends no gradient to any input. It still counts in a caller's mean over the batch;
:func:`spin_metrics` reports the share of such pairs as "pairs/impossible". NaN and +inf are not
checked (that would need a device synchronization) and propagate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "ipo_mean")
"""Valid ``loss_type`` values of :func:`spin_loss`."""

LENGTH_NORMALIZED_LOSS_TYPES = ("ipo_mean",)
"""Loss types that read ``real_lengths`` and ``generated_lengths`` (and require them)."""


def _check_beta(beta: float) -> float:
    try:
        beta_value = float(beta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from err
    if not math.isfinite(beta_value) or beta_value <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return beta_value


def _check_vectors(named: dict[str, Tensor | None]) -> None:
    """Every given input is a tensor of one shared shape ``[B]``."""
    shapes = {}
    for name, values in named.items():
        if values is None:
            continue
        if not isinstance(values, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
        if values.ndim != 1:
            raise ValueError(f"{name} must have shape [B], got {tuple(values.shape)}")
        shapes[name] = tuple(values.shape)
    if len(set(shapes.values())) > 1:
        raise ValueError(f"inputs must share one shape [B], got {shapes}")


def _log_ratios(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated (real, generated) log-ratios ``[B]`` and the mask of impossible pairs ``[B]``.

    Impossible pairs (a −inf among their log-probs) get log-ratios 0, built with torch.where
    before any arithmetic, so that neither their values nor their gradients hold inf or NaN.
    """
    named = {
        "policy_real_logps": policy_real_logps,
        "policy_generated_logps": policy_generated_logps,
        "ref_real_logps": ref_real_logps,
        "ref_generated_logps": ref_generated_logps,
    }
    _check_vectors(named)
    # Compute in at least float32: bf16 margins of long sequences lose most digits.
    dtype = torch.float32
    for logps in named.values():
        dtype = torch.promote_types(dtype, logps.dtype)
    logps = [values.to(dtype) for values in named.values()]
    impossible = torch.stack([torch.isneginf(values) for values in logps]).any(dim=0)
    p_real, p_gen, r_real, r_gen = (torch.where(impossible, 0.0, values) for values in logps)
    return p_real - r_real, p_gen - r_gen, impossible


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    real_lengths: Tensor | None = None,
    generated_lengths: Tensor | None = None,
) -> Tensor:
    """Per-example SPIN losses ``[B]``; reduce (e.g. ``.mean()``) in the caller.

    Args:
        policy_real_logps: ``[B]`` log p_θ(y|x) of the real responses.
        policy_generated_logps: ``[B]`` log p_θ(y'|x) of the generated responses.
        ref_real_logps: ``[B]`` log π̃_ref(y|x), possibly unnormalized.
        ref_generated_logps: ``[B]`` log π̃_ref(y'|x), possibly unnormalized.
        beta: β > 0, the reward scale (SPIN default 0.1).
        loss_type: one of :data:`LOSS_TYPES` (see the module docstring): "sigmoid" (−log σ(βm),
            computed stably), "hinge" (max(0, 1 − βm)), "ipo" ((m − 1/(2β))², summed
            log-ratios) or "ipo_mean" ((m̄ − 1/(2β))², per-token mean log-ratios).
        real_lengths: ``[B]`` number of tokens scored in each real response's log-probs (the
            divisor of its log-ratio, ≥ 1). Required by "ipo_mean"; the other loss types use
            summed log-ratios and ignore it, so a trainer may always pass it.
        generated_lengths: ``[B]`` the same for the generated responses.

    Returns:
        ``[B]`` losses, in float32 or wider; 0 (without gradient) for a pair with a −inf
        log-prob.

    Raises:
        ValueError: unknown ``loss_type``, ``beta`` not positive and finite, inputs that are
            not one shared ``[B]`` shape, or lengths missing for "ipo_mean".
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    beta = _check_beta(beta)
    lengths = {"real_lengths": real_lengths, "generated_lengths": generated_lengths}
    if loss_type in LENGTH_NORMALIZED_LOSS_TYPES:
        missing = [name for name, values in lengths.items() if values is None]
        if missing:
            raise ValueError(
                f"loss_type={loss_type!r} divides each log-ratio by its response's token count: "
                f"pass {' and '.join(missing)} (token counts, shape [B])"
            )
    _check_vectors({"policy_real_logps": policy_real_logps, **lengths})
    real_log_ratio, generated_log_ratio, impossible = _log_ratios(
        policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps
    )
    if loss_type == "ipo_mean":
        real_log_ratio = real_log_ratio / real_lengths.to(real_log_ratio)
        generated_log_ratio = generated_log_ratio / generated_lengths.to(generated_log_ratio)
    margin = real_log_ratio - generated_log_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * margin)
    else:
        losses = (margin - 1.0 / (2.0 * beta)) ** 2
    return torch.where(impossible, 0.0, losses)


@torch.no_grad()
def spin_metrics(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    beta: float = 0.1,
) -> dict[str, float]:
    """Batch-mean diagnostics with TRL's key names, as Python floats.

    Keys: "rewards/real" and "rewards/generated" (mean β·(log p_θ − log π̃_ref)),
    "rewards/margins" (mean real − generated reward), "rewards/accuracies" (fraction of pairs
    with real reward strictly above generated reward), "logps/real" and "logps/generated" (mean
    policy log-probs), all over the pairs without a −inf log-prob; and "pairs/impossible", the
    fraction of pairs left out for having one. Same inputs and validation as :func:`spin_loss`.
    A batch without a possible pair gives NaN means.
    """
    beta = _check_beta(beta)
    real_log_ratio, generated_log_ratio, impossible = _log_ratios(
        policy_real_logps, policy_generated_logps, ref_real_logps, ref_generated_logps
    )
    possible = ~impossible

    def mean(values: Tensor) -> float:
        return values.to(real_log_ratio.dtype)[possible].mean().item()

    real_rewards = beta * real_log_ratio
    generated_rewards = beta * generated_log_ratio
    return {
        "rewards/real": mean(real_rewards),
        "rewards/generated": mean(generated_rewards),
        "rewards/margins": mean(real_rewards - generated_rewards),
        "rewards/accuracies": mean((real_rewards > generated_rewards).float()),
        "logps/real": mean(policy_real_logps),
        "logps/generated": mean(policy_generated_logps),
        "pairs/impossible": impossible.float().mean().item(),
    }
