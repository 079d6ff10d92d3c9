"""A per-prompt replay buffer of high-reward responses, for off-policy GFlowNet training.

The published LM GFlowNet recipe (Hu et al., 2023) revisits the best responses found so far
for each prompt, so rare high-reward modes keep receiving gradient after the policy moved
away from them. SubTB is off-policy, so replayed responses are valid training data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


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
