"""Losses as pure tensor functions (SubTB family, SPIN family)."""

from objectives.spin import spin_loss, spin_metrics
from objectives.subtb import (
    balance_potentials,
    log_variance_loss,
    modified_db_loss,
    modified_subtb_loss,
    subtb_pair_weights,
    terminal_log_ratios,
    trajectory_balance_loss,
)

__all__ = [
    "balance_potentials",
    "log_variance_loss",
    "modified_db_loss",
    "modified_subtb_loss",
    "spin_loss",
    "spin_metrics",
    "subtb_pair_weights",
    "terminal_log_ratios",
    "trajectory_balance_loss",
]
