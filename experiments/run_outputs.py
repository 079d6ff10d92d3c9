"""Output folders of the runnable studies: claimed for one tool, locked while a run writes,
and a run's outputs published as one set.

For every study in ``experiments/``: :func:`prepare_output_dir` before any work, then
:func:`output_set` around everything the run writes, so that reusing a folder never leaves
an older run's files beside new results, and a folder holding files the study did not write
is refused instead of written over.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gfn_spin.io import (
    LOCK_FILE,
    RUN_MARKER,
    TMP_SUFFIX,
    claim_run_directory,
    is_temporary_of,
    publish_files,
    staged_files,
    unowned_destinations,
    write_json_atomic,
)


def _calling_module() -> str:
    """The module name of the caller's caller (``python -m x.y`` runs as ``x.y``, not
    ``__main__``), which names the tool in a run folder's marker."""
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    if caller is None:
        return "experiments"
    spec = caller.f_globals.get("__spec__")
    return getattr(spec, "name", None) or caller.f_globals.get("__name__", "experiments")


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    tool: str | None = None,
    is_earlier_run: Callable[[Path], bool] | None = None,
) -> Path:
    """Create or reuse the run folder ``path`` before any work, and hold its lock.

    A writable directory is created if missing; a non-empty folder that is not a run folder of
    this tool (no ``.gfn-spin-run.json`` marker naming it, and ``is_earlier_run`` does not
    recognize it) is refused with FileExistsError, so ``--output-dir .`` never writes over a
    project and two studies never share a folder; a
    folder another process is writing into is refused with
    :class:`gfn_spin.io.DirectoryInUseError`. The lock is held until the process ends.

    Args:
        path: the ``--output-dir`` of a study.
        tool: the name recorded in the folder's marker (default: the calling module); a
            run folder of another tool is refused.
        is_earlier_run: recognizes a run folder written before markers existed.
    """
    if tool is None:
        tool = _calling_module()
    root, _ = claim_run_directory(path, "output_dir", tool=tool, is_earlier_run=is_earlier_run)
    return root


#: Prefix of the staging folder of :func:`output_set` inside an output folder.
STAGING = ".run-outputs"


def _read_marker(output_dir: Path) -> dict:
    try:
        marker = json.loads((output_dir / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _recorded_files(output_dir: Path, marker: dict, produced: list[str]) -> set[str]:
    """The files (relative paths) the last published run wrote, from the folder's marker.

    A marker of an older version lists only top-level names: its top-level files count as
    written by it, and inside its folders only the files this run writes again (a file a user
    added there stays)."""
    files = marker.get("files")
    if isinstance(files, list):
        return {name for name in files if isinstance(name, str)}
    names = marker.get("outputs", [])
    names = [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
    recorded = {n for n in names if (output_dir / n).is_file() or (output_dir / n).is_symlink()}
    return recorded | {f for f in produced if f.split("/", 1)[0] in names}


@contextmanager
def output_set(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Stage one run's outputs and publish them together, as one set.

    For a study that writes several outputs (results, plots, adapters, ``run.log``) into a
    folder prepared by :func:`prepare_output_dir`: write every output into the yielded staging
    folder. On success each staged file replaces its namesake by one atomic rename, the files
    the previous run published (listed in the folder's marker) that this run does not write
    again are removed, and the marker lists the new set, so an older run's files never sit
    beside new results and ``run.log`` holds this run only. A file no earlier run recorded
    (a user's, also inside an adapter folder of an earlier run) is never replaced, moved or
    removed: one that this run would replace is refused with FileExistsError before anything
    moves. On failure the previous outputs stay as they were and the staging folder stays
    (with its ``run.log``) until the next run in this folder.

    A study's ``main`` uses it as::

        root = prepare_output_dir(config.output_dir)
        with output_set(root) as output_dir:
            logger = setup_logging(output_dir, __name__, append=False)
            ...  # every output written under output_dir
    """
    root = Path(output_dir)
    for entry in root.iterdir():
        if is_temporary_of(entry.name, STAGING):  # also matches older versions' ".old" folders
            shutil.rmtree(entry, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING + ".", suffix=TMP_SUFFIX, dir=root))
    yield staging
    marker = _read_marker(root)
    produced = staged_files(staging)
    previous = _recorded_files(root, marker, produced) - {RUN_MARKER, LOCK_FILE}
    foreign = unowned_destinations(produced, root, previous)
    if foreign:
        raise FileExistsError(
            f"output_dir={str(root)!r} already holds {foreign[:5]}, which no earlier run "
            f"recorded as its output, so they are not replaced; this run's outputs stay in "
            f"{str(staging)!r} until the next run in this folder: move those files away and "
            "rerun, or choose a new output_dir"
        )
    published = publish_files(staging, root, previous)
    outputs = sorted({name.split("/", 1)[0] for name in published})
    write_json_atomic({**marker, "outputs": outputs, "files": published}, root / RUN_MARKER)
    shutil.rmtree(staging, ignore_errors=True)
