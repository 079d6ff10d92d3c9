"""Shared fixtures: the tiny world, built once per test session in a temporary cache."""

from __future__ import annotations

import pytest
import torch

from gfn_spin.mixtures import GeometricMixture
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


@pytest.fixture(scope="module")
def target(world: ToyWorld) -> GeometricMixture:
    """The α = 0.5 geometric mixture of the tiny world's two policies (a module may define its
    own ``target``)."""
    return GeometricMixture([world.base, world.shifted], [0.5, 0.5])


@pytest.fixture(scope="module")
def prompts(world: ToyWorld) -> list[list[int]]:
    """The first two held-out prompts (a module or a parametrization may define its own)."""
    return world.eval_prompts[:2]


@pytest.fixture
def default_cache(world, tmp_path, monkeypatch):
    """Point the default world cache at the session's world (experiments use the default)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "toyworld").symlink_to(world.directory.parent)
    monkeypatch.setenv("GFN_SPIN_CACHE", str(cache))
