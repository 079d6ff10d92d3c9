"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Long runs are killed; a checkpoint, manifest or results file written in place could then be
left half-written and loaded later. Everything is written to a temporary sibling first and
renamed into place (a rename within one directory is atomic on POSIX).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Suffix of temporary siblings; a resumed run may delete anything ending with it.
TMP_SUFFIX = ".tmp"


def make_directory(path: str | os.PathLike, argument: str = "path") -> Path:
    """Create the directory ``path`` (and parents), or raise one clear error naming ``argument``.

    Called before long work starts, so that an unwritable destination (a path under a regular
    file, an existing file) fails at once rather than when the first result is saved.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotADirectoryError(
            f"{argument}={str(path)!r} cannot be a directory: {str(blocker)!r} is a file; "
            f"choose another {argument}"
        ) from error
    if not os.access(path, os.W_OK):
        raise PermissionError(
            f"{argument}={str(path)!r} is not writable; choose another {argument}"
        )
    return path


def dataclass_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config dataclass from saved values, refusing unknown fields by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**values)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path`` (replacing it)."""
    path = Path(path)
    make_directory(path.parent)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def write_json_atomic(value: Any, path: str | os.PathLike) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(json.dumps(value, indent=2) + "\n", path)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole."""
    final = Path(path)
    make_directory(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=TMP_SUFFIX, dir=final.parent))
    try:
        yield tmp
        if final.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(
                tempfile.mkdtemp(prefix=final.name + ".old.", suffix=TMP_SUFFIX, dir=final.parent)
            )
            os.replace(final, old / "previous")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
