"""Worlds: tasks with known truth and the small models trained on them (docs/layering.md).

For whoever measures a sampler or α-SPIN against an exact answer. Each world is one module,
imported by name (nothing is imported here, so ``import worlds.toy`` loads only the tiny world):

- :mod:`worlds.toy`: the tiny world, every response enumerable (docs/toyworld.md);
- :mod:`worlds.scaled`: the scaled world, bounded-context policies (docs/scaled_world.md);
- :mod:`worlds.bounded_context`: exact ``log Z``, sampling and divergences of bounded-context
  densities, the scaled world's truth beyond enumeration;
- :mod:`worlds.many_prompt`: 5,120 prompts with a fixed split into fit and new prompts, every
  response enumerable, for measuring transfer to new prompts (docs/toyworld.md);
- :mod:`worlds.smollm`: a real model, SmolLM2-135M-Instruct from a GGUF wheel, with an α-SPIN
  iterate and a style adapter beside it; nothing enumerable (docs/real_model.md);
- :mod:`worlds.building`: what every world's build shares (cache by config hash, SFT).

Worlds sit above :mod:`selfplay`: a world may train a policy of its pair with the toolkit's
own trainers, and nothing below imports a world.
"""
