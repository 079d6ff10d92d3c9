"""The exact state tree (gfn_spin.exact_twist) against whole-response enumeration.

Its per-state optimal law must give, response by response, the target's normalized law that
``gfn_spin.exact.exact_distribution`` enumerates, and its local-product rows the local
product's; its visits must be the target's prefix probabilities. Both sides are float64 sums
over the same 341 responses per prompt (L = 4, 4 symbols), so they agree to rounding: the
tolerance is 1e-6 in probability, far below what a wrong twist, child order or missing EOS
factor moves (the target and its local product differ by more than 1e-3, checked below).
``bench.twist_capacity``, which fits heads by the tree's exact gradient, is checked here too.
"""

from __future__ import annotations

import pytest
import torch

from gfn_spin.exact import exact_distribution
from gfn_spin.exact_twist import state_tree
from gfn_spin.mixtures import GeometricMixture

CAP = 4
ATOL = 1e-6


@pytest.fixture(scope="module")
def setting(world):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    prompts = [list(p) for p in world.eval_prompts[:3]]
    return target, prompts, state_tree(target, prompts, CAP)


def aligned(tree, logprobs, exact):
    """The tree's per-response probabilities in ``exact``'s order."""
    index = exact.index()
    order = [index[r] for r in tree.responses()]
    out = torch.empty(len(order), dtype=torch.float64)
    out[order] = logprobs.double().exp()
    return out


def test_optimal_law_is_the_target(setting):
    target, prompts, tree = setting
    laws = tree.response_logprobs(tree.log_optimal.double())
    for i, prompt in enumerate(prompts):
        exact = exact_distribution(target, prompt, CAP)
        assert len(tree.responses()) == len(exact.responses)
        got = aligned(tree, laws[i], exact)
        assert torch.allclose(got, exact.logprobs.exp(), atol=ATOL, rtol=0)


def test_local_rows_are_the_local_product(setting):
    target, prompts, tree = setting
    laws = tree.response_logprobs(torch.log_softmax(tree.log_local.double(), dim=-1))
    for i, prompt in enumerate(prompts):
        exact = exact_distribution(target.local_product(), prompt, CAP)
        got = aligned(tree, laws[i], exact)
        assert torch.allclose(got, exact.logprobs.exp(), atol=ATOL, rtol=0)
        # the target differs from its local product here, so the first test can fail
        assert (got - exact_distribution(target, prompt, CAP).logprobs.exp()).abs().max() > 1e-3


def test_visits_are_prefix_probabilities(setting):
    target, prompts, tree = setting
    exact = exact_distribution(target, prompts[1], CAP)
    mass = exact.logprobs.exp()
    rows = (tree.prompt_index == 1).nonzero()[:, 0]
    for row in rows[:: max(1, len(rows) // 40)].tolist():
        depth = int(tree.depth[row])
        prefix = tuple(tree.prefixes[row, :depth].tolist())
        through = sum(
            float(m) for r, m in zip(exact.responses, mass, strict=True) if r[:depth] == prefix
        )
        assert abs(float(tree.visits[row]) - through) < ATOL * 10


def test_capacity_bench_measures_exact_tv_and_its_fit_helps(setting):
    """``bench.twist_capacity``: a zero head's TV is the local product's, as enumeration gives
    it; the exact-gradient fit lowers the TV on the prompts it was fitted on (a sign error in
    the KL or the weights makes it rise)."""
    from argparse import Namespace

    from bench.twist_capacity import fit_head, probe_tvs, states
    from gfn_spin.exact import divergences
    from gfn_spin.twisted_local_product import TwistHead

    target, prompts, _ = setting
    width, vocab = max(map(len, prompts)), target.vocab_size
    data = states(target, prompts, CAP, width, ["features"], progress=False)
    zero = TwistHead(data.inputs["features"].shape[1], vocab)
    tvs = probe_tvs(target, prompts, CAP, width, {"features": zero})
    for i, prompt in enumerate(prompts):
        p = exact_distribution(target, prompt, CAP)
        q = exact_distribution(target.local_product(), prompt, CAP)
        expected = divergences(p.logprobs, q.logprobs)["tv"]
        assert abs(tvs["features"][i] - expected) < ATOL
        assert abs(tvs["local product"][i] - expected) < ATOL
    args = Namespace(
        width=64, depth=2, learning_rate=1e-2, epochs=200, batch=256, seed=0, progress=False
    )
    fitted = probe_tvs(
        target, prompts, CAP, width, {"features": fit_head(data, "features", args, vocab)}
    )
    assert sum(fitted["features"]) < 0.5 * sum(tvs["local product"])
