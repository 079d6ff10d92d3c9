"""An α-SPIN run folder: the manifest that lists completed steps, and the rules that keep a
user's files safe in it.

For :class:`selfplay.AlphaSpinTrainer`, which resumes a killed run from its folder. The folder
is claimed for the run (a marker file, a lock held while the run writes), a resume must match
the run's identity (config, data hash, world) and is refused naming only what differs, and
the run removes only leftovers it can prove it wrote: temporaries named as its own atomic
writers name them, and ``iterates/iter_N`` folders the manifest does not list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState

from gfn_spin.checkpoint import identity_differences
from gfn_spin.io import (
    DIRECTORY_MARKER,
    RUN_MARKER,
    claim_run_directory,
    is_temporary_of,
    make_directory,
    owned_files,
    remove_owned,
    write_json_atomic,
)
from samplers.gflownet.config import RUN_DERIVED_FIELDS
from selfplay.iterates import iterate_name

#: The run's manifest: identity, completed steps and per-iterate records.
MANIFEST = "manifest.json"
#: Identity key of the SHA-256 of the run's (prompt, response) pairs.
DATA_HASH = "data_sha256"
#: The tool named in an α-SPIN run folder's marker (:data:`gfn_spin.io.RUN_MARKER`).
RUN_TOOL = "selfplay.AlphaSpinTrainer"
#: Manifest key of the SHA-256 of what each completed step wrote (data files, iterates).
CONTENT_HASHES = "content_sha256"


def content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in name order;
    the folder's :data:`gfn_spin.io.DIRECTORY_MARKER` and files a user added are left out
    when the marker lists what gfn-spin wrote)."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        owned = owned_files(path)
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name != DIRECTORY_MARKER
            and (owned is None or p.relative_to(path).as_posix() in owned)
        )
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _data_change(old: Any, new: Any) -> str:
    return (
        f"the dataset's content differs from the run's: sha256 {str(old)[:12]}…, now "
        f"{str(new)[:12]}…; rows were edited, added or removed since the run started"
    )


def _forget_derived(identity: dict[str, Any]) -> None:
    """Drop the GFlowNet settings the run sets itself from a run recorded before they were
    left out of the record (they were never applied), so that such a run still resumes."""
    config = identity.get("config")
    gflownet = config.get("gflownet") if isinstance(config, dict) else None
    if isinstance(gflownet, dict):
        for name in RUN_DERIVED_FIELDS:
            gflownet.pop(name, None)


def _run_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run identities: config fields by their own names (the user's
    flags), then the other keys (data hash, world)."""
    old_config, new_config = recorded.get("config"), current.get("config")
    if isinstance(old_config, dict) and isinstance(new_config, dict):
        differences, ignore = identity_differences(old_config, new_config), ("config",)
    else:
        differences, ignore = [], ()
    return differences + identity_differences(
        recorded, current, ignore, explain={DATA_HASH: _data_change}
    )


#: Files the run writes at the top of its folder (their temporaries are its leftovers).
_ROOT_FILES = (MANIFEST, "metrics.json", "results.json", RUN_MARKER)
_DATA_FILE = re.compile(r"iteration_\d+\.parquet")
_ITERATE = re.compile(r"iter_\d+")
_OPPONENT = re.compile(r"gflownet_\d+")


class RunDirectory:
    """``output_dir``: manifest.json (the source of truth), data/, iterates/, opponents/,
    metrics.json.

    ``identity`` is what a resume must match (the config without ``resumable`` fields, the
    data's hash under :data:`DATA_HASH`, the world); ``resumable`` names the config fields a
    resume may change, for the refusal's message. ``state`` (an ``accelerate`` state or
    ``Accelerator``) says which process writes (the main one) and where they all wait.

    A step counts as done only once the manifest lists it; anything else the run finds of
    its own (a temporary file of its own writers, an iterate written just before a kill) is
    ignored and rewritten. The folder is locked while the run holds it (see :meth:`close`);
    a non-empty folder that is not a run of this package is refused, and nothing the run
    did not write is ever deleted.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        identity: dict[str, Any],
        state: PartialState,
        resumable: Sequence[str] = (),
    ):
        self.root = Path(root)
        self.state = state
        self.path = self.root / MANIFEST
        self._lock = None
        if state.is_main_process:
            make_directory(self.root, "output_dir")  # an unwritable output_dir fails before work
            self._read_manifest()  # a damaged manifest is refused before anything is written
            _, self._lock = claim_run_directory(
                self.root,
                "output_dir",
                tool=RUN_TOOL,
                is_earlier_run=lambda root: (root / MANIFEST).is_file(),
            )
        try:
            manifest = self._read_manifest()
            if manifest is not None:
                _forget_derived(manifest["identity"])
            if manifest is not None and DATA_HASH not in manifest["identity"]:
                # A run recorded without the data's hash: trust the data once, record it now.
                manifest["identity"][DATA_HASH] = identity.get(DATA_HASH)
            if manifest is not None and manifest["identity"] != identity:
                detail = "; ".join(_run_differences(manifest["identity"], identity))
                raise ValueError(
                    f"output_dir={str(self.root)!r} holds a run with a different configuration: "
                    f"{detail}. A resume may change only {', '.join(resumable)}; resume "
                    "with the run's values of the settings above, or choose a new output_dir"
                )
            self.manifest = manifest or {"identity": identity, "done": [], "records": []}
            if state.is_main_process:
                self._clean()
                self._check_contents()
                if manifest is not None:
                    # metrics.json mirrors the manifest's records: rewrite it, whatever it holds.
                    write_json_atomic(self.manifest, self.path)
                    write_json_atomic(self.manifest["records"], self.root / "metrics.json")
        except BaseException:
            self.close()
            raise
        state.wait_for_everyone()

    def close(self) -> None:
        """Release the folder's lock (the main process holds it from construction on)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            manifest = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not {"identity", "done", "records"} <= set(
                manifest
            ):
                found = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
                raise ValueError(f"expected keys identity, done, records; found {found}")
            if not isinstance(manifest["identity"], dict):
                raise ValueError("identity is not an object")
            if not (
                isinstance(manifest["done"], list)
                and all(isinstance(step, str) for step in manifest["done"])
            ):
                raise ValueError("done is not a list of step names")
            if not (
                isinstance(manifest["records"], list)
                and all(
                    isinstance(r, dict) and isinstance(r.get("iteration"), int)
                    for r in manifest["records"]
                )
            ):
                raise ValueError("records is not a list of records with an integer iteration")
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            # Written atomically, so this is outside damage: refuse rather than guess.
            raise ValueError(
                f"output_dir={str(self.root)!r} has a corrupted {MANIFEST} ({error}); delete "
                "the run directory to start over, or choose a new output_dir"
            ) from error
        return manifest

    def _clean(self) -> None:
        """Remove leftovers of this run's own interrupted writes, and only those.

        Temporaries are recognized by the exact names the atomic writers give them
        (:func:`gfn_spin.io.is_temporary_of`) next to the files the run writes, in the run's
        own subfolders (``iterates/iter_N``, ``opponents/gflownet_N``); an unlisted iterate is
        an ``iter_N`` folder inside ``iterates/``.
        """

        def remove(entry: Path) -> None:  # a temporary of this run's own writers
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

        for entry in self.root.iterdir():
            if any(is_temporary_of(entry.name, name) for name in _ROOT_FILES):
                remove(entry)
        data = self.root / "data"
        if data.is_dir() and not data.is_symlink():
            for entry in data.iterdir():
                final, _, _ = entry.name.partition(".parquet.")
                if _DATA_FILE.fullmatch(final + ".parquet") and is_temporary_of(
                    entry.name, final + ".parquet"
                ):
                    remove(entry)
        iterates = self.root / "iterates"
        if iterates.is_dir() and not iterates.is_symlink():
            for entry in iterates.iterdir():
                final = entry.name.split(".", 1)[0]
                if not _ITERATE.fullmatch(final):
                    continue  # not a name this run writes: leave it alone
                if entry.name == final:
                    if f"train_{final}" not in self.manifest["done"]:
                        remove_owned(entry)  # the iterate's files; a user's file there stays
                elif is_temporary_of(entry.name, final):
                    remove(entry)
        opponents = self.root / "opponents"
        if opponents.is_dir() and not opponents.is_symlink():
            for entry in opponents.iterdir():
                final = entry.name.split(".", 1)[0]
                if _OPPONENT.fullmatch(final) and is_temporary_of(entry.name, final):
                    remove(entry)

    def _written_by(self, step: str) -> Path | None:
        """What a completed step wrote: ``data_t`` its parquet, ``train_iter_t`` its iterate."""
        if re.fullmatch(r"data_\d+", step):
            return self.data_path(int(step[5:]))
        if re.fullmatch(r"train_iter_\d+", step):
            return self.iterate_path(int(step[11:]))
        return None

    def _check_contents(self) -> None:
        """Refuse a run whose saved data or iterates differ from what it wrote (edited,
        replaced by zeros, swapped with another run's): each was hashed when its step was
        recorded, and a resume would otherwise train on, or score against, something else."""
        hashes = self.manifest.get(CONTENT_HASHES, {})
        if not isinstance(hashes, dict):
            raise ValueError(
                f"output_dir={str(self.root)!r} has a corrupted {MANIFEST} ({CONTENT_HASHES} is "
                "not an object); delete the run directory to start over, or choose a new output_dir"
            )
        for step in self.manifest["done"]:
            path = self._written_by(step)
            if path is not None and not path.exists():
                raise ValueError(
                    f"output_dir={str(self.root)!r}: {MANIFEST} lists step {step} as done, but "
                    f"{path.relative_to(self.root)} is missing (removed, or the manifest was "
                    "edited). Restore it, or start the run afresh in a new output_dir"
                )
        for step, recorded in sorted(hashes.items()):
            path = self._written_by(step)
            if path is None or step not in self.manifest["done"]:
                continue
            now = content_sha256(path)
            if now != recorded:
                raise ValueError(
                    f"output_dir={str(self.root)!r}: {path.relative_to(self.root)} differs from "
                    f"what the run wrote at step {step} (sha256 {str(recorded)[:12]}…; it now "
                    f"has sha256 {now[:12]}…): it was edited or replaced since. Restore it, or "
                    "start the run afresh in a new output_dir"
                )

    def done(self, step: str) -> bool:
        return step in self.manifest["done"]

    def complete(self, step: str, record: dict[str, Any] | None = None) -> None:
        """Mark ``step`` done (and append its record, and the content hash of what it wrote)
        with one atomic manifest write."""
        if record is not None:
            self.manifest["records"].append(record)
        self.manifest["done"].append(step)
        written = self._written_by(step)
        if self.state.is_main_process and written is not None and written.exists():
            self.manifest.setdefault(CONTENT_HASHES, {})[step] = content_sha256(written)
        if self.state.is_main_process:
            write_json_atomic(self.manifest, self.path)
            write_json_atomic(self.manifest["records"], self.root / "metrics.json")
        self.state.wait_for_everyone()

    def data_path(self, t: int) -> Path:
        return self.root / "data" / f"iteration_{t}.parquet"

    def iterate_path(self, t: int) -> Path:
        return self.root / "iterates" / iterate_name(t)

    def opponent_path(self, t: int) -> Path:
        """Where iteration t's fitted GFlowNet opponent is saved (the next one warm-starts
        from it, also after a resume)."""
        return self.root / "opponents" / f"gflownet_{t}"

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.manifest["records"])
