"""What every world's build shares: its config hash, its cache folder built once, its policies
loaded back, and SFT by maximum likelihood.

For whoever adds a world (``worlds/toy.py`` and ``worlds/scaled.py`` build through it): a world
is a config dataclass whose hash names its cache folder, a function that trains its policies and
saves them into that folder, and the task objects its build and its evaluation share.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gfn_spin.io import cache_directory, write_json_atomic
from gfn_spin.policy import Policy

#: The file a finished build writes last (its config and build seconds): its presence means the
#: folder's policies are complete.
DONE = "world.json"


def config_key(config: Any) -> str:
    """The cache folder's name for a world config (a dataclass): 12 hex digits of the sha256 of
    its fields as sorted JSON, so any field (its ``version`` included) names another folder."""
    blob = json.dumps(asdict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_once(
    world: str,
    config: Any,
    train: Callable[[Path], None],
    *,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """The folder of ``config``'s build, ``<cache_dir>/<config_key(config)>``, trained first by
    ``train(folder)`` unless a finished build is there (or ``rebuild``).

    Args:
        world: the world's cache name; ``cache_dir`` defaults to
            :func:`gfn_spin.io.cache_directory` of it (``$GFN_SPIN_CACHE/<world>``).
        config: the world's config dataclass.
        train: saves the world's policies into the folder it is given (deterministic for the
            config: a rebuild writes the same weights).
        cache_dir: the folder holding one subfolder per config hash.
        rebuild: retrain even when a finished build exists.

    Returns the folder and its record (``{"config": ..., "build_seconds": ...}``; builds written
    before the seconds were recorded have none).
    """
    directory = Path(cache_dir or cache_directory(world)) / config_key(config)
    done = directory / DONE
    if rebuild or not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        train(directory)
        seconds = time.perf_counter() - started
        write_json_atomic({"config": asdict(config), "build_seconds": seconds}, done)
    return directory, json.loads(done.read_text())


def load_policy(
    directory: Path, name: str, allowed_token_ids: Sequence[int], **kwargs: Any
) -> Policy:
    """A fresh copy of the world's policy ``name`` saved in its build folder ``directory``,
    restricted to the world's symbols (``kwargs`` go to ``Policy.from_pretrained``)."""
    return Policy.from_pretrained(directory / name, allowed_token_ids=allowed_token_ids, **kwargs)


def sft(
    policy: Policy,
    prompts: Sequence[Sequence[int]],
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    config: Any,
    steps: int,
    generator: torch.Generator,
) -> None:
    """Maximum likelihood on (prompt, response) pairs, in place: ``steps`` AdamW steps at the
    world config's ``learning_rate``, each one teacher-forced pass over ``config.batch_size``
    pairs drawn with replacement by ``generator``.

    ``response_ids`` is ``[N, L]`` (padded), ``lengths`` ``[N]`` (tokens before the stop), one
    row per prompt. A world's policies are small and trained once per config, so a plain loop does;
    α-SPIN iterates train through :mod:`selfplay.training`.
    """
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.learning_rate)
    policy.model.train()
    for _ in range(steps):
        batch = torch.randint(len(prompts), (config.batch_size,), generator=generator)
        rows = [prompts[i] for i in batch.tolist()]
        nll = -policy.log_prob(rows, response_ids[batch], lengths[batch]).mean()
        optimizer.zero_grad()
        nll.backward()
        optimizer.step()
    policy.model.eval()
