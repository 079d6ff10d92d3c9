"""Shared helper for the bench scripts: one JSON line per figure."""

from __future__ import annotations

import json
from typing import Any


def emit(figure: str, **values: Any) -> None:
    """Print one machine-readable line per figure (collected by bench/gpu.py and notes)."""
    print(json.dumps({"figure": figure, **values}), flush=True)
