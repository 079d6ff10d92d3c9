"""Shared fixtures: the tiny world, built once per test session in a temporary cache."""

from __future__ import annotations

import pytest
import torch

from worlds.toy import ToyWorld, build_world

# The tiny models run fastest single-threaded, and a second thread makes every test 10x slower
# whenever anything else runs on the machine (measured here); tests never rely on parallelism.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    torch.manual_seed(0)
    return build_world(cache_dir=tmp_path_factory.mktemp("toyworld"))


@pytest.fixture(scope="session")
def prompt(world: ToyWorld) -> list[int]:
    """One held-out prompt (3 symbols) used by single-prompt exactness tests."""
    return next(p for p in world.eval_prompts if len(p) == 5)
