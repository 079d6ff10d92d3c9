"""Shared plumbing of runnable studies: settings given as ``field=value``, prompts, output
dir, log and results.

For whoever writes a study in ``experiments/`` (its command line: :mod:`experiments.cli`).
Results are written atomically as JSON together with the config, package versions and the git
commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.hf_argparser import string_to_bool

from experiments.run_outputs import output_set as output_set  # re-exported for studies
from experiments.run_outputs import prepare_output_dir as prepare_output_dir
from gfn_spin.io import write_text_atomic

DEFAULT_PACKAGES = (
    "gfn-spin",
    "torch",
    "transformers",
    "peft",
    "torchgfn",
    "datasets",
    "numpy",
    "matplotlib",
)


def parse_overrides(cls: type, specs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("steps=300,lora_rank=8", "explore_temperature=1:2")`` → keyword arguments of ``cls``.

    For settings of a nested config given on one command-line flag (GFlowNet variants, the tiny
    world). Each value takes the type of the field's default; tuple values are ``:``-separated.
    """
    defaults = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    values: dict[str, Any] = {}
    for spec in specs:
        for item in filter(None, spec.split(",")):
            name, sep, text = item.partition("=")
            if not sep or name not in defaults:
                raise ValueError(
                    f"bad {cls.__name__} setting {item!r}: use field=value, fields {sorted(defaults)}"
                )
            default = defaults[name]
            try:
                if isinstance(default, tuple):
                    kind = type(default[0]) if default else str
                    values[name] = tuple(kind(t) for t in text.split(":"))
                elif isinstance(default, bool):
                    values[name] = string_to_bool(text)
                elif isinstance(default, int):  # "1e3" is fine, "2.5" is not
                    number = float(text)
                    if not number.is_integer():
                        raise ValueError(f"{text} is not an integer")
                    values[name] = int(number)
                else:
                    values[name] = type(default)(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                raise ValueError(f"bad {cls.__name__} setting {item!r}: {error}") from None
    return values


def world_config(specs: tuple[str, ...] | list[str]) -> Any:
    """The tiny world's ``ToyWorldConfig`` from ``field=value`` settings (a study's ``--world``)."""
    from worlds.toy import ToyWorldConfig

    return ToyWorldConfig(**parse_overrides(ToyWorldConfig, specs))


def check_alphas(alphas: Sequence[float], argument: str = "alphas") -> tuple[float, ...]:
    """A study's α values (``π_base^(1-α)·π_t^α``), each a finite number in [0, 1], each once.

    Raises:
        ValueError: an empty list, a value outside [0, 1] (or NaN, inf), or a repeated value
            (each α trains and writes its own GFlowNet), naming ``argument``.
    """
    values = list(alphas)
    if not values:
        raise ValueError(f"{argument} is empty: give at least one α in [0, 1]")
    bad = [
        a
        for a in values
        if isinstance(a, bool)
        or not isinstance(a, int | float)
        or not (math.isfinite(a) and 0 <= a <= 1)
    ]
    if bad:
        raise ValueError(
            f"{argument}={values} has values outside [0, 1]: {bad}; α weighs π_t against the "
            "base in π_base^(1-α)·π_t^α"
        )
    repeated = sorted({a for a in values if values.count(a) > 1})
    if repeated:
        raise ValueError(
            f"{argument}={values} repeats {repeated}: give each α once (each trains and writes "
            "its own GFlowNet)"
        )
    return tuple(float(a) for a in values)


def read_prompts_file(path: str | os.PathLike, argument: str = "prompts_file") -> list[str]:
    """The prompts of a text file, one per non-blank line, for a study's ``--prompts-file``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not UTF-8 text, or holds fewer than two prompts (a study
            needs at least one train and one held-out prompt; see :func:`split_train_eval`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{argument}={str(path)!r} is not UTF-8 text ({error}); save it as UTF-8, one "
            "prompt per line"
        ) from None
    prompts = [line for line in lines if line.strip()]
    split_train_eval(prompts, argument)  # refuse a file too small to split, before any work
    return prompts


def split_train_eval(
    prompts: list[str], argument: str = "prompts_file"
) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: the last quarter (at least one) is held out, never trained on.

    Raises:
        ValueError: fewer than two prompts, which leaves nothing to train on that is not
            also evaluated.
    """
    if len(prompts) < 2:
        raise ValueError(
            f"{argument} holds {len(prompts)} prompt(s); give at least two (one per line): the "
            "last quarter is held out for evaluation and never trained on"
        )
    held = max(1, len(prompts) // 4)
    return list(prompts[:-held]), list(prompts[-held:])


def setup_logging(
    output_dir: Path, name: str, *, filename: str = "run.log", append: bool = True
) -> logging.Logger:
    """A logger writing to ``output_dir/filename`` (all messages) and to stderr (info).

    ``append=False`` starts the file afresh (one run's log, e.g. inside :func:`output_set`);
    a resumable run appends, so its log tells the whole story of the run.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    file_handler = logging.FileHandler(
        output_dir / filename, mode="a" if append else "w", encoding="utf-8"
    )
    file_handler.setFormatter(formatter)
    file_handler.setLevel(logging.DEBUG)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream.setLevel(logging.INFO)
    logger.addHandler(file_handler)
    logger.addHandler(stream)
    logger.propagate = False
    return logger


def git_commit(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The git commit of the source tree and whether it has uncommitted changes (None outside git)."""
    directory = Path(directory or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """Python, platform, package versions and git commit, for the results file."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "git": git_commit(),
        "argv": sys.argv,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, tensors and numpy values as plain JSON types (inf/nan kept as floats)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def write_results(
    results: dict[str, Any], output_dir: str | os.PathLike, config: Any, name: str = "results.json"
) -> Path:
    """``results`` plus the config and the environment, as JSON at ``output_dir/name``."""
    payload = {"config": to_jsonable(config), "environment": environment(), **results}
    return write_text_atomic(json.dumps(to_jsonable(payload), indent=2), Path(output_dir) / name)
