"""Named LoRA adapters on one set of base weights, switched without touching ``requires_grad``.

Self-play iterates and the GFlowNet sampler are LoRA adapters on one base model (peft), so
several policies share one copy of the weights. Each :class:`gfn_spin.Policy` names the adapter
it reads (or ``None`` for the bare base weights) and routes every forward through
:func:`route`.

Why not peft's ``set_adapter`` / ``disable_adapter``: both also reset ``requires_grad`` on the
adapter weights, so scoring a frozen iterate in the middle of a training step would silently
freeze the adapter being trained (or unfreeze a frozen one). :func:`route` flips only the
routing flags of peft's tuner layers and restores them afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D


def tuner_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The peft tuner layers injected into ``model`` (empty for a plain model)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters loaded on ``model``."""
    return list(getattr(model, "peft_config", {}) or {})


#: What a policy reads: one adapter's name, several names (stacked: their LoRA updates add
#: up, e.g. a GFlowNet adapter on top of a self-play iterate), or None for the base weights.
AdapterSpec = str | tuple[str, ...] | None


def stacked_names(adapter: AdapterSpec) -> list[str]:
    """The adapter names ``adapter`` reads, bottom first (empty for the base weights)."""
    if adapter is None:
        return []
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    if not names:
        raise ValueError("adapter=() names no adapter; use None for the base weights")
    return names


@contextmanager
def route(model: torch.nn.Module, adapter: AdapterSpec) -> Iterator[None]:
    """Run the forwards inside the block through ``adapter`` (``None``: base weights only)."""
    names = stacked_names(adapter)
    layers = tuner_layers(model)
    if not layers:
        if names:
            raise ValueError(
                f"adapter={adapter!r} was requested but the model has no adapters; "
                "add one with Policy.add_adapter or load one with Policy.load_adapter"
            )
        yield
        return
    missing = [name for name in names if name not in adapter_names(model)]
    if missing:
        raise ValueError(
            f"adapter={missing[0]!r} is not loaded; loaded adapters: {adapter_names(model)}"
        )
    saved = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = not names
            if names:
                # peft's LoRA layers add the updates of every active adapter.
                layer._active_adapter = list(names)
        yield
    finally:
        for layer, (disabled, active) in zip(layers, saved, strict=True):
            layer._disable_adapters = disabled
            layer._active_adapter = active


def default_lora_config(rank: int = 16, alpha: int = 16, dropout: float = 0.0) -> LoraConfig:
    """LoRA on every attention and MLP projection (the published GFlowNet LM recipe uses r=64)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_target_modules(model: torch.nn.Module, output_layer: bool) -> str | list[str]:
    """peft target modules: every linear layer (GPT-2's ``Conv1D`` too), optionally the LM head."""
    if not output_layer:
        return "all-linear"
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | Conv1D) or ".lora_" in name:
            continue
        # Layers already wrapped by another adapter hold the original as ".base_layer".
        parts = name.split(".")
        names.add(parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1])
    return sorted(names)


#: The longest adapter name (peft saves an adapter into a folder of its name).
MAX_ADAPTER_NAME = 100


def check_adapter_name(name: object) -> str:
    """Refuse an adapter name that is not a plain identifier (letters, digits, ``_``).

    peft saves a named adapter into a subfolder of that name: a name that is a path (an
    absolute path to a user's folder, ``../x``) would make ``save_pretrained`` write into, and
    move files out of, that folder.
    """
    if not (isinstance(name, str) and name.isascii() and name.isidentifier()):
        raise ValueError(
            f"adapter name {name!r} is not a plain identifier (letters, digits and _, not "
            "starting with a digit); a name is not a path: name the adapter like 'iter_1'"
        )
    if len(name) > MAX_ADAPTER_NAME:  # it becomes a folder name when saved
        raise ValueError(
            f"adapter name {name[:20]!r}... has {len(name)} characters; use at most "
            f"{MAX_ADAPTER_NAME}"
        )
    return name


def add_adapter(model: torch.nn.Module, name: str, config: LoraConfig) -> PeftModel:
    """Add a new trainable adapter ``name``; wraps a plain model in a ``PeftModel`` first.

    Returns the ``PeftModel`` (the same object when ``model`` already is one). Other adapters
    keep their ``requires_grad`` flags.
    """
    check_adapter_name(name)
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter name {name!r} is already loaded; pick another name")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.add_adapter(name, config)
        for param, flag in flags:
            param.requires_grad_(flag)
        return model
    with quiet_peft_wrap():
        return get_peft_model(model, config, adapter_name=name)


def load_adapter(
    model: torch.nn.Module, path: str, name: str, *, is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved by ``save_pretrained`` under ``name``; frozen unless trainable."""
    check_adapter_name(name)
    if isinstance(model, PeftModel):
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
        for param, flag in flags:
            param.requires_grad_(flag)
        new_params = [p for n, p in model.named_parameters() if f".{name}." in n]
        for param in new_params:
            param.requires_grad_(is_trainable)
        return model
    with quiet_peft_wrap():
        return PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=is_trainable)


@contextmanager
def quiet_peft_wrap() -> Iterator[None]:
    """Wrap a model in peft without transformers 5's FutureWarning about
    ``is_gradient_checkpointing``: peft (0.21) reads that deprecated attribute when it wraps a
    model, so every run printed a warning its user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield
