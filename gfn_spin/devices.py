"""Device and dtype defaults: CPU here, CUDA when present, bf16 where the device supports it."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA cards that support it, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_generator(
    generator: torch.Generator | int | None, device: torch.device
) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` from a generator, a seed, or ``None`` (global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(generator))
    return seeded
