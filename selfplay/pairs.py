"""The (prompt, response) pairs of a self-play run, from any ``datasets`` source.

:func:`load_pairs` (a hub name, a local json/jsonl/parquet/csv file or folder, or a
``datasets.Dataset``) gives a dataset with string columns ``prompt`` and ``response``.
Turning text into token ids is :func:`gfn_spin.data.encode_example`'s job; an iteration's
parquet file is :mod:`selfplay.iteration_data`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from gfn_spin.data import first_problems

#: File suffixes ``datasets`` loads by builder name.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def _split_messages(messages: Any, row: int, column: str) -> tuple[Any, Any]:
    """(first user content, last assistant content) of one chat (row ``row`` of ``column``)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(
            f"row {row} of messages_column={column!r} is {type(messages).__name__}, not a list "
            'of {"role": ..., "content": ...} turns'
        )
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    assistants = [m.get("content") for m in messages if m.get("role") == "assistant"]
    if not users or not assistants:
        raise ValueError(
            f"row {row} of messages_column={column!r} lacks a user or an assistant turn: "
            f"{messages!r:.200}"
        )
    return users[0], assistants[-1]


#: Marker files of a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
_SAVED_TO_DISK = ("dataset_info.json", "state.json", "dataset_dict.json")


def _unreadable(source: Any, error: BaseException, how: str) -> ValueError:
    return ValueError(
        f"dataset={str(source)!r} could not be read {how} ({type(error).__name__}: "
        f"{str(error)[:300]}); check that the file is complete, UTF-8 text (json/jsonl/csv), "
        "and holds one record per row (jsonl: one JSON object per line; json: a list of objects)"
    )


def _load_source(source: str | os.PathLike, split: str) -> Dataset:
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset={str(source)!r} has suffix {path.suffix!r}; give a .json, .jsonl, "
                ".parquet, .csv or .arrow file, a folder of them, a folder written by "
                "save_to_disk, or a hub dataset name"
            )
        if path.stat().st_size == 0:
            raise ValueError(f"dataset={str(source)!r} is an empty file; give a file with rows")
        try:
            return load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # datasets/pyarrow raise many types for damaged files
            raise _unreadable(source, error, f"as {builder}") from error
    if str(source).startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"dataset={str(source)!r} does not exist")
    if path.is_dir() and any((path / name).is_file() for name in _SAVED_TO_DISK):
        try:
            saved = load_from_disk(str(path))
        except Exception as error:
            raise _unreadable(source, error, "with datasets.load_from_disk") from error
        if isinstance(saved, DatasetDict):
            if split not in saved:
                raise ValueError(
                    f"dataset_split={split!r} is not a split of dataset={str(source)!r}; "
                    f"splits: {sorted(saved)}"
                )
            return saved[split]
        return saved
    # A folder of data files or a hub name: the ordinary loader (no network in tests).
    try:
        return load_dataset(str(source), split=split)
    except Exception as error:
        if not path.is_dir():
            raise  # a hub name: the loader's own message (network, missing repository)
        raise _unreadable(source, error, f"as a folder of data files (split={split!r})") from error


def _check_fields(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    """Refuse rows whose prompt is not a non-empty string or whose response is not a string.

    An empty response is a real response (end of sequence at once) and is kept.
    """
    bad = []
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if not isinstance(prompt, str):
            bad.append(f"row {row}: prompt is {prompt!r:.60} ({type(prompt).__name__})")
        elif not prompt.strip():
            bad.append(f"row {row}: prompt is empty")
        if not isinstance(response, str):
            bad.append(f"row {row}: response is {response!r:.60} ({type(response).__name__})")
    if bad:
        raise ValueError(
            f"the dataset has rows without a usable prompt or response (rows count from 0): "
            f"{first_problems(bad, '; ', 'problems')}. Every prompt must be a non-empty string and every response a string: "
            "fix or drop these rows, or map other columns"
        )


def load_pairs(
    source: str | os.PathLike | Dataset | dict[str, list[Any]],
    *,
    split: str = "train",
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str | None = None,
    max_examples: int | None = None,
) -> Dataset:
    """(prompt, response) string pairs from any ``datasets`` source.

    Args:
        source: a hub dataset name, a local file (json/jsonl/parquet/csv/arrow) or folder, a
            folder written by ``save_to_disk``, a ``datasets.Dataset``, or a dict of columns.
        split: the split to read (files load as "train").
        prompt_column: the column holding prompt strings.
        response_column: the column holding the real (SFT) responses.
        messages_column: read a chat column instead (e.g. ``"real"`` of the SPIN data): the
            first user turn is the prompt and the last assistant turn the response.
        max_examples: keep only the first ``max_examples`` rows.

    Returns:
        a ``Dataset`` with exactly the string columns ``prompt`` and ``response``.

    Raises:
        ValueError: an unreadable source, a missing column, no rows, or a row whose prompt is
            not a non-empty string or whose response is not a string (rows named).
    """
    if isinstance(source, dict):
        source = Dataset.from_dict(source)
    data = source if isinstance(source, Dataset) else _load_source(source, split)
    if messages_column is not None:
        if messages_column not in data.column_names:
            raise ValueError(
                f"messages_column={messages_column!r} is not a column; columns: {data.column_names}"
            )
        column = data[messages_column]
        if max_examples is not None:
            column = column[:max_examples]
        pairs = [_split_messages(m, row, messages_column) for row, m in enumerate(column)]
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    else:
        for name, column in (
            ("prompt_column", prompt_column),
            ("response_column", response_column),
        ):
            if column not in data.column_names:
                raise ValueError(
                    f"{name}={column!r} is not a column of the dataset; columns: "
                    f"{data.column_names}. Map the columns with --{name.replace('_', '-')} "
                    "or read chat messages with --messages-column"
                )
        prompts, responses = list(data[prompt_column]), list(data[response_column])
    if max_examples is not None:
        prompts, responses = prompts[:max_examples], responses[:max_examples]
    if not prompts:
        raise ValueError("the dataset has no rows; check the source, split and max_examples")
    _check_fields(prompts, responses)
    return Dataset.from_dict({"prompt": prompts, "response": responses})


def pairs_fingerprint(pairs: Dataset) -> str:
    """SHA-256 of the (prompt, response) pairs' content, recorded by a run to detect edits."""
    digest = hashlib.sha256()
    for prompt, response in zip(pairs["prompt"], pairs["response"], strict=True):
        digest.update(json.dumps([prompt, response], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
