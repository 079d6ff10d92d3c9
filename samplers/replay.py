"""A per-prompt replay buffer of high-reward responses, for off-policy GFlowNet training.

The published LM GFlowNet recipe (Hu et al., 2023) revisits the best responses found so far
for each prompt, so rare high-reward modes keep receiving gradient after the policy moved
away from them. SubTB is off-policy, so replayed responses are valid training data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class ReplayBuffer:
    """Keeps, per prompt, the ``capacity`` distinct responses with the highest log-reward.

    Keys are prompt token-id tuples; responses are token-id tuples (no EOS).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._entries: dict[tuple[int, ...], dict[tuple[int, ...], float]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def prompts(self) -> list[tuple[int, ...]]:
        """Prompts that have at least one stored response."""
        return [p for p, entries in self._entries.items() if entries]

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[tuple[int, ...]],
        log_rewards: Sequence[float],
    ) -> None:
        """Offer one response per row; each prompt keeps its ``capacity`` best distinct ones."""
        touched = set()
        for prompt, response, log_reward in zip(prompts, responses, log_rewards, strict=True):
            if log_reward != log_reward or log_reward == float("-inf"):
                continue  # NaN or forbidden: never worth replaying
            key = tuple(prompt)
            self._entries.setdefault(key, {})[tuple(response)] = float(log_reward)
            touched.add(key)
        for key in touched:
            entries = self._entries[key]
            if len(entries) > self.capacity:
                best = sorted(entries.items(), key=lambda item: item[1], reverse=True)
                self._entries[key] = dict(best[: self.capacity])

    def sample(
        self, prompt: Sequence[int], count: int, rng: random.Random
    ) -> list[tuple[int, ...]]:
        """``count`` responses of ``prompt`` drawn uniformly (with replacement) from its buffer."""
        entries = list(self._entries.get(tuple(prompt), {}))
        if not entries:
            raise KeyError(f"no stored responses for prompt {list(prompt)}")
        return [entries[rng.randrange(len(entries))] for _ in range(count)]

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "entries": [
                [list(p), [[list(r), v] for r, v in entries.items()]]
                for p, entries in self._entries.items()
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self._entries = {
            tuple(p): {tuple(r): float(v) for r, v in entries} for p, entries in state["entries"]
        }


class FeatureBuffer:
    """The last ``capacity`` scored training batches of a GFlowNet whose trainable part reads
    frozen features (the twist head).

    The components never change, so a stored batch's step scores and features stay exact, and
    each rollout can feed several head updates (SubTB is off-policy). A batch is kept whole, so
    the rows of one prompt stay together (what a per-prompt batch log Z needs). Each batch is a
    dict: ``steps`` and ``features``, one ``[B, L+1, V]`` and one ``[B, L+1, H_c]`` tensor per
    component, and the tensors ``response_ids [B, L]``, ``lengths [B]``,
    ``log_reward [B, L+1]`` and ``group [B]``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1")
        self.capacity = capacity
        self._batches: list[dict[str, Any]] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: dict[str, Any]) -> None:
        batch = {
            k: [t.detach() for t in v] if isinstance(v, list) else v.detach()
            for k, v in batch.items()
        }
        if len(self._batches) < self.capacity:
            self._batches.append(batch)
        else:
            self._batches[self._next] = batch
        self._next = (self._next + 1) % self.capacity

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One stored batch, uniformly."""
        if not self._batches:
            raise RuntimeError("the feature buffer is empty: add a batch first")
        return self._batches[rng.randrange(len(self._batches))]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "next": self._next, "batches": list(self._batches)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self._next = int(state["next"])
        self._batches = [dict(b) for b in state["batches"]]
