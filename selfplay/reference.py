"""The α-SPIN opponent ``π_ref ∝ π_0^{1-α} · M_h^α`` built from the iterates (docs/alpha_spin.md).

``M_h = (1/h) Σ_{i<h} π_{t-i}`` averages the h latest iterates (capped by those that exist;
"all" = π_0..π_t, fictitious play). α = 1 gives ``M_h`` itself, an arithmetic mixture sampled
exactly; α < 1 a :class:`~gfn_spin.GeometricMixture`, known up to its normalizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture, GeometricMixture


def history_indices(t: int, history: int | str) -> list[int]:
    """Indices of the iterates averaged in M_h at iteration t, newest first."""
    if history == "all":
        return list(range(t, -1, -1))
    return list(range(t, max(t - int(history), -1), -1))


def history_mixture(iterates: Sequence[Density], history: int | str) -> Density:
    """``M_h = (1/h) Σ_{i<h} π_{t-i}`` (the iterate itself when h = 1), t = len(iterates) - 1."""
    members = [iterates[i] for i in history_indices(len(iterates) - 1, history)]
    if len(members) == 1:
        return members[0]
    return ArithmeticMixture(members, [1.0 / len(members)] * len(members))


def build_reference(iterates: Sequence[Density], alpha: float, history: int | str) -> Density:
    """The opponent ``π_ref ∝ π_0^{1-α} · M_h^α`` from ``iterates = [π_0, ..., π_t]``.

    α = 1 returns ``M_h`` itself (π_t when h = 1: plain SPIN), a normalized density. When M_h
    is π_0 alone (t = 0), π_ref = π_0 for every α. Otherwise a GeometricMixture
    ``[π_0, M_h]`` with weights ``[1-α, α]`` (unnormalized; its normalizer cancels in the loss).
    """
    mixture = history_mixture(iterates, history)
    if alpha == 1.0 or mixture is iterates[0]:
        return mixture
    if alpha == 0.0:
        return iterates[0]
    return GeometricMixture([iterates[0], mixture], [1.0 - alpha, alpha])
