"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Long runs are killed; a checkpoint, manifest or results file written in place could then be
left half-written and loaded later. Everything is written to a temporary sibling first and
renamed into place (a rename within one directory is atomic on POSIX).

Why one module over 400 lines: claiming, staging, publishing and pruning are one protocol over
one ownership marker, whose rules (never touch a file the toolkit did not write) must be read
together.
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


def settings_as_applied(config: Any) -> dict[str, Any]:
    """A config dataclass as a dict of the settings it applies, for the records a run writes
    (a manifest, results.json): the fields of a nested config that the owner sets itself
    (listed in the nested field's ``metadata["derived"]``, such as a GFlowNet's length cap,
    adapter name and seed) are left out, so that no record shows a value that was not used."""
    values = dataclasses.asdict(config)
    for field in dataclasses.fields(config):
        nested = values.get(field.name)
        for name in field.metadata.get("derived", ()):
            if isinstance(nested, dict):
                nested.pop(name, None)
    return values


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


#: Written into every directory :func:`atomic_directory` publishes: the JSON list of the files
#: this package wrote there (``{"files": [...], "complete": true}``), so that a later save
#: replaces or removes those files and no other. An empty marker (older versions) proves the
#: folder is gfn-spin's but lists nothing: a save then replaces only the names it writes.
DIRECTORY_MARKER = ".gfn-spin-dir"


def owned_files(folder: str | os.PathLike) -> set[str] | None:
    """The files (paths relative to ``folder``, ``/``-separated) that gfn-spin recorded as
    its own in ``folder``'s :data:`DIRECTORY_MARKER`; None when the folder has no marker or
    its marker lists nothing (an older version's)."""
    marker = _read_directory_marker(Path(folder))
    files = None if marker is None else marker.get("files")
    if not isinstance(files, list):
        return None
    return {name for name in files if isinstance(name, str) and _safe_relative(name)}


def is_complete_directory(folder: str | os.PathLike) -> bool:
    """False when a save into ``folder`` started replacing its files and did not finish (its
    marker says so): the folder then mixes two saves and must not be loaded."""
    marker = _read_directory_marker(Path(folder))
    return marker is None or marker.get("complete", True) is not False


def _read_directory_marker(folder: Path) -> dict[str, Any] | None:
    try:
        text = (folder / DIRECTORY_MARKER).read_text(encoding="utf-8")
        value = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _safe_relative(name: str) -> bool:
    """A recorded name that stays inside its folder (a tampered marker cannot point outside)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (symlinks count as files, never followed), relative, sorted."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        base = Path(directory).relative_to(folder)
        found += [(base / name).as_posix() for name in files]
        found += [
            (base / name).as_posix() for name in subdirs if (Path(directory) / name).is_symlink()
        ]
    return sorted(found)


def staged_files(staged: Path) -> list[str]:
    """The files a staged folder will publish (its own marker aside), relative, sorted."""
    return [name for name in _files_under(staged) if name != DIRECTORY_MARKER]


def unowned_destinations(files: list[str], final: Path, owned: set[str] | None) -> list[str]:
    """Which of ``files`` (relative to ``final``) would replace something gfn-spin did not write
    there: an existing file not in ``owned`` (any name may be replaced when ``owned`` is None),
    a folder where a file goes, or a path through a symlink or a file."""
    conflicts = []
    for name in files:
        destination = final / name
        parents = [final / p for p in Path(name).parents if str(p) != "."]
        if any(p.is_symlink() or (p.exists() and not p.is_dir()) for p in parents):
            conflicts.append(name)
        elif destination.is_dir() and not destination.is_symlink():
            conflicts.append(name)
        elif destination.exists() or destination.is_symlink():
            if owned is not None and name not in owned:
                conflicts.append(name)
    return conflicts


def publish_files(
    staged: Path,
    final: Path,
    owned: set[str] | None,
    before_moving: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Move every file of the folder ``staged`` into ``final`` at the same relative path, each
    by one atomic rename, and remove the files of ``owned`` that this set does not rewrite.

    For any save into a folder gfn-spin wrote before: ``owned`` names the files the earlier
    save wrote (None: unknown, then only names written again are replaced and nothing is
    removed). A file a user added to the folder is never replaced, moved or removed: a
    destination that exists but is not in ``owned`` (or is a folder or a symlinked folder
    where a file goes) is refused with FileExistsError before anything moves. Once the set is
    known to be publishable, ``before_moving(files)`` runs (to mark the folder as being
    written). Folders left empty by a removal are removed. Returns the files now published,
    relative, sorted.
    """
    produced = staged_files(staged)
    conflicts = unowned_destinations(produced, final, owned)
    if conflicts:
        raise FileExistsError(
            f"{str(final)!r} holds {conflicts[:5]}, which gfn-spin did not write there; a save "
            "never replaces a file it did not write: move those files away, or save elsewhere"
        )
    if before_moving is not None:
        before_moving(produced)
    for name in produced:
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / name, final / name)
    for name in sorted((owned or set()) - set(produced) - {DIRECTORY_MARKER}):
        _remove_file(final, name)
    return produced


def _remove_file(root: Path, name: str) -> None:
    """Unlink ``root/name`` (a file or a link, never what a link points to; no path through a
    symlinked folder), then the folders it leaves empty below ``root``."""
    path = root / name
    if any((root / p).is_symlink() for p in Path(name).parents if str(p) != "."):
        return
    if path.is_symlink() or path.is_file():
        path.unlink()
        _prune_empty(path.parent, root)


def _prune_empty(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``root`` while they are empty."""
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:  # not empty (a user's file, say) or gone: leave it
            return
        directory = directory.parent


def remove_owned(folder: str | os.PathLike) -> None:
    """Remove what gfn-spin wrote into ``folder`` (the files its :data:`DIRECTORY_MARKER`
    lists, then the marker), and ``folder`` itself once it is empty. A file a user added stays,
    with the folders that hold it; a folder without such a list is left as it is."""
    folder = Path(folder)
    owned = owned_files(folder)
    if owned is None or folder.is_symlink():
        return
    for name in sorted(owned):
        _remove_file(folder, name)
    (folder / DIRECTORY_MARKER).unlink(missing_ok=True)
    _prune_empty(folder, folder.parent)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are published at ``path``.

    A new (or empty) ``path`` appears whole, by one rename. An existing folder is written into
    only when gfn-spin wrote it (it holds :data:`DIRECTORY_MARKER`), and then only its own
    files are replaced, each by an atomic rename (:func:`publish_files`); a file a user added
    there stays as it was. Any other folder is refused with FileExistsError before the work
    inside the block starts. While files are being replaced the marker says so, so that a kill
    in between leaves a folder :func:`is_complete_directory` reports as unfinished.
    """
    final = Path(path)
    make_directory(final.parent)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(f"{str(final)!r} exists and is not a folder; choose another path")
    if final.is_dir() and any(final.iterdir()) and not (final / DIRECTORY_MARKER).is_file():
        raise FileExistsError(
            f"{str(final)!r} holds files that gfn-spin did not write (no {DIRECTORY_MARKER}); "
            "it never writes into such a folder: choose a new path, or move that folder away"
        )
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", suffix=TMP_SUFFIX, dir=final.parent))
    try:
        yield tmp
        if not final.exists() or not any(final.iterdir()):
            produced = staged_files(tmp)
            write_json_atomic({"files": produced, "complete": True}, tmp / DIRECTORY_MARKER)
            os.replace(tmp, final)  # a directory may replace an empty one
        else:
            owned = owned_files(final)
            marker = final / DIRECTORY_MARKER

            def mark_unfinished(files: list[str]) -> None:
                listed = sorted((owned or set()) | set(files))
                write_json_atomic({"files": listed, "complete": False}, marker)

            produced = publish_files(tmp, final, owned, mark_unfinished)
            write_json_atomic({"files": produced, "complete": True}, marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_atomic(model: Any, path: str | os.PathLike) -> Path:
    """``model.save_pretrained`` (a Policy, a transformers or peft model) into ``path`` with
    :func:`atomic_directory`: a new folder appears whole; an earlier save's files are replaced
    one atomic rename each, and a user's files there are kept."""
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
