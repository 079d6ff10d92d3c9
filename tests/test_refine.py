"""Semi-amortized refinement (GFlowNetSampler.refine) against a warm start and fit done by hand."""

from __future__ import annotations

import torch

from gfn_spin import GeometricMixture
from samplers import GFlowNetSampler


def test_refine_is_a_warm_started_fit_that_leaves_the_amortized_sampler_alone(world):
    target = GeometricMixture([world.base, world.shifted], [0.5, 0.5])
    settings = {"max_new_tokens": 7, "prompts_per_step": 2, "samples_per_prompt": 2}
    amortized = GFlowNetSampler(target, world.shifted, refine_steps=3, **settings)
    amortized.fit(world.train_prompts, steps=4, progress=False)
    before = {k: v.clone() for k, v in amortized.weights.state_dict().items()}
    prompts = world.eval_prompts[:2]
    refined = amortized.refine(prompts)
    # By hand: a sampler of the same settings under the refined adapter name, warm-started
    # from the amortized weights, then fitted on the prompts for refine_steps.
    by_hand = GFlowNetSampler(
        target, world.shifted, refine_steps=3, adapter_name="gflownet_refined", **settings
    )
    by_hand.warm_start(amortized)
    by_hand.fit(prompts, steps=3, progress=False)
    assert refined.state.step == 3
    mine, theirs = refined.weights.state_dict(), by_hand.weights.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(torch.equal(before[k], v) for k, v in amortized.weights.state_dict().items())
    # The refinement moved the weights (a refine that only copied would pass the rest).
    assert any(not torch.equal(before[k], mine[k]) for k in mine)
