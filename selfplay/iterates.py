"""The iterates π_1, π_2, ...: made trainable from the previous one, frozen, saved and loaded.

LoRA iterates are named adapters ``iter_t`` on one set of base weights; full fine-tuning makes
full copies of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from gfn_spin import adapters
from gfn_spin.io import save_pretrained_atomic
from gfn_spin.policy import Policy
from selfplay.config import AlphaSpinConfig, derive_seed


def iterate_name(t: int) -> str:
    """The adapter name and folder name of π_t."""
    return f"iter_{t}"


def new_iterate(
    iterates: Sequence[Policy], config: AlphaSpinConfig, t: int
) -> tuple[Policy, list[torch.nn.Parameter]]:
    """π_{t+1}, trainable, equal to π_t; and its trainable parameters.

    LoRA: a new adapter ``iter_{t+1}`` on the base, its weights copied from π_t's adapter (a
    fresh adapter, equal to the base, at t = 0). Full: a deep copy of π_t's model.
    """
    torch.manual_seed(derive_seed(config.seed, "init", t))
    base, current = iterates[0], iterates[-1]
    if config.finetuning == "full":
        model = copy.deepcopy(current.model)
        model.requires_grad_(True)
        policy = Policy(model, current.tokenizer, allowed_token_ids=current.allowed_token_ids)
        return policy, list(model.parameters())
    name = iterate_name(t + 1)
    lora = adapters.default_lora_config(rank=config.lora_rank, alpha=config.lora_alpha)
    policy = base.add_adapter(name, lora)
    named = dict(policy.model.named_parameters())
    if current.adapter is not None:
        source = f".{current.adapter}."
        with torch.no_grad():
            for param_name, param in named.items():
                if source in param_name:
                    named[param_name.replace(source, f".{name}.")].copy_(param)
    marker = f".{name}."
    trainable = []
    for param_name, param in named.items():
        param.requires_grad_(marker in param_name)
        if marker in param_name:
            trainable.append(param)
    return policy, trainable


def freeze(policy: Policy, parameters: Sequence[torch.nn.Parameter]) -> None:
    """Stop training an iterate: no gradients, eval mode."""
    for param in parameters:
        param.requires_grad_(False)
    policy.model.eval()


def save_iterate(policy: Policy, target: Path) -> None:
    """Write the iterate into ``target`` atomically (:func:`gfn_spin.io.save_pretrained_atomic`)."""
    save_pretrained_atomic(policy, target)


def _adapter_folder(directory: Path) -> Path:
    """Where ``adapter_config.json`` is (peft nests non-"default" adapters in a subfolder)."""
    found = sorted(directory.rglob("adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"no adapter_config.json under {directory}")
    return found[0].parent


def load_iterate(
    iterates: Sequence[Policy], directory: Path, t: int, config: AlphaSpinConfig
) -> Policy:
    """π_t from its saved folder, frozen (a named adapter on the base, or a full model)."""
    base = iterates[0]
    if config.finetuning == "full":
        policy = Policy.from_pretrained(
            directory,
            device=base.device,
            dtype=next(base.model.parameters()).dtype,
            allowed_token_ids=base.allowed_token_ids,
        )
        policy.model.requires_grad_(False)
        return policy
    return base.load_adapter(_adapter_folder(directory), iterate_name(t))
