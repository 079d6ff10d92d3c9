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
    RUN_MARKER,
    TMP_SUFFIX,
    claim_run_directory,
    is_temporary_of,
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


def _recorded_outputs(output_dir: Path) -> list[str]:
    """Names of the outputs that the last published run wrote (from the folder's marker)."""
    try:
        marker = json.loads((output_dir / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = marker.get("outputs", []) if isinstance(marker, dict) else []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]


@contextmanager
def output_set(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Stage one run's outputs and publish them together, as one set.

    For a study that writes several outputs (results, plots, adapters, ``run.log``) into a
    folder prepared by :func:`prepare_output_dir`: write every output into the yielded staging
    folder. On success the outputs the previous run published (recorded in the folder's
    marker) are moved out, the staged ones moved in (renames only), and the marker lists the
    new set, so an older run's files never sit beside new results and ``run.log`` holds this
    run only. A name in the folder that no earlier run recorded is never replaced:
    FileExistsError before anything moves. On failure the previous outputs stay as they were
    and the staging folder stays (with its ``run.log``) until the next run in this folder.

    A study's ``main`` uses it as::

        root = prepare_output_dir(config.output_dir)
        with output_set(root) as output_dir:
            logger = setup_logging(output_dir, __name__, append=False)
            ...  # every output written under output_dir
    """
    root = Path(output_dir)
    for entry in root.iterdir():
        if is_temporary_of(entry.name, STAGING):  # also matches the ".old" trash folders
            shutil.rmtree(entry, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING + ".", suffix=TMP_SUFFIX, dir=root))
    yield staging
    previous = set(_recorded_outputs(root))
    produced = sorted(entry.name for entry in staging.iterdir())
    foreign = [n for n in produced if (root / n).exists() and n not in previous]
    if foreign:
        raise FileExistsError(
            f"output_dir={str(root)!r} already holds {foreign}, which no earlier run recorded "
            f"as its output, so they are not replaced; this run's outputs stay in "
            f"{str(staging)!r} until the next run in this folder: move those files away and "
            "rerun, or choose a new output_dir"
        )
    trash = Path(tempfile.mkdtemp(prefix=STAGING + ".old.", suffix=TMP_SUFFIX, dir=root))
    for name in sorted(previous):
        if (root / name).exists() or (root / name).is_symlink():
            os.replace(root / name, trash / name)
    for name in produced:
        os.replace(staging / name, root / name)
    marker = {}
    try:
        marker = json.loads((root / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    marker = marker if isinstance(marker, dict) else {}
    write_json_atomic({**marker, "outputs": produced}, root / RUN_MARKER)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
