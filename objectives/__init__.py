"""Losses as pure tensor functions (SubTB family, SPIN family)."""

from objectives.spin import spin_loss, spin_metrics

__all__ = ["spin_loss", "spin_metrics"]
