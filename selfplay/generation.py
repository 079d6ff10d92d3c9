"""The opponent's responses for an iteration, drawn in seeded chunks across processes.

Chunks of examples go round-robin to the processes; chunk c is drawn with a seed derived from
its start, so the data do not depend on the number of processes. Each process scores its
chunks under the reference once (real and generated responses in one pass), and the chunks are
gathered into one :class:`~selfplay.iteration_data.IterationData` on every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gfn_spin.density import Density
from gfn_spin.scores import position_mask
from samplers.base import Sampler
from selfplay.config import derive_seed
from selfplay.iteration_data import Examples, IterationData


def fixed_width(
    ids: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, pad_token_id: int
) -> torch.Tensor:
    """``[B, L]`` response ids with the pad token past each length, whatever ``ids``' width and
    padding (samplers pad their ``Samples`` to the longest draw)."""
    out = torch.full((len(ids), max_new_tokens), pad_token_id, dtype=torch.long)
    width = min(ids.shape[1], max_new_tokens)
    out[:, :width] = ids[:, :width].cpu()
    return out.masked_fill(~position_mask(lengths.cpu(), max_new_tokens), pad_token_id)


@torch.no_grad()
def reference_logps(
    reference: Density,
    prompt_ids: Sequence[Sequence[int]],
    responses: tuple[torch.Tensor, torch.Tensor],
    opponents: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` float64 ``log π̃_ref`` of the real and generated responses (ids ``[B, L]``,
    lengths ``[B]`` each), in one pass over both."""
    ids = torch.cat([responses[0], opponents[0]])
    lengths = torch.cat([responses[1], opponents[1]])
    logps = reference.log_prob(list(prompt_ids) * 2, ids, lengths).double().cpu()
    return logps[: len(prompt_ids)], logps[len(prompt_ids) :]


def make_iteration_data(
    sampler: Sampler,
    reference: Density,
    examples: Examples,
    *,
    max_new_tokens: int,
    chunk: int,
    seed: int,
    state: PartialState,
    progress: bool = False,
) -> IterationData:
    """One y' per example from ``sampler``, and the reference log-probs of y and y'.

    ``state`` (an ``accelerate`` state or ``Accelerator``) names this process's share of the
    chunks; chunk c is drawn with seed ``derive_seed(seed, c's first row)``.
    """
    pad = reference.pad_token_id
    starts = list(range(0, len(examples), chunk))
    mine = []
    for start in tqdm(
        starts[state.process_index :: state.num_processes], desc="opponent", disable=not progress
    ):
        rows = slice(start, start + chunk)
        prompts = examples.prompt_ids[rows]
        samples = sampler.sample(prompts, 1, generator=derive_seed(seed, start))
        lengths = samples.lengths.cpu()
        generated = fixed_width(samples.response_ids, lengths, max_new_tokens, pad)
        real = (examples.real_ids[rows], examples.real_lengths[rows])
        ref_real, ref_generated = reference_logps(reference, prompts, real, (generated, lengths))
        mine.append((start, generated, lengths, ref_real, ref_generated))
    chunks = dict((part[0], part[1:]) for part in gather_object(mine))
    generated, lengths, ref_real, ref_generated = (
        torch.cat([chunks[start][i] for start in starts]) for i in range(4)
    )
    return IterationData(
        prompt_ids=examples.prompt_ids,
        real_ids=examples.real_ids,
        real_lengths=examples.real_lengths,
        generated_ids=generated,
        generated_lengths=lengths,
        ref_real_logps=ref_real,
        ref_generated_logps=ref_generated,
    )
