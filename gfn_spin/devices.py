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
    """``device`` as a ``torch.device``, or a ValueError naming ``argument``: a name torch
    does not know (``gpu0``), or a CUDA device this machine does not have."""
    if not isinstance(device, torch.device):
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"{argument}={device!r} is not a torch device ({error}); use cpu, cuda, cuda:1, "
                "mps, ..."
            ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(
                f"{argument}={str(device)!r} is not available here ({count} CUDA devices); use "
                "cpu" + (f" or cuda:0..cuda:{count - 1}" if count else "")
            )
    return device


def resolve_device(device: str | torch.device | None, argument: str = "device") -> torch.device:
    """The device of a ``--device`` flag: ``"auto"`` or None is CUDA when present, else CPU;
    anything else is checked by :func:`check_device` (a clear ValueError naming ``argument``)."""
    if device is None or device == "auto":
        return default_device()
    return check_device(device, argument)


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
