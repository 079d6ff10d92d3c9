"""Device and dtype defaults: CPU here, CUDA when present, bf16 where the device supports it."""

from __future__ import annotations

import operator

import torch


def default_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA cards that support it, float32 elsewhere (CPU bf16 matmuls are slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_device(device: str | torch.device, argument: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError naming ``argument`` (e.g. ``gpu0``)."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(
            f"{argument}={device!r} is not a torch device ({error}); use cpu, cuda, cuda:1, mps, ..."
        ) from None


def resolve_generator(
    generator: torch.Generator | int | None, device: torch.device
) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` from a generator, a seed, or ``None`` (global RNG).

    Raises:
        TypeError: ``generator`` is neither (a string, a float, ...).
        ValueError: a seed outside [-2**63, 2**64).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    try:
        if isinstance(generator, bool):
            raise TypeError
        seed = operator.index(generator)  # int, numpy integers
    except TypeError:
        raise TypeError(
            f"generator={generator!r} must be a torch.Generator, an integer seed or None"
        ) from None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"generator={generator!r} is not a 64-bit seed")
    seeded = torch.Generator(device=device)
    seeded.manual_seed(seed)
    return seeded
