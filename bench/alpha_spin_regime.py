"""The α-SPIN sampling regime on the many-prompt world: many prompts, 1-2 draws each per
iteration, warm starts; exact TV and total model tokens of every opponent, fit included.

For whoever chooses α-SPIN's opponent sampler. Per preset of ``worlds.many_prompt`` and per α,
iterations t = 1..T use the reference ``π_ref,t ∝ π_0^(1-α) π_t^α`` (h = 1). The iterates π_t
are the weight interpolations ``θ_0 + (t/T)(θ_shifted − θ_0)`` of the world's base and shifted
policies (π_T is the shifted policy): a sequence of policies moving away from π_0 as self-play
iterates do, without the cost of training them (what is measured is the opponent, which sees
only π_ref,t). Each iteration the opponent draws ``--draws`` responses for each of ``--prompts``
fit prompts (the same prompts every iteration, as SPIN's training set). Opponents:

- GFlowNet (``GFlowNetConfig`` defaults, twist form unless ``--overrides`` says otherwise):
  fitted on the iteration's prompts, cold at t = 1 (``--cold-steps``), warm-started from
  iteration t − 1 at t ≥ 2 (``--warm-steps`` at ``--warm-learning-rate``). Its law is exact
  (enumerated); its tokens are that iteration's fit plus its draws;
- SIR with K candidates from the local product: exact law (``gfn_spin.exact.sir_output_laws``)
  for every K of ``--candidates``; tokens measured by running it at each K on ``--cost-prompts``
  prompts and scaled to all draws. Printed: the cheapest K at equal or lower TV than the
  GFlowNet's, and the GFlowNet's tokens over its tokens;
- SMC with N particles from the local product: its law has no closed form, so its TV is the
  empirical TV of ``--smc-draws`` draws per probe prompt, printed beside the same estimator on as
  many exact draws (the noise floor: only what lies above it is SMC's error). Tokens measured as
  SIR's;
- SIR over the GFlowNet: the iteration's fitted GFlowNet as SIR's proposal, at the smallest K
  whose exact TV meets ``--gflownet-accuracy``; tokens are the fit plus SIR's draws. Printed
  beside the cheapest SIR from the local product at equal or lower exact TV (its smallest such
  K, searched on its exact laws);
- auto: what ``samplers.choose_sampler`` picks for ``--auto-accuracy`` (α-SPIN's ``auto``),
  with its exact TV and its total tokens (its pilot, and the GFlowNet's fit if it asks for
  one), over the cheapest option whose exact TV meets that accuracy: SIR at the smallest such
  K (``experiments.evaluation.smallest_sir_ks`` on SIR's exact laws), or the GFlowNet, fit
  included.

TV is the mean over ``--probe`` evenly spaced prompts of those served, with its standard error
over prompts. ``--quick`` runs a small setting (a few minutes on a CPU).

    python -m bench.alpha_spin_regime --quick
    python -m bench.alpha_spin_regime --presets stress --alphas 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from bench._timing import emit
from bench.alpha_spin_iteration import ReferenceLaw, counts
from experiments.evaluation import smallest_sir_ks
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from samplers import ImportanceResampler, SMCSampler, choose_sampler
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler
from samplers.weighting import model_tokens
from worlds.many_prompt import ManyPromptConfig, ManyPromptWorld, build_many_prompt_world

QUICK = {
    "prompts": 256,
    "iterations": 3,
    "cold_steps": 150,
    "warm_steps": 40,
    "probe": 4,
    "candidates": "1,4,16,64",
    "particles": "4",
    "smc_draws": 200,
    "cost_prompts": 16,
}


def iterate(many: ManyPromptWorld, weight: float) -> Policy:
    """The policy with weights ``(1 − weight)·θ_base + weight·θ_shifted``."""
    policy = many.world.load_policy("shifted", dtype=torch.float32)
    base = dict(many.world.base.model.named_parameters())
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            parameter.lerp_(base[name], 1.0 - weight)
    return policy


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean over prompts and its standard error."""
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def per_prompt_tv(law: ReferenceLaw, laws: Sequence[torch.Tensor]) -> list[float]:
    return [
        0.5 * float((p.logprobs.exp() - q.exp()).abs().sum())
        for p, q in zip(law.exact, laws, strict=True)
    ]


def draw_tokens(
    sampler: Any, prompts: Sequence[Sequence[int]], draws: int, chunk: int = 256
) -> int:
    """Model tokens of ``draws`` draws for each prompt (sampled, in chunks)."""
    before = sampler.tokens_evaluated()
    for start in range(0, len(prompts), chunk):
        sampler.sample(prompts[start : start + chunk], draws, generator=start)
    return sampler.tokens_evaluated() - before


def empirical_tv(law: ReferenceLaw, draws: Sequence[Sequence[tuple[int, ...]]]) -> list[float]:
    """Per probe prompt, the TV between the empirical law of ``draws`` and the reference."""
    return [
        0.5 * float((target.empirical_logprobs(d).exp() - target.logprobs.exp()).abs().sum())
        for target, d in zip(law.exact, draws, strict=True)
    ]


def responses(samples: Any) -> list[tuple[int, ...]]:
    return [
        tuple(r[:n])
        for r, n in zip(samples.response_ids.tolist(), samples.lengths.tolist(), strict=True)
    ]


def sir_row(
    args: argparse.Namespace,
    law: ReferenceLaw,
    reference: GeometricMixture,
    local: Any,
    ks: Sequence[int],
    cost_prompts: Sequence[Sequence[int]],
    scale: float,
) -> dict[int, dict[str, float]]:
    """Per K: SIR's exact TV (local-product proposal) and its tokens over all draws."""
    tvs = law.sir_tvs(local, ks)
    return {
        k: {
            "tv": tvs[k],
            "tokens": sir_tokens(reference, local, k, law.cap, cost_prompts, args.draws) * scale,
        }
        for k in ks
    }


def sir_tokens(
    reference: GeometricMixture,
    local: Any,
    k: int,
    cap: int,
    cost_prompts: Sequence[Sequence[int]],
    draws: int,
) -> int:
    """Measured model tokens of SIR with K candidates on ``cost_prompts``."""
    return draw_tokens(
        ImportanceResampler(reference, local, k, max_new_tokens=cap), cost_prompts, draws
    )


def smc_rows(
    args: argparse.Namespace,
    law: ReferenceLaw,
    reference: GeometricMixture,
    cost_prompts: Sequence[Sequence[int]],
    scale: float,
    probe: Sequence[Sequence[int]],
) -> tuple[dict[int, dict[str, Any]], tuple[float, float]]:
    """Per N: SMC's empirical TV on the probe prompts and its tokens; and the noise floor of
    that estimator (as many exact draws)."""
    generator = torch.Generator().manual_seed(args.seed)
    floor = mean_and_error(
        empirical_tv(
            law,
            [
                [
                    target.responses[i]
                    for i in target.sample_indices(args.smc_draws, generator).tolist()
                ]
                for target in law.exact
            ],
        )
    )
    smc = {}
    for n in counts(args.particles):
        sampler = SMCSampler(reference, n, max_new_tokens=law.cap)
        tokens = draw_tokens(sampler, cost_prompts, args.draws) * scale
        draws = [responses(sampler.sample([p], args.smc_draws, generator=args.seed)) for p in probe]
        smc[n] = {"empirical_tv": mean_and_error(empirical_tv(law, draws)), "tokens": tokens}
    return smc, floor


def sir_over_gflownet_row(
    args: argparse.Namespace,
    law: ReferenceLaw,
    reference: GeometricMixture,
    gflownet: GFlowNetSampler,
    cost: tuple[Sequence[Sequence[int]], float],
    known: tuple[float, dict[int, float]],
) -> dict[str, Any]:
    """SIR over the fitted ``gflownet`` at the smallest K whose exact TV meets
    ``--gflownet-accuracy``, its total tokens (``fit_tokens`` of ``known``'s fit included),
    against the cheapest SIR from the local product at equal or lower exact TV.

    ``cost``: the prompts SIR's tokens are measured on and the scale to all draws; ``known``:
    the GFlowNet's fit tokens and SIR's exact TV from the local product at the K of the grid.
    """
    (cost_prompts, scale), (fit_tokens, local_known) = cost, known
    proposal, local = gflownet.policy, reference.local_product()
    own = law.sir_tvs(proposal, [1])
    [(k, tv)] = smallest_sir_ks(lambda ks: law.sir_tvs(proposal, ks), [args.gflownet_accuracy], own)
    sampler = ImportanceResampler(reference, proposal, k, max_new_tokens=law.cap)
    total = fit_tokens + draw_tokens(sampler, cost_prompts, args.draws) * scale
    [(k_local, tv_local)] = smallest_sir_ks(lambda ks: law.sir_tvs(local, ks), [tv], local_known)
    local_tokens = sir_tokens(reference, local, k_local, law.cap, cost_prompts, args.draws) * scale
    return {
        "accuracy": args.gflownet_accuracy,
        "k": k,
        "tv": tv,
        "total_tokens": total,
        "local_k": k_local,
        "local_tv": tv_local,
        "local_tokens": local_tokens,
        "over_local": total / local_tokens,
    }


def auto_row(
    args: argparse.Namespace,
    law: ReferenceLaw,
    reference: GeometricMixture,
    prompts: Sequence[Sequence[int]],
    cost_prompts: Sequence[Sequence[int]],
    scale: float,
    fitted: tuple[GFlowNetSampler, int, float, float],
    fit_steps: int,
    known: dict[int, float],
) -> dict[str, Any]:
    """What ``samplers.choose_sampler`` picks for ``--auto-accuracy`` (as α-SPIN's ``auto``
    does), its exact TV and total tokens (pilot, and the fit when it fits), against the
    cheapest opponent whose exact TV meets that accuracy: SIR at its smallest such K, or the
    iteration's GFlowNet (fit included) when its TV does.

    ``fitted``: the iteration's GFlowNet, its fit tokens, exact TV and total tokens, after a
    fit of ``fit_steps`` steps (cold or warm; what auto would run to fit it). It is fitted
    before the choice; ``choose_sampler`` is handed it through ``fit_gflownet``, so its fit
    is charged to ``auto`` only when ``auto`` asks for a fit, as in α-SPIN. ``known``: SIR's
    exact TV (local-product proposal) at the K of the grid, K = 1 among them.
    """
    gflownet, fit_tokens, gfn_tv, gfn_total = fitted
    asked: list[bool] = []

    def fit() -> tuple[GFlowNetSampler, int]:
        asked.append(True)
        return gflownet, fit_tokens

    config = gflownet.config
    choice = choose_sampler(
        reference,
        prompts,
        accuracy=args.auto_accuracy,
        draws_per_prompt=args.draws,
        max_new_tokens=law.cap,
        fit_gflownet=fit,
        fit_rollouts=fit_steps * config.prompts_per_step * config.samples_per_prompt,
        rule=args.auto_rule,
        generator=args.seed,
    )
    chosen = choice.sampler
    local = reference.local_product()
    if isinstance(chosen, GFlowNetSampler):
        tv = gfn_tv
    else:  # SIR (K = 1: the local product), from the local product or over the GFlowNet
        k = chosen.num_candidates
        tv = law.sir_tvs(chosen.proposal, [k])[k]
    total = choice.pilot_tokens + (fit_tokens if asked else 0)
    total += draw_tokens(chosen, cost_prompts, args.draws) * scale
    [(k_min, _)] = smallest_sir_ks(lambda ks: law.sir_tvs(local, ks), [args.auto_accuracy], known)
    cheapest = {
        f"SIR K={k_min}": sir_tokens(reference, local, k_min, law.cap, cost_prompts, args.draws)
        * scale
    }
    if gfn_tv <= args.auto_accuracy:
        cheapest["GFlowNet"] = gfn_total
    best = min(cheapest, key=cheapest.get)
    return {
        "accuracy": args.auto_accuracy,
        "rule": args.auto_rule,
        "chosen": choice.chosen.name,
        "fitted": bool(asked),
        "tv": tv,
        "total_tokens": total,
        "pilot_tokens": choice.pilot_tokens,
        "cheapest": best,
        "cheapest_tokens": cheapest[best],
        "over_cheapest": total / cheapest[best],
    }


def regime(args: argparse.Namespace, preset: str, alpha: float) -> list[dict[str, Any]]:
    """All iterations of one preset and α; one row per iteration."""
    many = build_many_prompt_world(ManyPromptConfig(preset=preset))
    cap, base = many.max_new_tokens, many.world.base
    prompts = many.fit_prompts[: args.prompts]
    # Evenly spaced, offset by half a spacing from the prompts auto's pilot reads
    # (samplers.choice.pilot_subset), so its choice is not scored on the prompts it measured.
    spacing = max(1, len(prompts) // args.probe)
    probe = prompts[spacing // 2 :: spacing][: args.probe]
    served = len(prompts) * args.draws
    overrides = json.loads(args.overrides)
    rows, previous = [], None
    for t in range(1, args.iterations + 1):
        current = iterate(many, t / args.iterations)
        reference = GeometricMixture([base, current], [1 - alpha, alpha])
        local = reference.local_product()
        law = ReferenceLaw(reference, probe, cap)
        config = GFlowNetConfig(
            max_new_tokens=cap, adapter_name=f"regime_{t}", seed=args.seed + t, **overrides
        )
        gflownet = GFlowNetSampler(reference, current, config)
        if previous is not None:
            gflownet.warm_start(previous, learning_rate=args.warm_learning_rate)
        fit_before = model_tokens(reference, gflownet.policy)
        gflownet.fit(prompts, args.warm_steps if previous else args.cold_steps, progress=False)
        fit_tokens = model_tokens(reference, gflownet.policy) - fit_before
        gfn_draw_tokens = draw_tokens(gflownet, prompts, args.draws)
        gfn_tv = mean_and_error(
            per_prompt_tv(law, [law.law_of(gflownet.policy, p).logprobs for p in probe])
        )
        previous = gflownet

        ks = counts(args.candidates)
        cost_prompts = prompts[: args.cost_prompts]
        scale = served / (len(cost_prompts) * args.draws)
        sir = sir_row(args, law, reference, local, ks, cost_prompts, scale)
        matched = next((k for k in ks if sir[k]["tv"] <= gfn_tv[0]), None)
        smc, floor = smc_rows(args, law, reference, cost_prompts, scale, probe)
        gfn_total = fit_tokens + gfn_draw_tokens
        known = {k: v["tv"] for k, v in sir.items()} | ({} if 1 in sir else law.sir_tvs(local, [1]))
        auto = auto_row(
            args,
            law,
            reference,
            prompts,
            cost_prompts,
            scale,
            (gflownet, fit_tokens, gfn_tv[0], gfn_total),
            args.warm_steps if t > 1 else args.cold_steps,
            known,
        )
        over = sir_over_gflownet_row(
            args, law, reference, gflownet, (cost_prompts, scale), (fit_tokens, known)
        )
        row = {
            "preset": preset,
            "alpha": alpha,
            "iteration": t,
            "prompts": len(prompts),
            "draws_per_prompt": args.draws,
            "gflownet": {
                "tv": gfn_tv,
                "fit_tokens": fit_tokens,
                "draw_tokens": gfn_draw_tokens,
                "total_tokens": gfn_total,
                "warm": t > 1,
            },
            "local_product_tv": sir[1]["tv"] if 1 in sir else None,
            "sir": sir,
            "sir_matched_k": matched,
            "gflownet_over_sir_tokens": None
            if matched is None
            else gfn_total / sir[matched]["tokens"],
            "sir_over_gflownet": over,
            "auto": auto,
            "smc": smc,
            "smc_noise_floor_tv": floor,
        }
        report(row)
        emit("alpha_spin_regime", **row)
        rows.append(row)
    return rows


def report(row: dict[str, Any]) -> None:
    g = row["gflownet"]
    matched = row["sir_matched_k"]
    print(
        f"{row['preset']} α={row['alpha']} t={row['iteration']} ({row['prompts']} prompts × "
        f"{row['draws_per_prompt']}): GFlowNet TV {g['tv'][0]:.4f} ± {g['tv'][1]:.4f}, tokens "
        f"{g['total_tokens']:,} (fit {g['fit_tokens']:,}{', warm' if g['warm'] else ''})",
        flush=True,
    )
    print(
        "  SIR (local product) TV / tokens by K: "
        + "; ".join(f"{k}: {v['tv']:.4f} / {v['tokens']:,.0f}" for k, v in row["sir"].items()),
        flush=True,
    )
    if matched is None:
        print("  no K of the grid reaches the GFlowNet's TV", flush=True)
    else:
        print(
            f"  cheapest SIR at ≤ its TV: K = {matched}; GFlowNet tokens ÷ SIR tokens = "
            f"{row['gflownet_over_sir_tokens']:.3f}",
            flush=True,
        )
    o = row["sir_over_gflownet"]
    print(
        f"  SIR over the GFlowNet at TV ≤ {o['accuracy']}: K = {o['k']}, TV {o['tv']:.4f}, "
        f"tokens {o['total_tokens']:,.0f} (fit included); SIR from the local product at ≤ that "
        f"TV: K = {o['local_k']} (TV {o['local_tv']:.4f}), {o['local_tokens']:,.0f}: "
        f"{o['over_local']:.3f}×",
        flush=True,
    )
    a = row["auto"]
    print(
        f"  auto (accuracy {a['accuracy']}, rule {a['rule']}): {a['chosen']}, TV {a['tv']:.4f}, "
        f"tokens {a['total_tokens']:,.0f} (pilot {a['pilot_tokens']:,}"
        f"{', fit' if a['fitted'] else ''}); cheapest at that accuracy {a['cheapest']} "
        f"({a['cheapest_tokens']:,.0f}): {a['over_cheapest']:.3f}×",
        flush=True,
    )
    for n, v in row["smc"].items():
        print(
            f"  SMC N = {n}: empirical TV {v['empirical_tv'][0]:.4f} ± {v['empirical_tv'][1]:.4f} "
            f"(exact draws give {row['smc_noise_floor_tv'][0]:.4f}), tokens {v['tokens']:,.0f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="overlap,stress", help="comma-separated presets")
    parser.add_argument("--alphas", default="0.5,0.95", help="comma-separated α")
    parser.add_argument("--prompts", type=int, default=2048, help="prompts served per iteration")
    parser.add_argument("--draws", type=int, default=2, help="draws per prompt per iteration")
    parser.add_argument("--iterations", type=int, default=3, help="iterations T")
    parser.add_argument("--cold-steps", type=int, default=1000, help="GFlowNet fit at t = 1")
    parser.add_argument("--warm-steps", type=int, default=200, help="warm fit at t ≥ 2")
    parser.add_argument("--warm-learning-rate", type=float, default=1e-3, help="warm peak rate")
    parser.add_argument("--overrides", default="{}", help="GFlowNetConfig fields as JSON")
    parser.add_argument("--candidates", default="1,2,4,8,16,32,64,128,256", help="SIR K grid")
    parser.add_argument("--particles", default="4,16", help="SMC N grid")
    parser.add_argument("--smc-draws", type=int, default=1000, help="SMC draws per probe prompt")
    parser.add_argument("--probe", type=int, default=16, help="prompts of the exact TV")
    parser.add_argument(
        "--cost-prompts", type=int, default=64, help="prompts of SIR/SMC token counts"
    )
    parser.add_argument(
        "--gflownet-accuracy",
        type=float,
        default=0.02,
        help="exact TV asked of SIR over the GFlowNet (the smallest K reaching it is priced)",
    )
    parser.add_argument(
        "--auto-accuracy",
        type=float,
        default=0.01,
        help="accuracy (mean exact TV) asked of choose_sampler for the auto row (α-SPIN's "
        "auto_accuracy default)",
    )
    parser.add_argument(
        "--auto-rule",
        choices=["estimate", "bound"],
        default="estimate",
        help="choose_sampler's rule for SIR's K (samplers.choice)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fits and pilots")
    parser.add_argument("--quick", action="store_true", help="a small setting (minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.presets, args.alphas = "stress", "0.5"
    torch.set_num_threads(1)
    return [
        row
        for preset in args.presets.split(",")
        for alpha in (float(a) for a in args.alphas.split(","))
        for row in regime(args, preset, alpha)
    ]


if __name__ == "__main__":
    main()
