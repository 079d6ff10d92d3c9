"""The package layers of pyproject.toml's import-linter contracts hold, and the check can fail.

Layers, top to bottom: experiments > worlds > selfplay > samplers > gfn_spin > objectives (a package
imports only packages below it), and the core (gfn_spin, objectives) imports neither
``datasets`` nor ``accelerate``, directly or through another module (docs/layering.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
    "lint-imports"
)
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over ``root``'s pyproject.toml, with ``root`` on the import path."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_repository_keeps_its_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_and_a_core_import_of_datasets_break_the_contracts(tmp_path):
    """The same contracts over a copy of the layer packages with violations added: a core
    module importing the self-play layer, self-play importing a world, and a core module
    importing ``datasets``."""
    for package in ("experiments", "worlds", "selfplay", "samplers", "gfn_spin", "objectives"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "gfn_spin" / "upward.py").write_text("import selfplay\n")
    (tmp_path / "selfplay" / "world.py").write_text("import worlds\n")
    (tmp_path / "objectives" / "data.py").write_text("import datasets\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "0 kept, 2 broken" in result.stdout, result.stdout
    assert "gfn_spin.upward -> selfplay" in result.stdout
    assert "selfplay.world -> worlds" in result.stdout
    assert "objectives.data -> datasets" in result.stdout
