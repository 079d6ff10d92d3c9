"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Long runs are killed; a checkpoint, manifest or results file written in place could then be
left half-written and loaded later. Everything is written to a temporary sibling first and
renamed into place (a rename within one directory is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Suffix of temporary siblings; a resumed run may delete anything ending with it.
TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path`` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    final.parent.mkdir(parents=True, exist_ok=True)
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
