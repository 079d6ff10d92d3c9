"""Scored training batches of a GFlowNet, and the buffer that keeps them for extra updates.

For the trainer and the parametrizations: a :class:`TrainingBatch` is what a loss on the
policy needs from one batch of responses (the target's rewards, and what the parametrization
reads to score the policy); a :class:`BatchBuffer` keeps the last few of them, as the
parametrization stores them (token ids, lengths, rewards and, for the twist, features:
nothing that scales with the vocabulary), for a form whose stored batches can be scored again exactly (the twist head reads
frozen components).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainingBatch:
    """One batch of B responses with its rewards, ready for a loss on the policy.

    Attributes:
        rows: the prompt token ids of each row (B lists).
        response_ids: ``[B, L]`` responses, padded past ``lengths``.
        lengths: ``[B]`` response lengths.
        log_reward: ``[B, L+1]`` the target's prefix-terminal log-densities ``log R(s_k⊤)``
            (no gradient).
        group: ``[B]`` the index of each row's prompt within the batch (rows of one prompt share
            it: what a per-prompt batch log Z needs).
        inputs: what the parametrization reads to score the policy, by name, each a list of
            ``[B, ...]`` tensors (none for a form that scores by a model pass).
    """

    rows: list[list[int]]
    response_ids: torch.Tensor
    lengths: torch.Tensor
    log_reward: torch.Tensor
    group: torch.Tensor
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def select(self, index: slice) -> TrainingBatch:
        """Rows ``index`` of the batch (one process's share)."""
        return TrainingBatch(
            self.rows[index],
            self.response_ids[index],
            self.lengths[index],
            self.log_reward[index],
            self.group[index],
            {name: [t[index] for t in tensors] for name, tensors in self.inputs.items()},
        )

    def without_inputs(self) -> TrainingBatch:
        """The batch without its inputs (what a buffer keeps when they can be recomputed)."""
        return TrainingBatch(
            self.rows, self.response_ids, self.lengths, self.log_reward, self.group
        )

    def detach(self) -> TrainingBatch:
        """The same batch with every tensor detached (what a buffer keeps)."""
        return TrainingBatch(
            self.rows,
            self.response_ids.detach(),
            self.lengths.detach(),
            self.log_reward.detach(),
            self.group.detach(),
            {name: [t.detach() for t in tensors] for name, tensors in self.inputs.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors and lists of ints only (a checkpoint is read with ``weights_only=True``)."""
        return {
            "rows": [list(r) for r in self.rows],
            "response_ids": self.response_ids,
            "lengths": self.lengths,
            "log_reward": self.log_reward,
            "group": self.group,
            "inputs": {name: list(tensors) for name, tensors in self.inputs.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainingBatch:
        return cls(
            [list(r) for r in state["rows"]],
            state["response_ids"],
            state["lengths"],
            state["log_reward"],
            state["group"],
            {name: list(tensors) for name, tensors in state["inputs"].items()},
        )


class BatchBuffer:
    """The last ``capacity`` training batches of a GFlowNet whose trainable part reads frozen
    components (the twist head), as ``Parametrization.kept`` returns them.

    The components never change, so a stored batch's inputs, recomputed when it is used again
    (``Parametrization.restored``), are exact, and each rollout can feed several updates (SubTB
    is off-policy). A batch is kept whole, so the rows of one prompt stay together (what a
    per-prompt batch log Z needs).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._batches: list[TrainingBatch] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: TrainingBatch) -> None:
        batch = batch.detach()
        if len(self._batches) < self.capacity:
            self._batches.append(batch)
        else:
            self._batches[self._next] = batch
        self._next = (self._next + 1) % self.capacity

    def sample(self, rng: random.Random) -> TrainingBatch:
        """One stored batch, uniformly."""
        if not self._batches:
            raise RuntimeError("the batch buffer is empty: add a batch first")
        return self._batches[rng.randrange(len(self._batches))]

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "next": self._next,
            "batches": [b.state_dict() for b in self._batches],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._next = int(state["next"])
        self._batches = [TrainingBatch.from_state_dict(b) for b in state["batches"]]
