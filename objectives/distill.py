"""Token-level distillation of one autoregressive density into another.

For training a one-pass GFlowNet policy from a more exact but costlier teacher (a twisted local
product): on responses drawn from the teacher, the sum over visited states of the per-state
``KL(teacher(·|s_k) ‖ student(·|s_k))`` is an unbiased estimate of the sequence-level
``KL(teacher ‖ student)`` (chain rule), with a full-vocabulary signal at every state instead of
one sampled token.
"""

from __future__ import annotations

import torch


def state_kl(teacher_steps: torch.Tensor, student_steps: torch.Tensor) -> torch.Tensor:
    """``KL(teacher(·|s) ‖ student(·|s))`` at every state: normalized log-probabilities
    ``[..., V]`` in, ``[...]`` out (float32 at least).

    Tokens the teacher forbids (log-prob -inf) contribute 0; a token the teacher allows and the
    student forbids gives +inf, as the KL does.
    """
    dtype = torch.promote_types(teacher_steps.dtype, torch.float32)  # bf16 sums in float32
    teacher = teacher_steps.to(dtype)
    student = student_steps.to(dtype)
    probs = teacher.exp()
    allowed = probs > 0
    # where() on both branches keeps -inf - -inf (NaN) out of the value and the gradient.
    gap = torch.where(allowed, teacher - torch.where(allowed, student, 0.0), 0.0)
    return (probs * gap).sum(-1)


def distillation_loss(
    teacher_steps: torch.Tensor, student_steps: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Mean over rows of ``Σ_{k ≤ n_b, k < L} KL(teacher(·|s_k) ‖ student(·|s_k))``.

    Args:
        teacher_steps: normalized teacher log-probabilities at the states s_0..s_L, ``[B, L+1, V]``.
        student_steps: the student's, same shape (gradients flow through these).
        lengths: response lengths n_b ``[B]``; states past n_b are padding, and the state s_L
            has a forced stop (no choice, no term).

    Tokens the teacher forbids (log-prob -inf) contribute 0; a token the teacher allows and the
    student forbids gives +inf, as the KL does.
    """
    if teacher_steps.shape != student_steps.shape or teacher_steps.dim() != 3:
        raise ValueError(
            f"teacher_steps {tuple(teacher_steps.shape)} and student_steps "
            f"{tuple(student_steps.shape)} must both be [B, L+1, V]"
        )
    width = teacher_steps.shape[1] - 1
    per_state = state_kl(teacher_steps, student_steps)  # [B, L+1]
    steps = torch.arange(width + 1, device=per_state.device)
    lengths = lengths.to(per_state.device)
    visited = (steps[None, :] <= lengths[:, None]) & (steps[None, :] < width)
    return per_state.masked_fill(~visited, 0.0).sum(1).mean()
