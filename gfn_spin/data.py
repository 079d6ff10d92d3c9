"""Data IO for self-play: load (prompt, response) pairs from any ``datasets`` source, turn them
into token ids through the chat template, and write each iteration's data as parquet.

The path a newcomer can walk: :func:`load_pairs` (a hub name, a local json/jsonl/parquet/csv
file or folder, or a ``datasets.Dataset``) gives a dataset with string columns ``prompt`` and
``response``; :func:`encode_example` is the *one* function that turns a prompt (and a response)
into token ids, used for generation and for training alike (the official SPIN code used two
templates; we use one); :func:`write_parquet` writes an iteration's data atomically with the
chat columns ``real`` and ``generated`` of the published SPIN data, readable with
:func:`load_parquet` or plain ``datasets.load_dataset("parquet", ...)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import Dataset, load_dataset

from gfn_spin.io import atomic_path

#: File suffixes ``datasets`` loads by builder name.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def chat_messages(prompt: str, response: str) -> list[dict[str, str]]:
    """A user turn and an assistant turn, the format of SPIN's ``real``/``generated`` columns."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _split_messages(messages: Sequence[dict[str, str]], column: str) -> tuple[str, str]:
    """(first user content, last assistant content) of one chat."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    assistants = [m["content"] for m in messages if m.get("role") == "assistant"]
    if not users or not assistants:
        raise ValueError(
            f"a row of messages_column={column!r} lacks a user or an assistant turn: "
            f"{list(messages)!r}"
        )
    return users[0], assistants[-1]


def _load_source(source: str | os.PathLike, split: str) -> Dataset:
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset={str(source)!r} has suffix {path.suffix!r}; give a .json, .jsonl, "
                ".parquet, .csv or .arrow file, a folder of them, or a hub dataset name"
            )
        return load_dataset(builder, data_files=str(path), split="train")
    if str(source).startswith((".", "/", "~")) and not path.exists():
        raise FileNotFoundError(f"dataset={str(source)!r} does not exist")
    # A folder of data files or a hub name: the ordinary loader (no network in tests).
    return load_dataset(str(source), split=split)


def load_pairs(
    source: str | os.PathLike | Dataset,
    *,
    split: str = "train",
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str | None = None,
    max_examples: int | None = None,
) -> Dataset:
    """(prompt, response) string pairs from any ``datasets`` source.

    Args:
        source: a hub dataset name, a local file (json/jsonl/parquet/csv/arrow) or folder, or a
            ``datasets.Dataset``.
        split: the split to read (files load as "train").
        prompt_column: the column holding prompt strings.
        response_column: the column holding the real (SFT) responses.
        messages_column: read a chat column instead (e.g. ``"real"`` of the SPIN data): the
            first user turn is the prompt and the last assistant turn the response.
        max_examples: keep only the first ``max_examples`` rows.

    Returns:
        a ``Dataset`` with exactly the string columns ``prompt`` and ``response``.
    """
    data = source if isinstance(source, Dataset) else _load_source(source, split)
    if messages_column is not None:
        if messages_column not in data.column_names:
            raise ValueError(
                f"messages_column={messages_column!r} is not a column; columns: {data.column_names}"
            )
        pairs = [_split_messages(m, messages_column) for m in data[messages_column]]
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
    return Dataset.from_dict({"prompt": [str(p) for p in prompts], "response": responses})


def encode_prompt(
    tokenizer: Any, prompt: str, *, max_prompt_length: int | None = None
) -> list[int]:
    """Token ids of a prompt as a user turn through the tokenizer's chat template.

    Over-long prompts keep their last ``max_prompt_length`` tokens (the generation prompt at
    the end of the template must survive). A tokenizer without a chat template encodes the
    bare text with its special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return list(ids)


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str | None = None,
    *,
    max_prompt_length: int | None = None,
    max_new_tokens: int | None = None,
) -> tuple[list[int], list[int] | None]:
    """The one prompt/response → token ids map, for generation and training alike.

    The prompt goes through the chat template as a user turn ending in the generation prompt;
    the response is the assistant text's tokens without special tokens, cut at the length
    cap ``max_new_tokens`` (the stop there is forced, DESIGN §1; otherwise EOS ends it, which
    is the policy's convention, not a token of the response).

    Returns:
        (prompt_ids, response_ids); response_ids is None without a response.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length=max_prompt_length)
    if response is None:
        return prompt_ids, None
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if max_new_tokens is not None:
        response_ids = response_ids[:max_new_tokens]
    return prompt_ids, response_ids


def write_parquet(columns: dict[str, list[Any]], path: str | os.PathLike) -> Path:
    """Write columns as one parquet file atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Dataset.from_dict(columns).to_parquet(str(tmp))
    return path


def load_parquet(path: str | os.PathLike) -> Dataset:
    """An iteration's data written by :func:`write_parquet` (also readable with
    ``datasets.load_dataset("parquet", data_files=path)``).

    Read with pyarrow into an in-memory ``Dataset``: no ``datasets`` cache, so a file
    rewritten at the same path is never served stale.
    """
    return Dataset(pq.read_table(str(path)))
