"""One α-SPIN iteration's data as tensors, and its parquet file.

The data path: (prompt, real response) pairs → :class:`Examples` (token ids, responses padded
once to the length cap L) → the opponent's ``Samples`` → :class:`IterationData` (real and
generated responses with the reference's log-probs, computed once) → parquet
(:func:`write_iteration_data`, the chat columns of the published SPIN data beside the ids) →
:func:`read_iteration_data` → the SPIN loss. The parquet schema and its reading and writing
(:func:`write_parquet`, :func:`load_parquet`) live here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset

from gfn_spin.data import chat_messages, encode_example
from gfn_spin.io import atomic_path
from gfn_spin.samples import pad_responses


@dataclass
class Examples:
    """The encoded (prompt, real response) pairs of a run, in dataset order.

    Attributes:
        prompts, responses: the texts.
        prompt_ids: each prompt's token ids (ragged: prompts keep their own lengths).
        real_ids: ``[N, L]`` real responses, padded past ``real_lengths``.
        real_lengths: ``[N]`` real response lengths.
    """

    prompts: list[str]
    responses: list[str]
    prompt_ids: list[list[int]]
    real_ids: torch.Tensor
    real_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def encode_examples(
    pairs: Any, tokenizer: Any, *, max_prompt_length: int, max_new_tokens: int, pad_token_id: int
) -> Examples:
    """Token ids of every pair through :func:`gfn_spin.data.encode_example`."""
    prompts, responses = list(pairs["prompt"]), list(pairs["response"])
    encoded = [
        encode_example(
            tokenizer,
            prompt,
            response,
            max_prompt_length=max_prompt_length,
            max_new_tokens=max_new_tokens,
        )
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    real_ids, real_lengths = pad_responses([r for _, r in encoded], max_new_tokens, pad_token_id)
    return Examples(prompts, responses, [p for p, _ in encoded], real_ids, real_lengths)


@dataclass
class IterationData:
    """What training π_(t+1) reads: one row per example, in dataset order.

    Attributes:
        prompt_ids: each prompt's token ids (ragged, as ``Density.log_prob`` takes them).
        real_ids, generated_ids: ``[N, L]`` responses y (the data) and y' (the opponent),
            padded with the pad token past their lengths.
        real_lengths, generated_lengths: ``[N]`` response lengths (tokens).
        ref_real_logps, ref_generated_logps: ``[N]`` float64 ``log π̃_ref`` of y and y'.
    """

    prompt_ids: list[list[int]]
    real_ids: torch.Tensor
    real_lengths: torch.Tensor
    generated_ids: torch.Tensor
    generated_lengths: torch.Tensor
    ref_real_logps: torch.Tensor
    ref_generated_logps: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompt_ids)


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

    Raises:
        ValueError: the file is truncated or not parquet (written atomically, so this is
            outside damage), naming the file.
    """
    try:
        return Dataset(pq.read_table(str(path)))
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"{str(path)!r} is corrupted or truncated ({type(error).__name__}: {error}); the "
            "run cannot resume from it: choose a new output_dir, or delete the run directory "
            "to start over"
        ) from error


def _responses(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(ids, lengths.tolist(), strict=True)]


def write_iteration_data(
    data: IterationData, examples: Examples, tokenizer: Any, path: str | os.PathLike
) -> Path:
    """Write an iteration's data as one parquet file, atomically.

    Columns: ``prompt`` and the chat columns ``real`` and ``generated`` (user and assistant
    turns, as in the published SPIN data), then the token ids and reference log-probs that
    :func:`read_iteration_data` reads back.
    """
    generated = _responses(data.generated_ids, data.generated_lengths)
    generated_texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    columns = {
        "prompt": examples.prompts,
        "real": [
            chat_messages(p, r) for p, r in zip(examples.prompts, examples.responses, strict=True)
        ],
        "generated": [
            chat_messages(p, g) for p, g in zip(examples.prompts, generated_texts, strict=True)
        ],
        "prompt_ids": data.prompt_ids,
        "real_ids": _responses(data.real_ids, data.real_lengths),
        "generated_ids": generated,
        "ref_real_logps": data.ref_real_logps.tolist(),
        "ref_generated_logps": data.ref_generated_logps.tolist(),
    }
    return write_parquet(columns, path)


def read_iteration_data(
    path: str | os.PathLike, *, max_new_tokens: int, pad_token_id: int
) -> IterationData:
    """The :class:`IterationData` written by :func:`write_iteration_data` at ``path``.

    Raises:
        ValueError: a damaged file (from :func:`load_parquet`), or responses
            longer than ``max_new_tokens``.
    """
    table = load_parquet(path)
    real: Sequence[Sequence[int]] = table["real_ids"]
    generated: Sequence[Sequence[int]] = table["generated_ids"]
    longest = max(len(r) for r in [*real, *generated])
    if longest > max_new_tokens:
        raise ValueError(
            f"{str(path)!r} holds responses of {longest} tokens, more than max_new_tokens="
            f"{max_new_tokens}; resume with the run's max_new_tokens"
        )
    real_ids, real_lengths = pad_responses(real, max_new_tokens, pad_token_id)
    generated_ids, generated_lengths = pad_responses(generated, max_new_tokens, pad_token_id)
    return IterationData(
        prompt_ids=[list(p) for p in table["prompt_ids"]],
        real_ids=real_ids,
        real_lengths=real_lengths,
        generated_ids=generated_ids,
        generated_lengths=generated_lengths,
        ref_real_logps=torch.tensor(table["ref_real_logps"], dtype=torch.float64),
        ref_generated_logps=torch.tensor(table["ref_generated_logps"], dtype=torch.float64),
    )
