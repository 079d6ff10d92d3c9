"""Step log-probabilities of a batch computed two ways, for tests of autoregressive densities."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gfn_spin.density import Density


def forced_and_decoded(
    density: Density, rows: Sequence[Sequence[int]], ids: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L+1, V]`` step log-probs by one teacher-forced pass, and by decoding the same
    responses token by token through the KV cache (``start``/``advance``); call under
    ``torch.no_grad()``."""
    forced = density.step_logprobs(rows, ids, lengths)
    state = density.start(rows)
    decoded = [state.next_logprobs]
    for k in range(ids.shape[1]):
        state = density.advance(state, ids[:, k].clamp_min(0))
        decoded.append(state.next_logprobs)
    return forced, torch.stack(decoded, dim=1)
