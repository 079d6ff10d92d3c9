"""The many-prompt world: thousands of prompts, a fixed split into fit and new prompts, exact TV.

For whoever measures whether a learned sampler transfers to prompts its fit never saw
(docs/toyworld.md, "The many-prompt world"). It is the tiny world's noisy-echo task on every
prompt of 5 and 6 symbols (1,024 + 4,096 = 5,120 prompts), responses of at most 6 symbols
(5,461 per prompt, so every law is enumerated and TV is exact), and tiny Llama-style HF models
(full attention, 2 layers) trained by SFT on the fit prompts only. Two presets:

- ``"overlap"``: the second policy is fine-tuned toward the same echo written with other
  keep/double/noise probabilities (the tiny world's ``"style"`` rule): the supports overlap.
- ``"stress"``: the second policy writes each symbol shifted by one (``"symbol"`` rule): the
  supports barely overlap and the mixture lives in both policies' tails.

What makes transfer hard for a twist is present by construction: the echo walks through the
prompt, so whether the two policies will agree ``k`` steps ahead depends on prompt symbols the
current step does not need (the next-token law reads only the current position), and the cap
L = 6 cuts most responses, so how much of the prompt is still ahead shapes every future
normalizer. The components' last hidden states at a state need not carry that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from worlds.toy import ToyWorld, ToyWorldConfig, build_world

Preset = Literal["overlap", "stress"]
#: The toy world's shift rule behind each preset.
SHIFT_RULE = {"overlap": "style", "stress": "symbol"}


@dataclass(frozen=True)
class ManyPromptConfig:
    """The many-prompt world's settings (all of them reach the cache key of the build)."""

    preset: Preset = "overlap"
    """"overlap" (supports overlap) or "stress" (policies that barely overlap)."""
    seed: int = 0
    """Seed of the split, the SFT sample and the models' initialization."""
    num_new_prompts: int = 1024
    """Prompts held out of every fit (and of the policies' SFT): the "new" prompts."""
    sft_examples: int = 4096
    """SFT pairs of each policy (drawn from the fit prompts)."""
    sft_steps: int = 400
    """Optimizer steps of the base policy's SFT."""
    shift_steps: int = 300
    """Optimizer steps fine-tuning the base toward the preset's shifted task."""

    def __post_init__(self) -> None:
        if self.preset not in SHIFT_RULE:
            raise ValueError(f"preset={self.preset!r} must be one of {sorted(SHIFT_RULE)}")

    def toy_config(self) -> ToyWorldConfig:
        """The tiny-world build that realizes this world."""
        return ToyWorldConfig(
            seed=self.seed,
            max_new_tokens=6,
            prompt_lengths=(5, 6),
            num_eval_prompts=self.num_new_prompts,
            sft_examples=self.sft_examples,
            sft_steps=self.sft_steps,
            shift_steps=self.shift_steps,
            shift_rule=SHIFT_RULE[self.preset],
        )


@dataclass
class ManyPromptWorld:
    """The built world: the tiny-world object (policies, task, tokenizer) and the fixed split.

    Attributes:
        world: the underlying build; its ``train_prompts`` are the fit prompts and its
            ``eval_prompts`` the new prompts (neither policy was trained on a new prompt).
        fit_prompts: prompts a sampler may be fitted on (token ids with ``[BOS]`` and ``=>``).
        new_prompts: prompts no fit and no SFT ever saw.
    """

    config: ManyPromptConfig
    world: ToyWorld
    fit_prompts: list[list[int]]
    new_prompts: list[list[int]]

    @property
    def max_new_tokens(self) -> int:
        return self.world.max_new_tokens


def build_many_prompt_world(
    config: ManyPromptConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
) -> ManyPromptWorld:
    """Build (or load from the cache) the many-prompt world; deterministic for ``config``."""
    config = config or ManyPromptConfig()
    world = build_world(config.toy_config(), cache_dir=cache_dir, device=device)
    return ManyPromptWorld(config, world, world.train_prompts, world.eval_prompts)
