"""The GFlowNet on the scaled world (256 symbols, cap 32), measured against the exact target.

Target: ``base^(1−α) · other^α`` on the scaled world (docs/scaled_world.md), whose log Z,
log p(y), KL(q‖p) and population ESS are exact (a dynamic program over two-token contexts).
The GFlowNet (``GFlowNetConfig`` defaults, the twist form for a geometric mixture of policies
and SubTB, with ``--steps`` steps) is fitted on the world's train prompts and measured on its
held-out prompts:

1. a curve over steps: the ELBO ``E_q[log G̃ − log q]`` on fresh draws of the policy (mean
   over prompts, with its standard error), ``KL(q‖p) = log Z − ELBO`` with the exact log Z,
   and the fraction of empty responses;
2. at the end, the policy's exact KL(q‖p) and population ESS/N. The twist head reads the last
   hidden states of one-layer sliding-window-2 models, so the twisted policy is itself
   bounded-context; :func:`exact_policy_report` checks that on its draws
   (:func:`check_bounded_context`) before reading its tables, and falls back to the Monte Carlo
   figures when the check fails;
3. the one-pass form (a LoRA adapter on π_t, distilled from the twist policy with the main
   job's one-pass recipe, but 1,200 steps of 4 draws per prompt at peak rate 3e-3: here the
   distillation keeps improving long after the main job's 200 steps), measured the same way, beside its ceiling: the target's
   length-blind projection (``BoundedContextTarget.length_blind_projection``), the best law
   that reads only the last two tokens, as the one-pass form does;
4. effective samples per model token and ``|log Ẑ − log Z|`` at matched population sizes:
   SMC and SIR from the local product, twisted SMC and SIR with the GFlowNet as proposal, the
   GFlowNet's and the one-pass form's own weighted draws; a ratio line per GFlowNet-based
   family against the best of each baseline family, and its break-even point
   (:func:`break_even`).

How ESS is measured. For a sampler whose draws come from a density q (the GFlowNet, SIR with
it as proposal): the exact population ``ESS/N = Z² / E_q[w²]``, ``w = G̃/q``, from the program
(the limit of the Kish ESS of N weighted draws). For SMC: the Kish ESS of its final weighted
population (``stats["ess"]``), which ignores the diversity resampling removed, so it favours
SMC. Beside it, ``|log Ẑ − log Z|`` against the exact log Z at the same budget, which needs no
such convention.

The fit runs in chunks of ``steps / curve_points`` with the learning-rate and reward-temperature
schedules of the whole fit (``fit(..., schedule_steps=steps)``), so the trajectory is the one
of a single ``fit(steps)``.

    python -m bench.gflownet_scaled                                       # α = 0.5, iterate pair
    python -m bench.gflownet_scaled --pairs stress --alpha 0.95
    python -m bench.gflownet_scaled --small --steps 20 --onepass-steps 20  # the 5-symbol test world
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench._timing import emit
from experiments.geometric_mixture import GeometricMixtureConfig
from gfn_spin.density import Density
from gfn_spin.mixtures import LocalProduct
from gfn_spin.samples import Samples
from samplers import GFlowNetSampler, ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetConfig
from worlds.bounded_context import (
    BoundedContextTarget,
    ContextTables,
    check_bounded_context,
    monte_carlo_kl,
)
from worlds.scaled import CONTEXT, PAIRS, ScaledWorld, ScaledWorldConfig, build_world

#: Largest teacher-forced vs table gap accepted as float32 rounding (docs/scaled_world.md).
BOUNDED_CONTEXT_TOLERANCE = 1e-4


def padded(samples: Samples, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """``[B, max_new_tokens]`` response ids (the program scores full-width rows)."""
    ids = samples.response_ids.cpu()
    extra = max_new_tokens - ids.shape[1]
    return torch.nn.functional.pad(ids, (0, extra), value=pad_token_id) if extra else ids


def draw_report(
    target: BoundedContextTarget,
    prompts: Sequence[Sequence[int]],
    samples: Samples,
) -> dict[str, float]:
    """Monte Carlo figures of draws from a density q that scores them (``samples.log_q``),
    ``num_samples`` per prompt in prompt-major order, against the exact target.

    Returns the ELBO ``E_q[log G̃ − log q]`` and ``KL(q‖p) = log Z − ELBO`` (means over prompts
    and their standard errors, log G̃ and log Z from the program) and the empty fraction.
    """
    rows = [prompts[i] for i in samples.prompt_index.tolist()]
    ids = padded(samples, target.max_new_tokens, target.tables.eos_token_id)
    log_target = target.log_unnormalized(rows, ids, samples.lengths)
    log_z = target.log_z(prompts)
    per_prompt = len(rows) // len(prompts)
    kls, errors = zip(
        *(
            monte_carlo_kl(q, g, float(z))
            for q, g, z in zip(
                samples.log_q.double().cpu().view(len(prompts), per_prompt),
                log_target.view(len(prompts), per_prompt),
                log_z,
                strict=True,
            )
        ),
        strict=True,
    )
    kl = sum(kls) / len(kls)
    stderr = math.sqrt(sum(e * e for e in errors)) / len(errors)
    return {
        "elbo": float(log_z.mean()) - kl,
        "kl_qp_mc": kl,
        "kl_qp_stderr": stderr,
        "empty_fraction": float((samples.lengths == 0).double().mean()),
    }


def empty_probability(target: BoundedContextTarget, prompts: Sequence[Sequence[int]]) -> float:
    """The target's exact probability of the empty response, mean over ``prompts``."""
    ids = torch.full((len(prompts), target.max_new_tokens), target.tables.eos_token_id)
    lengths = torch.zeros(len(prompts), dtype=torch.long)
    return float(target.log_prob(prompts, ids, lengths).exp().mean())


def exact_policy_report(
    target: BoundedContextTarget,
    policy: Density,
    alphabet: Sequence[int],
    prompts: Sequence[Sequence[int]],
    samples: Samples,
) -> dict[str, float]:
    """Exact KL(q‖p) and population ESS/N of ``policy`` on ``prompts`` (means), when its law
    reads the last ``CONTEXT`` tokens only.

    The check teacher-forces ``policy`` on ``samples`` (its own draws of ``prompts``) and
    compares with its tables; a gap above :data:`BOUNDED_CONTEXT_TOLERANCE` means the tables
    do not describe it, and the exact figures are NaN (use :func:`draw_report`'s).
    """
    tables = ContextTables.from_density(policy, alphabet, CONTEXT)
    rows = [prompts[i] for i in samples.prompt_index.tolist()]
    ids = padded(samples, target.max_new_tokens, target.tables.eos_token_id)
    gap = check_bounded_context(policy, tables, rows, ids, samples.lengths)
    if gap > BOUNDED_CONTEXT_TOLERANCE:
        return {"bounded_context_gap": gap, "kl_qp": math.nan, "ess_fraction": math.nan}
    return {
        "bounded_context_gap": gap,
        "kl_qp": float(target.kl_from(tables, prompts).mean()),
        "ess_fraction": float(target.proposal_ess(tables, prompts).mean()),
    }


def fit_with_curve(
    sampler: GFlowNetSampler,
    world: ScaledWorld,
    target: BoundedContextTarget,
    points: int,
    draws: int,
    seed: int,
) -> tuple[list[dict[str, Any]], float, int]:
    """Fit ``sampler`` on the train prompts in ``points`` chunks, measuring held-out draws
    before the first and after each; returns the curve, fit seconds and fit model tokens."""
    total = sampler.config.steps
    marks = sorted({round(total * k / points) for k in range(points + 1)})
    curve, seconds, tokens = [], 0.0, 0
    # Every policy a fit can run: the target's components and the adapter's init (the twist
    # form's tokens are its components'; counting the policy too would count them twice).
    models = (*sampler.target.components, sampler.init)
    for step in marks:
        if step > sampler.state.step:
            before = sum(m.tokens_evaluated for m in models)
            started = time.perf_counter()
            log = sampler.fit(
                world.train_prompts,
                steps=step,
                progress=False,
                schedule_steps=sampler.config.steps,
            )
            seconds += time.perf_counter() - started
            tokens += sum(m.tokens_evaluated for m in models) - before
            train_empty = log[-1]["empty_fraction"]
        else:
            train_empty = math.nan
        samples = sampler.sample(world.eval_prompts, draws, generator=seed + step)
        curve.append(
            {
                "step": step,
                "fit_seconds": seconds,
                "train_empty_fraction": train_empty,
                **draw_report(target, world.eval_prompts, samples),
            }
        )
    return curve, seconds, tokens


@dataclass
class Entry:
    """One sampler of the cost table.

    ``draws``: draws asked per prompt and run. ``population``: the weighted draws behind them
    (K candidates of SIR, the draws themselves for a policy, N particles of SMC).
    ``exact_ess``: the exact population ESS/N of the proposal of those weighted draws (None:
    the Kish ESS of SMC's final population, ``stats["ess"]``). ``scorers``: models whose teacher-forced scoring of the
    draws is part of the cost but outside ``stats["tokens"]`` (a one-pass policy's weights).
    """

    name: str
    sampler: Any
    draws: int
    population: int
    exact_ess: float | None
    scorers: tuple[Density, ...] = ()


def cost_rows(
    target: BoundedContextTarget,
    prompts: Sequence[Sequence[int]],
    entries: Sequence[Entry],
    runs: int,
) -> list[dict[str, Any]]:
    """Effective samples per model token of each entry on ``prompts`` and ``|log Ẑ − log Z|``
    against the exact log Z (mean over prompts and runs, with its standard error)."""
    log_z = target.log_z(prompts)
    rows = []
    for entry in entries:
        tokens, ess, errors = 0, [], []
        started = time.perf_counter()
        for run in range(runs):
            before = sum(m.tokens_evaluated for m in entry.scorers)
            out = entry.sampler.sample(prompts, entry.draws, generator=run)
            tokens += out.stats["tokens"] + sum(m.tokens_evaluated for m in entry.scorers) - before
            errors.append(torch.as_tensor(out.stats["log_z"]).double().cpu() - log_z)
            if entry.exact_ess is None:
                ess.append(float(torch.as_tensor(out.stats["ess"]).double().mean()))
        per_population = tokens / (runs * len(prompts))
        population_ess = sum(ess) / runs if ess else entry.exact_ess * entry.population
        delta = torch.stack(errors).abs()
        rows.append(
            {
                "sampler": entry.name,
                "tokens_per_population": per_population,
                "ess_per_population": population_ess,
                "tokens_per_ess": per_population / population_ess,
                "mean_abs_delta_log_z": float(delta.mean()),
                "delta_log_z_stderr": float(delta.std() / math.sqrt(delta.numel())),
                "seconds_per_population": (time.perf_counter() - started) / (runs * len(prompts)),
            }
        )
    return rows


def break_even(
    rows: Sequence[dict[str, Any]], fits: dict[str, tuple[int, float]]
) -> list[dict[str, Any]]:
    """Effective samples after which a fit pays for itself: its cost ÷ the cost it saves per
    effective sample, for the best row of each GFlowNet-based family against the best row of
    each baseline family. ``fits``: row-name prefix → (fit tokens, fit seconds) of that
    family; rows of other prefixes are baselines."""
    out = []
    for prefix, (fit_tokens, fit_seconds) in fits.items():
        best = min(
            (r for r in rows if r["sampler"].startswith(prefix)),
            key=lambda r: r["tokens_per_ess"],
        )
        for family in ("SMC q_loc", "SIR q_loc"):
            base = min(
                (r for r in rows if r["sampler"].startswith(family)),
                key=lambda r: r["tokens_per_ess"],
            )
            saved_tokens = base["tokens_per_ess"] - best["tokens_per_ess"]
            saved_seconds = (
                base["seconds_per_population"] / base["ess_per_population"]
                - best["seconds_per_population"] / best["ess_per_population"]
            )
            out.append(
                {
                    "gflownet_sampler": best["sampler"],
                    "baseline": base["sampler"],
                    "fit_tokens": fit_tokens,
                    "fit_seconds": fit_seconds,
                    "ess_per_token_ratio": base["tokens_per_ess"] / best["tokens_per_ess"],
                    "break_even_ess_tokens": fit_tokens / saved_tokens
                    if saved_tokens > 0
                    else None,
                    "break_even_ess_seconds": fit_seconds / saved_seconds
                    if saved_seconds > 0
                    else None,
                }
            )
    return out


def run_pair(world: ScaledWorld, alpha: float, pair: str, args: argparse.Namespace) -> None:
    target = world.target(alpha, pair)
    mixture = world.mixture(alpha, pair)
    cap = world.max_new_tokens
    config = GFlowNetConfig(max_new_tokens=cap, steps=args.steps, seed=args.seed)
    gfn = GFlowNetSampler(mixture, world.load_policy(pair), config)
    curve, fit_seconds, fit_tokens = fit_with_curve(
        gfn, world, target, args.curve_points, args.draws, args.seed
    )
    target_empty = empty_probability(target, world.eval_prompts)
    for point in curve:
        emit(
            "gflownet_scaled_curve",
            pair=pair,
            alpha=alpha,
            log_z_mean=float(target.log_z(world.eval_prompts).mean()),
            target_empty_fraction=target_empty,
            **point,
        )
    samples = gfn.sample(world.eval_prompts, args.draws, generator=args.seed)
    exact = exact_policy_report(target, gfn.policy, world.symbol_ids, world.eval_prompts, samples)
    emit(
        "gflownet_scaled_fit",
        pair=pair,
        alpha=alpha,
        parametrization=gfn.parametrization,
        steps=config.steps,
        fit_seconds=fit_seconds,
        fit_tokens=fit_tokens,
        tokens_per_draw=samples.stats["tokens"] / len(samples.lengths),
        **exact,
        **draw_report(target, world.eval_prompts, samples),
    )

    # The best a proposal reading only the last CONTEXT tokens can do (the one-pass form's
    # ceiling): the target's length-blind projection, exact.
    blind = target.length_blind_projection(world.eval_prompts)
    emit(
        "gflownet_scaled_length_blind_ceiling",
        pair=pair,
        alpha=alpha,
        kl_pq=float(target.kl_to(blind, world.eval_prompts).mean()),
        kl_qp=float(target.kl_from(blind, world.eval_prompts).mean()),
        ess_fraction=float(target.proposal_ess(blind, world.eval_prompts).mean()),
    )

    onepass_config = GeometricMixtureConfig().onepass_config(alpha, cap)
    onepass_config = dataclasses.replace(onepass_config, seed=args.seed)
    onepass_config = dataclasses.replace(
        onepass_config,
        steps=args.onepass_steps,
        learning_rate=args.onepass_learning_rate,
        samples_per_prompt=args.onepass_samples_per_prompt,
    )
    onepass = GFlowNetSampler(mixture, world.load_policy(pair), onepass_config)
    started = time.perf_counter()
    before = sum(m.tokens_evaluated for m in (*mixture.components, onepass.init))
    onepass.fit(world.train_prompts, progress=False, teacher=gfn.policy)
    onepass_seconds = time.perf_counter() - started
    onepass_tokens = sum(m.tokens_evaluated for m in (*mixture.components, onepass.init)) - before
    draws = onepass.sample(world.eval_prompts, args.draws, generator=args.seed)
    onepass_exact = exact_policy_report(
        target, onepass.policy, world.symbol_ids, world.eval_prompts, draws
    )
    emit(
        "gflownet_scaled_onepass",
        pair=pair,
        alpha=alpha,
        steps=onepass_config.steps,
        fit_seconds=onepass_seconds,
        fit_tokens=onepass_tokens,
        tokens_per_draw=draws.stats["tokens"] / len(draws.lengths),
        **onepass_exact,
        **draw_report(target, world.eval_prompts, draws),
    )

    local = LocalProduct(mixture.components, mixture.weights)
    local_ess = float(
        target.proposal_ess(
            ContextTables.from_density(local, world.symbol_ids, CONTEXT), world.eval_prompts
        ).mean()
    )
    entries = []
    for n in args.particles:
        entries += [
            Entry(f"SMC q_loc N={n}", SMCSampler(mixture, n, max_new_tokens=cap), 1, n, None),
            Entry(
                f"SIR q_loc K={n}",
                ImportanceResampler(mixture, None, n, max_new_tokens=cap),
                1,
                n,
                local_ess,
            ),
            Entry(
                f"twisted SMC(GFN) N={n}",
                SMCSampler(mixture, n, proposal=gfn.policy, twist="flow", max_new_tokens=cap),
                1,
                n,
                None,
            ),
            Entry(
                f"SIR(GFN) K={n}",
                ImportanceResampler(mixture, gfn.policy, n, max_new_tokens=cap),
                1,
                n,
                exact["ess_fraction"],
            ),
            # The twist's rollout runs every component, so log G̃ of its draws costs nothing
            # more; the one-pass policy's weights need the components' teacher-forced pass.
            Entry(f"GFlowNet x{n}", gfn, n, n, exact["ess_fraction"]),
            Entry(
                f"one-pass x{n}", onepass, n, n, onepass_exact["ess_fraction"], mixture.components
            ),
        ]
    rows = cost_rows(target, world.eval_prompts[: args.cost_prompts], entries, args.runs)
    for row in rows:
        emit("gflownet_scaled_cost", pair=pair, alpha=alpha, **row)
    fits = {
        prefix: (fit_tokens, fit_seconds) for prefix in ("twisted SMC(GFN)", "SIR(GFN)", "GFlowNet")
    }
    # The one-pass form costs its teacher's fit and its own distillation.
    fits["one-pass"] = (fit_tokens + onepass_tokens, fit_seconds + onepass_seconds)
    for row in break_even(rows, fits):
        emit("gflownet_scaled_break_even", pair=pair, alpha=alpha, **row)
        print(
            f"[{pair}, α={alpha:g}] effective samples per model token: {row['gflownet_sampler']} "
            f"÷ {row['baseline']} = {row['ess_per_token_ratio']:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--pairs", nargs="+", default=["iterate"], choices=PAIRS)
    parser.add_argument(
        "--steps", type=int, default=300, help="GFlowNet steps (its other settings: defaults)"
    )
    parser.add_argument(
        "--onepass-steps",
        type=int,
        default=1200,
        help="distillation steps of the one-pass form (1200; docs/scaled_world.md says why)",
    )
    parser.add_argument(
        "--onepass-samples-per-prompt",
        type=int,
        default=4,
        help="teacher draws per prompt in one distillation step (4)",
    )
    parser.add_argument(
        "--onepass-learning-rate",
        type=float,
        default=3e-3,
        help="peak learning rate of the distillation (the main job's 1e-2 suits 200 steps)",
    )
    parser.add_argument("--curve-points", type=int, default=4, help="measured chunks of the fit")
    parser.add_argument("--draws", type=int, default=32, help="draws per held-out prompt")
    parser.add_argument("--cost-prompts", type=int, default=8, help="prompts of the cost rows")
    parser.add_argument(
        "--particles",
        type=int,
        nargs="+",
        default=[16, 64],
        help="population sizes of the cost rows (SMC particles, SIR candidates, draws)",
    )
    parser.add_argument("--runs", type=int, default=4, help="runs per cost row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="the small test variant")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ScaledWorldConfig.small() if args.small else ScaledWorldConfig()
    world = build_world(config, cache_dir=args.cache_dir)
    for pair in args.pairs:
        run_pair(world, args.alpha, pair, args)


if __name__ == "__main__":
    main()
