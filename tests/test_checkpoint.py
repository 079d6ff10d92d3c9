"""gfn_spin.checkpoint: claimed folders, atomic numbered checkpoints, resume identity checks."""

from __future__ import annotations

import pytest

from gfn_spin.checkpoint import CheckpointDirectory, identity_differences, latest_checkpoint
from gfn_spin.io import RUN_MARKER


def _write(text: str):
    def write(folder):
        (folder / "state.json").write_text(text)

    return write


def test_checkpoints_are_numbered_atomic_and_only_the_latest_are_kept(tmp_path):
    with CheckpointDirectory(tmp_path, tool="a", required=("state.json",), keep=2) as folder:
        for step in (1, 2, 10):
            folder.save(step, _write(str(step)))
        (tmp_path / "step_0000099").mkdir()  # incomplete (no state.json): never the latest
        (tmp_path / "step_0000050.abcdefgh.tmp").mkdir()  # a killed write's temporary
        assert folder.latest() == tmp_path / "step_0000010"
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["step_0000002", "step_0000010", "step_0000050.abcdefgh.tmp", "step_0000099"]
    assert (tmp_path / "step_0000010" / "state.json").read_text() == "10"
    assert latest_checkpoint(tmp_path, ("state.json",)).name == "step_0000010"


def test_a_foreign_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="checkpoint_dir=.* is not empty .*notes.txt"):
        CheckpointDirectory(tmp_path, tool="a")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    other = tmp_path / "other"
    CheckpointDirectory(other, tool="a").close()
    assert (other / RUN_MARKER).is_file()
    with pytest.raises(FileExistsError, match="run folder of a .*not of b"):
        CheckpointDirectory(other, tool="b")
    # A folder holding checkpoints only (copied from elsewhere) is an earlier run: accepted.
    copied = tmp_path / "copied"
    (copied / "step_0000003").mkdir(parents=True)
    CheckpointDirectory(copied, tool="a").close()


def test_identity_differences_name_only_what_differs(tmp_path):
    recorded = {"lr": 0.1, "steps": 5, "model": {"name": "x", "rank": 4}}
    current = {"lr": 0.2, "steps": 9, "model": {"name": "x", "rank": 8}, "new": 1}
    assert identity_differences(recorded, current, ignore=("steps",)) == [
        "lr (run has 0.1, now 0.2)",
        "model.rank (run has 4, now 8)",
        "new (run has None, now 1)",
    ]
    explain = {"data_sha256": lambda old, new: f"the data changed: {old[:4]}…, now {new[:4]}…"}
    hashes = identity_differences({"data_sha256": "abcdef"}, {"data_sha256": "012345"}, (), explain)
    assert hashes == ["data_sha256 (the data changed: abcd…, now 0123…)"]
    with CheckpointDirectory(tmp_path, tool="a") as folder:
        folder.check_identity(recorded, {**recorded, "steps": 7}, resumable=("steps",))
        with pytest.raises(ValueError, match=r"different configuration \(lr .*choose a new"):
            folder.check_identity(recorded, {**recorded, "lr": 1.0})
