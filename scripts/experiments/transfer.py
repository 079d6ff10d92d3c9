"""Prototype: does a GFlowNet twist fitted on the many-prompt world's fit prompts transfer to its
new prompts?  ``python scripts/experiments/transfer.py --preset overlap --steps 300``.

Prints exact TV on fit and new probe prompts for each option, and the model tokens of every fit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gfn_spin.exact import exact_distribution
from gfn_spin.mixtures import GeometricMixture, LocalProduct
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler
from samplers.weighting import model_tokens
from worlds.many_prompt import ManyPromptConfig, build_many_prompt_world


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="overlap")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probe", type=int, default=16)
    parser.add_argument("--refine", type=int, nargs="*", default=[25, 50])
    parser.add_argument("--options", nargs="*", default=["amortized", "on_new", "refine"])
    parser.add_argument("--overrides", default="{}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    many = build_many_prompt_world(ManyPromptConfig(preset=args.preset))
    world, cap = many.world, many.max_new_tokens
    components, weights = [world.base, world.shifted], [1 - args.alpha, args.alpha]
    target = GeometricMixture(components, weights)
    probes = {
        "new": many.new_prompts[:: len(many.new_prompts) // args.probe][: args.probe],
        "fit": many.fit_prompts[:: len(many.fit_prompts) // args.probe][: args.probe],
    }
    exact = {
        k: [exact_distribution(target, p, cap).logprobs.exp() for p in v] for k, v in probes.items()
    }

    def tv(density, on):
        with torch.no_grad():
            values = [
                0.5 * float((exact_distribution(density, p, cap).logprobs.exp() - t).abs().sum())
                for p, t in zip(probes[on], exact[on], strict=True)
            ]
        return sum(values) / len(values)

    out = {"preset": args.preset, "alpha": args.alpha, "steps": args.steps}
    local = LocalProduct(components, weights)
    out["local_tv_new"], out["local_tv_fit"] = tv(local, "new"), tv(local, "fit")
    print(json.dumps(out), flush=True)
    overrides = json.loads(args.overrides)
    print(json.dumps({"overrides": overrides}), flush=True)

    def sampler(name):
        config = GFlowNetConfig(
            max_new_tokens=cap, adapter_name=name, **{"parametrization": "twist", **overrides}
        )
        return GFlowNetSampler(target, world.shifted, config)

    def fit(s, prompts, steps):
        tokens, started = model_tokens(s.target, s.policy), time.perf_counter()
        s.fit(prompts, steps=steps, progress=False)
        return model_tokens(s.target, s.policy) - tokens, time.perf_counter() - started

    if "amortized" in args.options or "refine" in args.options:
        amortized = sampler("amortized")
        tokens, seconds = fit(amortized, many.fit_prompts, args.steps)
        row = {"option": "amortized", "fit_tokens": tokens, "seconds": round(seconds)}
        row["tv_new"], row["tv_fit"] = tv(amortized.policy, "new"), tv(amortized.policy, "fit")
        print(json.dumps(row), flush=True)
        for steps in args.refine if "refine" in args.options else []:
            refined = sampler(f"refine{steps}")
            refined.warm_start(amortized)
            extra, seconds = fit(refined, probes["new"], steps)
            row = {"option": f"refine {steps} steps on new", "refine_tokens": extra}
            row["tv_new"] = tv(refined.policy, "new")
            print(json.dumps(row), flush=True)
    if "on_new" in args.options:
        own = sampler("on_new")
        tokens, seconds = fit(own, probes["new"], args.steps)
        row = {
            "option": "fit on the new probes",
            "fit_tokens": tokens,
            "tv_new": tv(own.policy, "new"),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
