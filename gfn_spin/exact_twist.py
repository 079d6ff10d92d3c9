"""The exact optimal twist of a geometric mixture at every state of an enumerable response tree.

For whoever asks how close a learned twist *could* get, apart from how it is trained
(``bench.twist_capacity``, docs/gflownet.md "What one head can represent"). On a world small
enough to enumerate, the target's own next-token law at every state ``s``,

    q*(v|s) ∝ g(v|s) · exp V(s·v),   V(s) = log Σ_{y ⊒ s} G̃(y) / G̃(s),   V(s·⊤) = 0,

with ``g = Π_c π_c^{w_c}`` the local product's unnormalized step, follows from one backward pass
over the tree of responses, and the target's probability ``p(s)`` of passing through each state
from one forward pass. Then ``KL(target ‖ q) = Σ_s p(s) · KL(q*(·|s) ‖ q(·|s))`` for any
per-state law ``q``, and its gradient, need no sampling. :func:`gfn_spin.exact.exact_distribution`
enumerates whole responses and keeps only their probabilities; this walks the same tree level by
level and keeps what a twist head reads at every state (the components' last hidden states).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat

from gfn_spin.exact import response_alphabet
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.scores import weighted_logsum


@dataclass
class StateTree:
    """Every state of depth ``0..L-1`` of the response trees of ``P`` prompts, level by level.

    Rows are ordered by depth, then prompt, then response prefix (the alphabet's order), so the
    ``A`` children of a state are consecutive rows of the next level.

    Attributes:
        features: ``[S, F]`` the components' last hidden states at each state, concatenated (the
            input of the twist head, ``gfn_spin.twisted_local_product.head_inputs``).
        log_local: ``[S, V]`` ``Σ_c w_c log π_c(v|s)``, the local product before normalizing.
        log_optimal: ``[S, V]`` ``log q*(v|s)``: EOS and the alphabet; ``-inf`` elsewhere.
        visits: ``[S]`` ``p(s)``, the target's probability of passing through the state.
        prompt_index: ``[S]`` the state's prompt (an index into the prompts given).
        prefixes: ``[S, L-1]`` the state's response so far, ``-1`` past its depth.
        alphabet: the response tokens other than EOS, in the tree's order.
        eos: the EOS token id.
        prompts: P.
        max_new_tokens: L (the stop at L is forced, docs/conventions.md).
    """

    features: torch.Tensor
    log_local: torch.Tensor
    log_optimal: torch.Tensor
    visits: torch.Tensor
    prompt_index: torch.Tensor
    prefixes: torch.Tensor
    alphabet: list[int]
    eos: int
    prompts: int
    max_new_tokens: int

    @property
    def depth(self) -> torch.Tensor:
        """``[S]`` each state's depth (its response length)."""
        return (self.prefixes >= 0).sum(-1)

    def response_logprobs(self, log_conditionals: torch.Tensor) -> torch.Tensor:
        """``[P, R]`` log-probability of every response of every prompt under the per-state
        law ``log_conditionals`` ``[S, V]`` (responses in :meth:`responses`' order)."""
        alphabet = torch.tensor(self.alphabet, device=log_conditionals.device)
        width, reached = len(self.alphabet), log_conditionals.new_zeros(self.prompts, 1)
        start, terminals = 0, []
        for level in range(self.max_new_tokens):
            count = self.prompts * width**level
            step = log_conditionals[start : start + count]
            start += count
            terminals.append(reached + rearrange(step[:, self.eos], "(p n) -> p n", p=self.prompts))
            children = reached[..., None] + rearrange(
                step[:, alphabet], "(p n) a -> p n a", p=self.prompts
            )
            reached = rearrange(children, "p n a -> p (n a)")
        terminals.append(reached)  # the forced stop at L: no EOS factor
        return torch.cat(terminals, dim=1)

    def responses(self) -> list[tuple[int, ...]]:
        """Every response (the same for every prompt), in :meth:`response_logprobs`' order."""
        level: list[tuple[int, ...]] = [()]
        listed: list[tuple[int, ...]] = []
        for _ in range(self.max_new_tokens + 1):
            listed += level
            level = [r + (a,) for r in level for a in self.alphabet]
        return listed


@torch.no_grad()
def state_tree(
    target: GeometricMixture, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> StateTree:
    """The :class:`StateTree` of ``target`` on ``prompts`` (every component a ``Policy``): one
    batched forward step per level and component over ``P · A^d`` rows, so a few prompts per
    call (a caller fitting many prompts concatenates the fields it needs)."""
    components, weights = list(target.components), target.weights
    eos = target.eos_token_id
    alphabet = sorted(set(response_alphabet(target)) - {eos})
    tokens_of = torch.tensor(alphabet, device=target.device)
    width, count = len(alphabet), len(prompts)
    states = [c.start([list(p) for p in prompts], features=True) for c in components]
    prefixes = torch.full((count, max_new_tokens - 1), -1, dtype=torch.long, device=target.device)
    levels = []
    for depth in range(max_new_tokens):
        levels.append(
            (
                torch.cat([s.next_features.float() for s in states], dim=-1),
                weighted_logsum([s.next_logprobs.double() for s in states], weights),
                prefixes,
            )
        )
        if depth + 1 == max_new_tokens:
            break
        parents = repeat(torch.arange(len(prefixes), device=prefixes.device), "n -> (n a)", a=width)
        tokens = repeat(tokens_of, "a -> (n a)", n=len(prefixes))
        states = [
            c.advance(s.select(parents), tokens) for c, s in zip(components, states, strict=True)
        ]
        prefixes = prefixes[parents].clone()
        prefixes[:, depth] = tokens
    # Backward: V at each level from its children's (V = 0 past the forced stop at L).
    optimal, child_values = [], None
    for _, log_local, _ in reversed(levels):
        values = log_local.new_zeros(len(log_local), width)
        if child_values is not None:
            values = rearrange(child_values, "(n a) -> n a", a=width)
        logits = torch.full_like(log_local, float("-inf"))
        logits[:, eos] = log_local[:, eos]
        logits[:, tokens_of] = log_local[:, tokens_of] + values
        value = torch.logsumexp(logits, dim=-1)
        optimal.insert(0, logits - value[:, None])
        child_values = value
    # Forward: the target's probability of reaching each state.
    visits = [optimal[0].new_ones(count)]
    for level in optimal[:-1]:
        visits.append(rearrange(visits[-1][:, None] * level[:, tokens_of].exp(), "n a -> (n a)"))
    prompt_index = torch.cat(
        [
            repeat(torch.arange(count, device=target.device), "p -> (p n)", n=width**depth)
            for depth in range(len(levels))
        ]
    )
    return StateTree(
        features=torch.cat([f for f, _, _ in levels]),
        log_local=torch.cat([g for _, g, _ in levels]).float(),
        log_optimal=torch.cat(optimal).float(),
        visits=torch.cat(visits).float(),
        prompt_index=prompt_index,
        prefixes=torch.cat([p for _, _, p in levels]),
        alphabet=alphabet,
        eos=eos,
        prompts=count,
        max_new_tokens=max_new_tokens,
    )
