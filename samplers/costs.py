"""The whole cost of a sampler that is fitted before it samples: fit spread over the draws made.

For anyone who shows or compares the cost of a learned sampler (a GFlowNet, its one-pass form,
SIR or SMC with it as proposal). Its model tokens are a one-time fit ``F`` (plus any per-prompt
refinement) and a per-draw sampling cost ``c``. Over ``P`` prompts with ``n`` draws each, it
costs ``F + P·n·c``; a sampler with no fit that is as exact and costs ``b`` per draw costs
``P·n·b``. So:

- total tokens per draw: ``c + F / (P·n)`` (:func:`total_tokens_per_draw`);
- break-even: the fit has paid for itself after ``n* = F / (P·(b − c))`` draws per prompt, and
  never when ``b ≤ c`` (:func:`break_even_draws_per_prompt`).

Model tokens are the portable unit (``samplers.weighting.model_tokens``): wall time on tiny
models measures Python overhead, not model compute.
"""

from __future__ import annotations

import math


def total_tokens_per_draw(tokens_per_draw: float, fit_tokens: float, draws: int) -> float:
    """Sampling tokens per draw plus the fit's tokens spread over the ``draws`` actually made."""
    if draws < 1:
        raise ValueError(
            f"draws={draws} must be >= 1: a fit spread over no draws has no cost per draw"
        )
    if fit_tokens < 0 or tokens_per_draw < 0:
        raise ValueError(
            f"fit_tokens={fit_tokens} and tokens_per_draw={tokens_per_draw} must be >= 0"
        )
    return tokens_per_draw + fit_tokens / draws


def break_even_draws_per_prompt(
    fit_tokens: float, num_prompts: int, tokens_per_draw: float, baseline_tokens_per_draw: float
) -> float:
    """Draws per prompt after which a fit of ``fit_tokens`` over ``num_prompts`` prompts has paid
    for itself against a baseline with no fit at equal accuracy (``math.inf``: never, the
    baseline costs no more per draw); 0 when there is no fit.

    ``baseline_tokens_per_draw`` is what the baseline spends for what one of these draws gives:
    per draw when matched on the error of a draw, ``ESS of a draw × tokens per effective
    sample`` when matched per effective sample.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1")
    if fit_tokens == 0:
        return 0.0
    saving = baseline_tokens_per_draw - tokens_per_draw
    return fit_tokens / (num_prompts * saving) if saving > 0 else math.inf


def format_break_even(draws_per_prompt: float | None) -> str:
    """A break-even for a table: "never", or draws per prompt to 3 significant figures."""
    if draws_per_prompt is None or math.isinf(draws_per_prompt):
        return "never"
    return f"{draws_per_prompt:.3g}"
