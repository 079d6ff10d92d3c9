"""Cost per effective sample of SIR, SMC and the GFlowNet toward a geometric mixture (tiny world).

Target: ``G ∝ π_base^(1-α) π_shifted^α`` on the tiny world (DESIGN §6). For each sampler, on the
held-out prompts, in one run:

- model tokens evaluated (every forward token of every distinct policy: proposal, target
  components, the GFlowNet's adapter), per draw and per unit of ESS;
- wall time per draw and per unit of ESS.

ESS is each sampler's own: SIR (K candidates from the local product per draw) and SMC (N
particles from the local product per draw) report the ESS of the weighted population behind
each draw, so total ESS = Σ_draws ESS_draw; the GFlowNet reports ESS/N of the weights G̃/q
over its N draws of a prompt, so total ESS = Σ_prompts (ESS/N)·N. These are not the same
quantity (an SMC population's final ESS ignores the diversity lost to resampling; a SIR draw's
K candidates collapse into one output draw), so the exact TV of each sampler's draws to the
enumerated target is printed beside them (empirical: a histogram of the draws, with the noise
floor of as many exact draws). The GFlowNet's training (``--gfn-steps``) is a one-time cost,
reported apart with the number of draws after which it is paid back against SIR.

    python -m bench.cost_per_sample                 # CPU, α = 0.5, a few minutes at most
    python -m bench.cost_per_sample --alpha 0.9 --gfn-steps 1000
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from bench._timing import emit
from gfn_spin.exact import exact_distribution
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.toyworld import build_world
from samplers import ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetSampler
from samplers.weighting import model_tokens


def empirical_tv(samples, exact, draws: int) -> float:
    """Mean over prompts of TV(histogram of the draws, exact target)."""
    total = 0.0
    responses = samples.responses()
    for i, dist in enumerate(exact):
        counts = Counter(responses[i * draws : (i + 1) * draws])
        p = dict(zip(dist.responses, dist.logprobs.exp().tolist(), strict=True))
        keys = set(p) | set(counts)
        total += 0.5 * sum(abs(p.get(k, 0.0) - counts.get(k, 0) / draws) for k in keys)
    return total / len(exact)


def noise_floor_tv(prompts, exact, draws: int, seed: int) -> float:
    """Empirical TV of ``draws`` exact draws (what a perfect sampler would score)."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(len(prompts)):
        probs = exact[i].logprobs.exp()
        picks = torch.multinomial(probs, draws, replacement=True, generator=gen)
        freq = torch.bincount(picks, minlength=len(probs)).double() / draws
        total += 0.5 * (freq - probs.double()).abs().sum().item()
    return total / len(prompts)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5, help="target weight α (0.5)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (8)")
    parser.add_argument("--draws", type=int, default=64, help="draws per prompt (64)")
    parser.add_argument("--sir-candidates", type=int, default=16, help="SIR K (16)")
    parser.add_argument("--smc-particles", type=int, default=16, help="SMC N (16)")
    parser.add_argument("--gfn-steps", type=int, default=300, help="GFlowNet fit steps (300)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        torch.set_num_threads(args.threads or 1)  # tiny models: 1 thread is fastest here

    world = build_world(device=args.device)
    base, shifted = world.base, world.shifted
    target = GeometricMixture([base, shifted], [1 - args.alpha, args.alpha])
    prompts = world.eval_prompts[: args.prompts]
    cap = world.max_new_tokens
    exact = [exact_distribution(target, p, cap) for p in prompts]

    started = time.perf_counter()
    gfn = GFlowNetSampler(
        target,
        shifted,
        max_new_tokens=cap,
        parametrization="lora",
        seed=args.seed,
        adapter_name="bench_cost",
    )
    tokens_before = model_tokens(target, gfn.policy)
    gfn.fit(world.train_prompts, args.gfn_steps, progress=False)
    fit_tokens = model_tokens(target, gfn.policy) - tokens_before
    fit_seconds = time.perf_counter() - started

    samplers = {
        f"SIR K={args.sir_candidates}": ImportanceResampler(
            target, None, args.sir_candidates, max_new_tokens=cap
        ),
        f"SMC N={args.smc_particles}": SMCSampler(target, args.smc_particles, max_new_tokens=cap),
        "GFlowNet": gfn,
    }
    results = {}
    for name, sampler in samplers.items():
        leaves = (target, getattr(sampler, "proposal", None) or getattr(sampler, "policy", target))
        tokens_before = model_tokens(*leaves)
        start = time.perf_counter()
        samples = sampler.sample(prompts, args.draws, generator=args.seed)
        seconds = time.perf_counter() - start
        tokens = model_tokens(*leaves) - tokens_before
        ess = torch.as_tensor(samples.stats["ess"], dtype=torch.float64)
        if name == "GFlowNet":  # ESS/N per prompt over its N draws
            total_ess = float((ess * args.draws).sum())
        else:  # ESS of each draw's population, averaged per prompt
            total_ess = float(ess.sum() * args.draws)
        draws = len(prompts) * args.draws
        results[name] = {
            "tokens_per_draw": tokens / draws,
            "tokens_per_ess": tokens / total_ess,
            "ms_per_draw": seconds * 1e3 / draws,
            "ms_per_ess": seconds * 1e3 / total_ess,
            "ess_per_draw": total_ess / draws,
            "tv": empirical_tv(samples, exact, args.draws),
        }
    floor = noise_floor_tv(prompts, exact, args.draws, args.seed)

    print(
        f"cost per effective sample, tiny world, α = {args.alpha}, {len(prompts)} prompts x "
        f"{args.draws} draws, L = {cap}, device {args.device}"
    )
    print(
        f"{'sampler':>10} {'tok/draw':>9} {'tok/ESS':>9} {'ms/draw':>8} {'ms/ESS':>8} "
        f"{'ESS/draw':>9} {'TV':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:>10} {r['tokens_per_draw']:9.1f} {r['tokens_per_ess']:9.1f} "
            f"{r['ms_per_draw']:8.3f} {r['ms_per_ess']:8.3f} {r['ess_per_draw']:9.2f} "
            f"{r['tv']:6.3f}"
        )
    print(f"TV of as many exact draws (noise floor): {floor:.3f}")
    sir = results[f"SIR K={args.sir_candidates}"]
    gfn_r = results["GFlowNet"]
    saved = sir["tokens_per_ess"] - gfn_r["tokens_per_ess"]
    payback = fit_tokens / saved if saved > 0 else float("inf")
    print(
        f"GFlowNet fit: {args.gfn_steps} steps, {fit_tokens:,} model tokens, {fit_seconds:.1f} s; "
        f"paid back against SIR after ~{payback:,.0f} effective samples"
    )
    for name, r in results.items():
        emit("cost_per_sample", sampler=name, alpha=args.alpha, device=args.device, **r)
    emit(
        "cost_per_sample_gflownet_fit",
        alpha=args.alpha,
        steps=args.gfn_steps,
        tokens=fit_tokens,
        seconds=fit_seconds,
        payback_effective_samples_vs_sir=payback if payback != float("inf") else None,
        tv_noise_floor=floor,
    )
    return results


if __name__ == "__main__":
    main()
