"""The opponent's responses for an iteration, drawn in seeded chunks across processes.

Chunks of examples go round-robin to the processes; chunk c is drawn with a seed derived from
its start, so the data do not depend on the number of processes. Each process scores its
chunks under the reference once (real and generated responses in one pass), and the chunks are
gathered into one :class:`~selfplay.iteration_data.IterationData` on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from gfn_spin.density import Density
from gfn_spin.scores import position_mask
from samplers.base import Sampler, SampleStats
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
    on_stats: Callable[[SampleStats], None] | None = None,
) -> IterationData:
    """One y' per example from ``sampler``, and the reference log-probs of y and y'.

    ``state`` (an ``accelerate`` state or ``Accelerator``) names this process's share of the
    chunks; chunk c is drawn with seed ``derive_seed(seed, c's first row)``. ``on_stats``, when
    given, sees the stats of each of this process's chunks (:func:`opponent_metrics`).
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
        if on_stats is not None:
            on_stats(samples.stats)
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


def opponent_metrics(stats: Sequence[SampleStats], state: PartialState) -> dict[str, float]:
    """What the opponent measured while drawing an iteration's y', over every process's chunks:
    means over the prompts, with standard errors ``*_se``, of ``opponent/log_z`` (log Ẑ),
    ``opponent/ess_fraction`` (ESS/K of SIR, ESS/N of SMC; not for one draw of a sampler with
    an exact density, whose ESS of one weight says nothing) and ``opponent/elbo`` (mean
    log π̃_ref − log q, samplers with an exact density: log Z minus it is their KL(q‖π_ref)),
    where the sampler estimates them; and ``opponent/tokens`` (the model tokens it evaluated;
    its time is the record's ``seconds["generate"]``). The same dict on every process,
    whatever their number."""
    mine = []
    for s in stats:
        weighted = s.num_candidates is not None or s.num_particles is not None
        names = ("log_z", "elbo") + (("ess_fraction",) if weighted else ())
        chunk = {
            n: getattr(s, n).double().cpu().tolist() for n in names if getattr(s, n) is not None
        }
        mine.append(chunk | {"tokens": s.tokens})
    chunks = gather_object(mine)
    metrics: dict[str, float] = {"opponent/tokens": float(sum(c["tokens"] for c in chunks))}
    for name in ("log_z", "elbo", "ess_fraction"):
        values = torch.tensor([v for c in chunks for v in c.get(name, [])], dtype=torch.float64)
        values = values[torch.isfinite(values)]
        if len(values):
            metrics[f"opponent/{name}"] = float(values.mean())
            spread = float(values.std()) if len(values) > 1 else 0.0
            metrics[f"opponent/{name}_se"] = spread / len(values) ** 0.5
    return metrics
