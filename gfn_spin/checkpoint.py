"""A folder of numbered, atomically written checkpoints that a long job resumes from.

For any job that can be killed and restarted: the GFlowNet fit (``samplers.gflownet``) uses it
for ``checkpoint_dir``, and self-play's run directory can share it. What it guarantees:

- the folder is claimed for one tool (a marker file names it, a lock is held while the job
  writes); a non-empty folder without the marker that is not an earlier run of the job, or a
  folder of another tool, is refused before anything is written, so no user file is touched;
- a checkpoint ``step_NNNNNNN/`` appears complete under its final name or not at all (written
  to a temporary sibling, then renamed); older ones are removed only once a newer one exists,
  and only folders named as this module names them, and of those only the files a save
  wrote (a user's file in a checkpoint folder stays, with its folder);
- a resume is checked against the job's identity (the settings that shape its trajectory):
  :func:`identity_differences` names every setting that differs, and
  :meth:`CheckpointDirectory.check_identity` refuses with them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from gfn_spin.io import (
    atomic_directory,
    claim_run_directory,
    is_complete_directory,
    remove_owned,
)

_CHECKPOINT = re.compile(r"step_(\d{7,})")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` steps."""
    return f"step_{step:07d}"


def identity_differences(
    recorded: dict[str, Any],
    current: dict[str, Any],
    ignore: Sequence[str] = (),
    explain: Mapping[str, Callable[[Any, Any], str]] | None = None,
) -> list[str]:
    """``name (run has X, now Y)`` for every key whose value differs between two identities
    (nested dicts compared key by key, so a refusal names only what differs); keys in
    ``ignore`` are settings a resume may change; ``explain[key](old, new)`` words the
    difference of a key whose raw values mean little to a user (a data hash, say)."""
    explain = explain or {}
    differences = []
    for key in sorted(set(recorded) | set(current)):
        if key in ignore:
            continue
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            nested = identity_differences(old, new, ignore, explain)
            differences += [f"{key}.{d}" for d in nested]
        elif old != new:
            words = explain[key](old, new) if key in explain else f"run has {old!r}, now {new!r}"
            differences.append(f"{key} ({words})")
    return differences


class CheckpointDirectory:
    """``root/step_NNNNNNN/`` checkpoints of one job, claimed for ``tool``.

    Args:
        root: the folder (created when missing).
        tool: who writes it (recorded in the folder's marker; another tool's folder is refused).
        argument: the user-facing name of ``root`` in error messages (``checkpoint_dir``).
        required: files a checkpoint must hold to count as complete (an incomplete folder,
            left by other means than this class, is never loaded).
        keep: how many of the latest complete checkpoints to keep (at least 1).

    Use :meth:`close` (or ``with``) to release the folder's lock.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        tool: str,
        argument: str = "checkpoint_dir",
        required: Sequence[str] = (),
        keep: int = 1,
    ) -> None:
        self.root = Path(root)
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.required = tuple(required)
        self.keep = keep
        self._lock: FileLock | None
        _, self._lock = claim_run_directory(
            self.root, argument, tool=tool, is_earlier_run=lambda path: bool(checkpoints(path))
        )

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> CheckpointDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step (None if none)."""
        return latest_checkpoint(self.root, self.required)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write the checkpoint of ``step`` with ``write(folder)``, atomically; then remove
        complete checkpoints beyond the latest ``keep`` (this one counted; an incomplete folder
        is left alone)."""
        final = self.root / checkpoint_name(step)
        with atomic_directory(final) as tmp:
            write(tmp)
        complete = [p for p in checkpoints(self.root) if p != final and self._complete(p)]
        for old in sorted(complete, key=_step, reverse=True)[self.keep - 1 :]:
            remove_owned(old)
        return final

    def _complete(self, path: Path) -> bool:
        return _complete(path, self.required)

    def check_identity(
        self,
        recorded: dict[str, Any],
        current: dict[str, Any],
        resumable: Sequence[str] = (),
        argument: str = "checkpoint_dir",
    ) -> None:
        """Refuse to resume when ``current`` differs from the ``recorded`` identity outside
        the ``resumable`` keys, naming each difference and the fix."""
        check_identity(self.root, recorded, current, resumable, argument)


def check_identity(
    root: str | os.PathLike,
    recorded: dict[str, Any],
    current: dict[str, Any],
    resumable: Sequence[str] = (),
    argument: str = "checkpoint_dir",
) -> None:
    """:meth:`CheckpointDirectory.check_identity` for a process that reads ``root`` without
    claiming it (a data-parallel worker other than the one that writes)."""
    differences = identity_differences(recorded, current, resumable)
    if differences:
        raise ValueError(
            f"{argument}={str(root)!r} holds a run with a different configuration "
            f"({'; '.join(differences)}); resume with the original settings or choose a "
            f"new {argument}"
        )


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """Finished ``step_NNNNNNN`` folders (temporary siblings of an interrupted write excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]


def latest_checkpoint(root: str | os.PathLike, required: Sequence[str] = ()) -> Path | None:
    """The checkpoint of ``root`` with the highest step that holds every ``required`` file."""
    found = [p for p in checkpoints(root) if _complete(p, required)]
    return max(found, key=_step) if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint folder was taken at, from its name (``step_0000002`` → 2)."""
    return _step(Path(path))


def read_step_log(path: str | os.PathLike) -> tuple[int, list[dict[str, Any]]]:
    """``(step, metrics)`` of a checkpoint's metrics file (``{"step": N, "metrics": [...]}``).

    For a resume, which restarts the step counter from it: the step must be the one the
    checkpoint folder is named after (the file is the only thing that could say otherwise,
    and a step no checkpoint backs would skip training it never did).

    Raises:
        ValueError: the file is not JSON of that shape, or its step differs from the folder's;
            the message names the file and the fix.
    """
    path = Path(path)
    expected = checkpoint_step(path.parent)
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(log, dict):
            raise ValueError(f"it holds a JSON {type(log).__name__}, not an object")
        step, metrics = log.get("step"), log.get("metrics")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step is {step!r}, not an integer")
        if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
            raise ValueError("metrics is not a list of records")
    except UnicodeDecodeError:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text, so not the JSON a checkpoint writes; delete the "
            "checkpoint folder that holds it (the fit then resumes from an earlier one or from "
            "scratch)"
        ) from None
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{str(path)!r} is corrupted ({' '.join(str(error).split())[:200]}); delete the "
            "checkpoint folder that holds it (the fit then resumes from an earlier one or "
            "from scratch)"
        ) from error
    if step != expected:
        raise ValueError(
            f"{str(path)!r} says step {step}, but it is in the checkpoint of step {expected} "
            f"({path.parent.name}); no checkpoint backs step {step}, so the file was edited: "
            "delete that checkpoint folder, or restore the file"
        )
    return step, metrics


def _complete(path: Path, required: Sequence[str]) -> bool:
    """Every required file is there, and no save into the folder was cut short."""
    return all((path / name).is_file() for name in required) and is_complete_directory(path)


def _step(path: Path) -> int:
    return int(path.name[5:])
