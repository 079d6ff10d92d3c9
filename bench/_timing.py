"""Shared timing helpers for the bench scripts: median of repeats, one JSON line per figure."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (syncs CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(figure: str, **values: Any) -> None:
    """Print one machine-readable line per figure (collected by bench/gpu.py and notes)."""
    print(json.dumps({"figure": figure, **values}), flush=True)
