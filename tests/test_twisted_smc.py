"""Twisted SMC (``SMCSampler(..., twist=...)``) against enumeration and a direct computation.

Three properties, on the tiny world's α = 0.5 geometric mixture (its responses ≤ 5 symbols can
be enumerated: 1,365 of them, so Z is exact):

(a) ``Ẑ = Π_epochs mean(w)`` is unbiased for Z with a proposal that is neither the target nor
    its local product, the flow twist (and a user twist), and resampling at every step;
(b) with the exact target as proposal, the flow twist is the exact future mass: every
    incremental weight is 1 and every population's ``Ẑ`` is Z;
(c) the incremental weights on hand-made paths equal a direct computation from teacher-forced
    scores (``Density.score``, full forwards instead of the decoding loop's KV cache).

Statistical tolerance (a): each population is an independent run, so the R values ``Ẑ_r / Z``
are i.i.d. with mean 1 (unbiasedness) and a finite variance (finitely many paths, every weight
finite). The bound is ``|mean − 1| < k·ŝ/√R`` with ŝ the sample standard deviation and
``k = Z_SIGMAS = 4``: by the central limit theorem the studentized mean of R = 2,000 runs is
close to standard normal, and a correct sampler fails with two-sided probability ≈ 6e-5 per
check. Float tolerances (b, c) are float32 rounding of model log-probabilities (about 1e-6 per
token, summed over at most six terms of size ≤ 10), bounded by 1e-4.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import LoraConfig

from gfn_spin import Policy
from gfn_spin.density import Density, PromptLike
from gfn_spin.exact import ExactDistribution, exact_distribution
from gfn_spin.residual import ResidualLocalProduct
from samplers import SMCSampler
from samplers.smc_twists import TwistInputs, flow_twist

CAP = 5
Z_SIGMAS = 4.0  # Gaussian two-sided tail ≈ 6e-5 (see the module docstring)
FLOAT_TOL = 1e-4  # float32 rounding of at most six log-probabilities of size ≤ 10


@pytest.fixture(scope="module")
def hard_prompt(world) -> list[int]:
    """The eval prompt where the local product is far from the α = 0.5 target."""
    return world.eval_prompts[1]


@pytest.fixture(scope="module")
def exact(target, hard_prompt) -> ExactDistribution:
    return exact_distribution(target, hard_prompt, CAP)


@pytest.fixture(scope="module")
def perturbed(world) -> tuple[Policy, Policy]:
    """π_t (a private copy of its weights) and the same weights read through a random LoRA.

    The adapter's B matrices are random (``init_lora_weights=False``), so the LoRA policy is a
    proposal unlike any density of the target: what a GFlowNet looks like mid-training.
    """
    init = Policy(
        copy.deepcopy(world.shifted.model),
        world.tokenizer,
        allowed_token_ids=world.shifted.allowed_token_ids,
    )
    config = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = init.add_adapter("twist_test_noise", config)
    return init, adapter


@pytest.fixture(scope="module")
def residual(target, perturbed) -> ResidualLocalProduct:
    """The residual GFlowNet form on the target's local product, with a random correction."""
    init, adapter = perturbed
    return ResidualLocalProduct(target.local_product(), adapter, init)


def _ratios(samples, exact: ExactDistribution) -> torch.Tensor:
    return (samples.stats["log_z_populations"][0].double() - exact.log_z).exp()  # Ẑ_r / Z


def _length_twist(inputs: TwistInputs) -> torch.Tensor:
    """A user twist with no meaning, only positive: unbiasedness must hold for it too."""
    ids = inputs.response_ids.double()
    return 0.5 + 0.3 * ids.sum(1) / 8 - 0.7 * ids.shape[1]


# -- (a) unbiasedness --------------------------------------------------------------------------


@pytest.mark.parametrize("twist", ["flow", "user"])
def test_twisted_normalizer_is_unbiased(target, hard_prompt, exact, residual, twist):
    # Few particles and resampling at every step: the regime where a wrong incremental weight,
    # a missing initial weight ψ(s_0) or a wrong ⊤ factor would bias Ẑ.
    sampler = SMCSampler(
        target,
        4,
        proposal=residual,
        twist="flow" if twist == "flow" else _length_twist,
        ess_threshold=1.0,
        max_new_tokens=CAP,
    )
    assert sampler.weighting == "components"  # target scores from the residual's states
    runs = 2000
    samples = sampler.sample([hard_prompt], runs, generator=7)
    assert float(samples.stats["resamples"][0]) > 2  # resampling happened (out of ≤ 4 steps)
    ratio = _ratios(samples, exact)
    standard_error = float(ratio.std()) / math.sqrt(runs)
    assert abs(float(ratio.mean()) - 1) < Z_SIGMAS * standard_error, (ratio.mean(), standard_error)
    # The test can fail: leaving out the initial weight ψ(s_0) would scale every Ẑ by 1/ψ(s_0),
    # a bias far outside the bound.
    initial = sampler.log_weight_increments(
        [hard_prompt], torch.zeros(1, CAP, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    )[0, 0]
    assert abs(math.exp(-float(initial)) - 1) > 2 * Z_SIGMAS * standard_error
    scored = target.log_prob([hard_prompt] * runs, samples.response_ids, samples.lengths)
    torch.testing.assert_close(samples.log_target.double(), scored.double(), atol=1e-4, rtol=0)


def test_flow_twist_with_a_policy_proposal_is_unbiased(target, hard_prompt, exact, perturbed):
    # The LoRA-perturbed π_t as proposal: the target's components run beside it ("general").
    sampler = SMCSampler(
        target, 4, proposal=perturbed[1], twist="flow", ess_threshold=1.0, max_new_tokens=CAP
    )
    assert sampler.weighting == "general"
    runs = 1000
    samples = sampler.sample([hard_prompt], runs, generator=8)
    assert float(samples.stats["resamples"][0]) > 1
    ratio = _ratios(samples, exact)
    standard_error = float(ratio.std()) / math.sqrt(runs)
    assert abs(float(ratio.mean()) - 1) < Z_SIGMAS * standard_error, (ratio.mean(), standard_error)


def test_component_scores_equal_the_targets_own(target, hard_prompt, residual):
    # Reading the target's step scores from the residual proposal's component states is the
    # same computation as running the target: same draws, same Ẑ.
    shared = SMCSampler(target, 8, proposal=residual, twist="flow", max_new_tokens=CAP)
    general = SMCSampler(
        target, 8, proposal=residual, twist="flow", max_new_tokens=CAP, weighting="general"
    )
    a = shared.sample([hard_prompt], 40, generator=9)
    b = general.sample([hard_prompt], 40, generator=9)
    assert a.responses() == b.responses()
    torch.testing.assert_close(
        a.stats["log_z_populations"], b.stats["log_z_populations"], atol=FLOAT_TOL, rtol=0
    )
    assert a.stats["tokens"] < b.stats["tokens"]  # the components ran once, not twice


# -- (b) a perfect proposal ----------------------------------------------------------------------


@dataclass
class _PrefixState:
    prefixes: list[tuple[int, ...]]
    next_logprobs: torch.Tensor

    def select(self, index: torch.Tensor) -> _PrefixState:
        return _PrefixState([self.prefixes[i] for i in index.tolist()], self.next_logprobs[index])


class _ExactConditional(Density):
    """The enumerated target as an autoregressive density: ``q(v|s) = M(s·v) / M(s)``.

    ``M(s)`` is the target's normalized mass on responses that extend ``s``, and
    ``q(⊤|s) = p(s) / M(s)``; at the cap the stop is forced. One prompt only.
    """

    def __init__(self, like: Density, exact: ExactDistribution, max_new_tokens: int) -> None:
        self.like, self.max_new_tokens = like, max_new_tokens
        mass: dict[tuple[int, ...], list[float]] = defaultdict(list)
        for response, logp in zip(exact.responses, exact.logprobs.tolist(), strict=True):
            for k in range(len(response) + 1):
                mass[response[:k]].append(logp)
        self.log_mass = {s: torch.tensor(v).logsumexp(0).item() for s, v in mass.items()}
        self.log_p = dict(zip(exact.responses, exact.logprobs.tolist(), strict=True))

    eos_token_id = property(lambda self: self.like.eos_token_id)
    vocab_size = property(lambda self: self.like.vocab_size)
    tokenizer = property(lambda self: self.like.tokenizer)
    device = property(lambda self: torch.device("cpu"))
    tokens_evaluated = property(lambda self: 0)

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        return [list(p) for p in prompts]

    def step_logprobs(self, prompts, response_ids, lengths) -> torch.Tensor:
        raise NotImplementedError

    def score(self, prompts, response_ids, lengths) -> Any:
        raise NotImplementedError

    def _next(self, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
        rows = torch.full((len(prefixes), self.vocab_size), -math.inf, dtype=torch.float64)
        for row, s in enumerate(prefixes):
            if len(s) == self.max_new_tokens:
                rows[row, self.eos_token_id] = 0.0
                continue
            for v in range(self.vocab_size):
                if (*s, v) in self.log_mass and v != self.eos_token_id:
                    rows[row, v] = self.log_mass[(*s, v)] - self.log_mass[s]
            rows[row, self.eos_token_id] = self.log_p[s] - self.log_mass[s]
        return rows.float()

    def start(self, prompt_ids) -> _PrefixState:
        prefixes = [() for _ in prompt_ids]
        return _PrefixState(prefixes, self._next(prefixes))

    def advance(self, state: _PrefixState, tokens: torch.Tensor) -> _PrefixState:
        prefixes = [(*s, int(t)) for s, t in zip(state.prefixes, tokens.tolist(), strict=True)]
        return _PrefixState(prefixes, self._next(prefixes))


def _paths(exact: ExactDistribution, per_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_length`` responses of each length 0..L (fewer where fewer exist), padded ``[B, L]``."""
    picks = []
    for n in range(CAP + 1):
        of_length = [r for r in exact.responses if len(r) == n]
        picks += of_length[:: max(1, len(of_length) // per_length)][:per_length]
    ids = torch.zeros(len(picks), CAP, dtype=torch.long)
    for row, response in enumerate(picks):
        ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in picks])


def test_perfect_proposal_and_flow_twist_give_unit_weights_and_exact_normalizer(
    world, target, hard_prompt, exact
):
    perfect = _ExactConditional(target, exact, CAP)
    sampler = SMCSampler(
        target, 8, proposal=perfect, twist="flow", ess_threshold=1.0, max_new_tokens=CAP
    )
    samples = sampler.sample([hard_prompt], 50, generator=10)
    # Every population's Ẑ is Z itself (not only on average), and no weight ever moves.
    torch.testing.assert_close(
        samples.stats["log_z_populations"][0].double(),
        torch.full((50,), exact.log_z, dtype=torch.float64),
        atol=FLOAT_TOL,
        rtol=0,
    )
    torch.testing.assert_close(float(samples.stats["ess"][0]), 8.0, atol=1e-3, rtol=0)
    ids, lengths = _paths(exact, 8)
    increments = sampler.log_weight_increments([hard_prompt] * len(ids), ids, lengths)
    torch.testing.assert_close(
        increments[:, 0],
        torch.full((len(ids),), exact.log_z, dtype=torch.float64),
        atol=FLOAT_TOL,
        rtol=0,
    )
    torch.testing.assert_close(
        increments[:, 1:], torch.zeros_like(increments[:, 1:]), atol=FLOAT_TOL, rtol=0
    )

    # The same checks fail without the look-ahead, and with a flow that forgets the target's
    # ⊤ factor (ψ = 1/q(⊤|s)): these tests can see a wrong twist.
    def without_target_stop(inputs: TwistInputs) -> torch.Tensor:
        return -inputs.proposal_state.next_logprobs[:, inputs.eos_token_id].double()

    for wrong in (None, without_target_stop):
        other = SMCSampler(
            target, 8, proposal=perfect, twist=wrong, ess_threshold=1.0, max_new_tokens=CAP
        )
        moved = other.log_weight_increments([hard_prompt] * len(ids), ids, lengths)[:, 1:]
        assert float(moved.abs().max()) > 100 * FLOAT_TOL
        spread = other.sample([hard_prompt], 50, generator=10).stats["log_z_populations"][0]
        assert float(spread.max() - spread.min()) > 100 * FLOAT_TOL


# -- (c) the incremental weights, computed another way --------------------------------------------


def _direct_increments(
    target: Density, proposal: Density, twist, prompt: list[int], ids: torch.Tensor, lengths
) -> torch.Tensor:
    """The incremental log-weights from teacher-forced token scores, one position at a time.

    Potential ``Φ(s_k) = log g̃(y_{1:k}) + log ψ(s_k)`` with ``ψ(s_L) = 1``; initial weight
    ``Φ(s_0)``; step ``s_k → y_{k+1}``: ``Φ(s_{k+1}) − Φ(s_k) − log q(y_{k+1}|s_k)``; stop at
    ``s_n`` (n < L): ``log G̃(y_{1:n}⊤) − Φ(s_n) − log q(⊤|s_n)``. The twists are evaluated
    here from the path (the flow from the scores' stop terms, the user twist from the prefix).
    """
    prompts = [prompt] * len(ids)
    with torch.no_grad():
        g, q = target.score(prompts, ids, lengths), proposal.score(prompts, ids, lengths)
    out = torch.zeros(len(ids), CAP + 1, dtype=torch.float64)
    for b in range(len(ids)):
        n = int(lengths[b])
        prefix = [0.0]
        for k in range(n):
            prefix.append(prefix[-1] + float(g.token_logprobs[b, k]))

        potential = []  # Φ(s_k), k = 0..n
        for k in range(n + 1):
            if k == CAP:
                potential.append(prefix[k])
            elif twist == "flow":
                potential.append(
                    prefix[k] + float(g.eos_logprobs[b, k]) - float(q.eos_logprobs[b, k])
                )
            else:
                inputs = TwistInputs(
                    [prompt],
                    torch.zeros(1, dtype=torch.long),
                    ids[b : b + 1, :k],
                    torch.zeros(1),
                    torch.zeros(1, 1),
                    None,
                    0,
                )
                potential.append(prefix[k] + float(_length_twist(inputs)[0]))

        out[b, 0] = potential[0]
        for k in range(n):
            out[b, k + 1] = potential[k + 1] - potential[k] - float(q.token_logprobs[b, k])
        if n < CAP:
            stop = prefix[n] + float(g.eos_logprobs[b, n])
            out[b, n + 1] = stop - potential[n] - float(q.eos_logprobs[b, n])
    return out


@pytest.mark.parametrize("proposal_kind", ["local_product", "lora", "residual"])
@pytest.mark.parametrize("twist", ["flow", "user"])
def test_increments_match_a_direct_computation(
    target, hard_prompt, exact, perturbed, residual, proposal_kind, twist
):
    proposal = {
        "local_product": target.local_product(),
        "lora": perturbed[1],
        "residual": residual,
    }[proposal_kind]
    sampler = SMCSampler(
        target,
        4,
        proposal=proposal,
        twist="flow" if twist == "flow" else _length_twist,
        max_new_tokens=CAP,
    )
    ids, lengths = _paths(exact, 3)  # lengths 0..L: stops at every depth and the forced stop
    got = sampler.log_weight_increments([hard_prompt] * len(ids), ids, lengths)
    want = _direct_increments(target, proposal, twist, hard_prompt, ids, lengths)
    torch.testing.assert_close(got, want, atol=FLOAT_TOL, rtol=0)
    if twist == "flow":  # stopping has incremental weight 1 under the flow twist
        stopped = lengths < CAP
        rows = stopped.nonzero().squeeze(1)
        torch.testing.assert_close(
            got[rows, lengths[rows] + 1],
            torch.zeros(len(rows), dtype=torch.float64),
            atol=FLOAT_TOL,
            rtol=0,
        )
    # Telescoping: the weights of a path multiply to G̃(y) / q(y), whatever the twist.
    prompts = [hard_prompt] * len(ids)
    with torch.no_grad():
        log_ratio = target.log_prob(prompts, ids, lengths) - proposal.log_prob(
            prompts, ids, lengths
        )
    torch.testing.assert_close(got.sum(1), log_ratio.double(), atol=FLOAT_TOL, rtol=0)


def test_flow_twist_on_the_local_product_is_the_next_local_normalizer(target, hard_prompt):
    # With q = q_loc, g(⊤|s) / q(⊤|s) = Z_loc(s): the flow twist is Z_loc of the current state.
    local = target.local_product()
    state = local.start([hard_prompt])
    inputs = TwistInputs(
        [hard_prompt],
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, dtype=torch.float64),
        state.next_logprobs + state.log_z_local[:, None],
        state,
        local.eos_token_id,
    )
    torch.testing.assert_close(flow_twist(inputs), state.log_z_local.double(), atol=1e-6, rtol=0)


# -- determinism and bad input -------------------------------------------------------------------


def test_same_seed_same_twisted_samples(world, target, hard_prompt, residual):
    sampler = SMCSampler(target, 4, proposal=residual, twist="flow", max_new_tokens=CAP)
    prompts = [hard_prompt, world.eval_prompts[2]]
    first = sampler.sample(prompts, 20, generator=11)
    second = sampler.sample(prompts, 20, generator=torch.Generator().manual_seed(11))
    assert first.responses() == second.responses()
    torch.testing.assert_close(first.stats["log_z"], second.stats["log_z"])
    assert sampler.sample(prompts, 20, generator=12).responses() != first.responses()


def test_bad_twists_are_named(target, hard_prompt):
    with pytest.raises(ValueError, match="twist"):
        SMCSampler(target, 4, twist="flows", max_new_tokens=CAP)
    with pytest.raises(ValueError, match="twist"):
        SMCSampler(target, 4, twist=3, max_new_tokens=CAP)
    wrong_shape = SMCSampler(target, 4, twist=lambda inputs: torch.zeros(2, 2), max_new_tokens=CAP)
    with pytest.raises(ValueError, match="twist returned shape"):
        wrong_shape.sample([hard_prompt], 1, generator=0)
    not_a_number = SMCSampler(
        target,
        4,
        twist=lambda inputs: torch.full((len(inputs.population),), math.nan),
        max_new_tokens=CAP,
    )
    with pytest.raises(ValueError, match="NaN"):
        not_a_number.sample([hard_prompt], 1, generator=0)
