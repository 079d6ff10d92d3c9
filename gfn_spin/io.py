"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Long runs are killed; a checkpoint, manifest or results file written in place could then be
left half-written and loaded later. Everything is written to a temporary sibling first and
renamed into place (a rename within one directory is atomic on POSIX).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

T = TypeVar("T")

#: Suffix of temporary siblings (``<final name>.<8 random characters>.tmp``).
TMP_SUFFIX = ".tmp"
#: The file that marks a folder as a run folder of gfn-spin (written first, before any output).
RUN_MARKER = ".gfn-spin-run.json"
#: The lock file held by the run writing into a run folder.
LOCK_FILE = ".gfn-spin.lock"


class DirectoryInUseError(RuntimeError):
    """Another run (another process) holds the lock of a run folder."""


def is_temporary_of(name: str, final_name: str) -> bool:
    """Whether ``name`` is a temporary sibling that the atomic writers here make for
    ``final_name`` (``final_name.<random>.tmp`` or ``final_name.old.<random>.tmp``).

    A run removes leftovers of its own interrupted writes with this test only, so a file
    that merely ends in ``.tmp`` is never touched.
    """
    pattern = re.escape(final_name) + r"(\.old)?\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX)
    return re.fullmatch(pattern, name) is not None


_LOCKS: dict[Path, FileLock] = {}


def lock_directory(path: str | os.PathLike, argument: str = "output_dir") -> FileLock:
    """Take the exclusive lock of the run folder ``path`` (re-entrant within one process).

    Raises:
        DirectoryInUseError: another process holds it; the message names ``argument``.
    """
    key = Path(path).expanduser().resolve()
    lock = _LOCKS.get(key)
    if lock is None:
        lock = FileLock(str(key / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DirectoryInUseError(
            f"{argument}={str(path)!r} is in use by another run (it holds {str(key / LOCK_FILE)!r}); "
            f"wait for that run to finish, or choose another {argument}"
        ) from None
    _LOCKS[key] = lock
    return lock


def claim_run_directory(
    path: str | os.PathLike,
    argument: str = "output_dir",
    *,
    tool: str,
    is_earlier_run: Callable[[Path], bool] | None = None,
) -> tuple[Path, FileLock]:
    """Create or reuse the run folder ``path`` for ``tool``; lock it; mark it as a run folder.

    For every command that writes outputs into a folder a user names. A folder that exists,
    is not empty and carries no :data:`RUN_MARKER` (nor passes ``is_earlier_run``) holds
    files this package did not write: it is refused, before anything is written into it, so
    that no user file is ever overwritten or deleted (``--output-dir .`` in a project folder,
    say). A run folder of another tool (its marker names it) is refused too. The lock is
    held until :meth:`FileLock.release` (or the end of the process).

    Raises:
        NotADirectoryError, PermissionError: ``path`` cannot be a writable directory.
        FileExistsError: a non-empty folder that is not a run folder of ``tool``.
        DirectoryInUseError: another run holds the folder's lock.
    """
    root = make_directory(path, argument)
    marker = root / RUN_MARKER

    def check() -> None:
        if marker.exists():
            owner = _marker_tool(marker)
            if owner != tool:
                raise FileExistsError(
                    f"{argument}={str(path)!r} is a run folder of {owner or 'an unknown tool'} "
                    f"(its {RUN_MARKER}), not of {tool}; runs of different tools never share a "
                    f"folder: choose another {argument}"
                )
            return
        if is_earlier_run is not None and is_earlier_run(root):
            return
        others = sorted(e.name for e in root.iterdir() if e.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise FileExistsError(
                f"{argument}={str(path)!r} is not empty ({shown}) and is not a gfn-spin run "
                f"folder (no {RUN_MARKER}); gfn-spin never writes over files it did not write: "
                f"choose a new or empty {argument}"
            )

    check()  # before the lock file appears in a folder that is not ours
    lock = lock_directory(root, argument)
    try:
        check()
        if not marker.exists():
            write_json_atomic({"tool": tool}, marker)
    except BaseException:
        lock.release()
        raise
    return root, lock


def _marker_tool(marker: Path) -> str | None:
    """The tool named in a run folder's marker (None when the marker is unreadable)."""
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tool = value.get("tool") if isinstance(value, dict) else None
    return tool if isinstance(tool, str) else None


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


#: Written into every directory :func:`atomic_directory` publishes: proof that this package
#: wrote it, so that a later save may replace it.
DIRECTORY_MARKER = ".gfn-spin-dir"


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    An existing ``path`` is replaced only when it is empty or was itself written here (it
    holds :data:`DIRECTORY_MARKER`); any other folder is refused with FileExistsError before
    the work inside the block starts, so a user's folder is never moved or deleted.
    """
    final = Path(path)
    make_directory(final.parent)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(f"{str(final)!r} exists and is not a folder; choose another path")
    if final.is_dir() and any(final.iterdir()) and not (final / DIRECTORY_MARKER).is_file():
        raise FileExistsError(
            f"{str(final)!r} holds files that gfn-spin did not write (no {DIRECTORY_MARKER}); "
            "it never replaces such a folder: choose a new path, or move that folder away"
        )
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=TMP_SUFFIX, dir=final.parent))
    try:
        yield tmp
        (tmp / DIRECTORY_MARKER).touch()
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


def save_pretrained_atomic(model: Any, path: str | os.PathLike) -> Path:
    """``model.save_pretrained`` (a Policy, a transformers or peft model) into ``path`` as
    one atomic folder (:func:`atomic_directory`): a kill leaves the old folder or the new one."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
    return Path(path)


def cache_directory(name: str) -> Path:
    """Where gfn-spin caches what it builds under ``name`` (the tiny worlds' models):
    ``$GFN_SPIN_CACHE/<name>``, else ``~/.cache/gfn_spin/<name>``."""
    root = os.environ.get("GFN_SPIN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gfn_spin"
    )
    return Path(root) / name
