"""Model tokens per effective sample, and error, of SIR, SMC and the GFlowNet samplers (tiny worlds).

Target: ``G ∝ π_base^(1-α) π_shifted^α`` on two tiny worlds in one run: the symbol-shift stress
world (``build_world()``, policies that barely overlap) and the overlapping world
(``shift_rule="style", sft_examples=8192``). On each world's held-out prompts, samplers:

- SIR (K candidates) and SMC (N particles) from the local product, the baselines;
- the GFlowNet itself (``GFlowNetSampler`` from ``GFlowNetConfig`` defaults, with
  ``--parametrization``, fitted on the measured prompts, as SIR and SMC run on them
  (``--fit-prompts train``: on the world's train prompts, amortized); the fit is a one-time
  cost, reported apart);
- SIR with the GFlowNet's policy as proposal;
- GFlowNet-twisted SMC (the policy as proposal, its prefix flow as the look-ahead potential).

Columns, per sampler (means over prompts):

- ``tok/draw``: model tokens evaluated per output draw (every forward token of every distinct
  policy; the GFlowNet's own draws: its sampling passes only);
- ``ESS/draw`` and ``tok/ESS``. ESS is each sampler's own and they are not the same quantity:
  for SIR/SMC it is the ESS of the weighted population behind each draw (K candidates, N
  particles; an SMC population's final ESS ignores the diversity lost to resampling), though
  only one draw comes out of it; for the GFlowNet it is ESS/N of the weights G̃/q over its draws
  of a prompt (its draws are used unweighted; the weights are scored outside the token count,
  only to measure q);
- ``TV``: the exact total variation between the law of one output draw and the target, where
  that law is known: the GFlowNet's density, and SIR's output law ``p_K`` (computed from the
  enumerated proposal and target by :func:`gfn_spin.exact.sir_output_laws`); SMC has none;
- ``|Δlog Z|``: ``|log Ẑ − log Z|`` against the enumerated normalizer, Ẑ from all of the
  run's draws of the prompt (for the GFlowNet itself, the importance estimate from its draws,
  which measures q, not its unweighted draws). Its noise is of the order of the spread of
  ``log Ẑ`` between settings that should agree (a few 1e-3 on these worlds).

Matching rules of the printed ratios ("best GFlowNet-based ÷ best of SIR and SMC from the local
product", at equal or lower error). Each GFlowNet-based sampler is matched with the cheapest
local-product setting that is at least as exact on the same error (what a user pays for that
accuracy without a GFlowNet); when no setting is as exact, with the most exact one (the
GFlowNet-based sampler is then more exact too, said on the line). The printed ratio is the
lowest over the GFlowNet-based samplers:

1. exact TV of a draw, cost per output draw: the GFlowNet's own draws and SIR with it as
   proposal against SIR from the local product (each draw an independent draw of a known law,
   so a draw is one sample at that TV). SIR from the local product is matched on a dense K grid
   (``CURVE_KS``: exact laws need no sampling; cost K × the measured tokens per candidate), so
   the ratio does not profit from the gaps between the sampled K;
2. ``|Δlog Z|``, cost per effective sample (population ESS): SIR with the GFlowNet's proposal
   and twisted SMC against SIR and SMC from the local product;
3. the same with cost per output draw.

    python -m bench.cost_per_sample                  # CPU, α = 0.5, both worlds, ~5 minutes
    python -m bench.cost_per_sample --parametrization lora --gfn-steps 300 --worlds stress

Why one module: a benchmark is one runnable script (set-up, the samplers at their budgets,
the table); most of its length is the column definitions above.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from bench._timing import emit
from experiments.geometric_mixture import GeometricMixtureConfig
from gfn_spin.exact import divergences, exact_distribution, sir_output_laws
from gfn_spin.mixtures import GeometricMixture
from samplers import ImportanceResampler, SMCSampler
from samplers.gflownet import PARAMETRIZATIONS, GFlowNetConfig, GFlowNetSampler
from samplers.weighting import model_tokens
from worlds.toy import ToyWorld, ToyWorldConfig, build_world

#: K of SIR from the local product whose exact law is computed for the TV matching rule.
CURVE_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WORLDS = {
    "stress": ToyWorldConfig(),
    "overlap": ToyWorldConfig(shift_rule="style", sft_examples=8192),
}


@dataclass
class Row:
    """One sampler's figures on one world (means over the prompts)."""

    name: str
    family: str  # "local" (baseline from the local product) or "gflownet"
    tokens_per_draw: float
    ess_per_draw: float
    log_z_error: float
    tv: float | None
    weighted: bool  # its draws come out of weighted populations (SIR, SMC): it has a Ẑ
    seconds: float

    @property
    def tokens_per_ess(self) -> float:
        return self.tokens_per_draw / self.ess_per_draw if self.ess_per_draw > 0 else math.inf


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _tv(target_law, law: torch.Tensor) -> float:
    return divergences(target_law.logprobs, law)["tv"]


def _mean_tv(target_laws, laws) -> float:
    """Mean over prompts of the exact TV between the target's and another enumerated law."""
    pairs = list(zip(target_laws, laws, strict=True))
    return sum(_tv(e, q.logprobs) for e, q in pairs) / len(pairs)


def run_world(name: str, world: ToyWorld, args: argparse.Namespace) -> list[Row]:
    """Fit the GFlowNet on ``world`` and measure every sampler on its held-out prompts (held out
    from the policies' training; the GFlowNet's fit sees them unless ``--fit-prompts train``)."""
    target = GeometricMixture([world.base, world.shifted], [1 - args.alpha, args.alpha])
    prompts = world.eval_prompts[: args.prompts]
    fit_prompts = prompts if args.fit_prompts == "eval" else world.train_prompts
    cap, draws = world.max_new_tokens, args.draws
    exact = [exact_distribution(target, p, cap) for p in prompts]
    log_z = torch.tensor([e.log_z for e in exact], dtype=torch.float64)
    local_laws = [exact_distribution(target.local_product(), p, cap) for p in prompts]
    assert all(q.responses == e.responses for q, e in zip(local_laws, exact, strict=True))

    config = GFlowNetConfig(
        max_new_tokens=cap,
        parametrization=args.parametrization,
        seed=args.seed,
        adapter_name=f"bench_cost_{name}",
    )
    started = time.perf_counter()
    gfn = GFlowNetSampler(target, world.shifted, config)
    before = model_tokens(target, gfn.policy)
    steps = gfn.config.steps if args.gfn_steps < 0 else args.gfn_steps
    gfn.fit(fit_prompts, steps, progress=False)
    fit_tokens = model_tokens(target, gfn.policy) - before
    fit_seconds = time.perf_counter() - started
    print(
        f"[{name}] GFlowNet fit ({gfn.parametrization}): {steps} steps, {fit_tokens:,} model "
        f"tokens, {fit_seconds:.1f} s",
        flush=True,
    )
    with torch.no_grad():
        gfn_laws = [exact_distribution(gfn.policy, p, cap) for p in prompts]
    assert all(q.responses == e.responses for q, e in zip(gfn_laws, exact, strict=True))
    # Exact TV of one output draw: the GFlowNet's own law, and SIR's p_K from each proposal.
    tv = {"GFlowNet": _mean_tv(exact, gfn_laws)}
    onepass = None
    if args.onepass_steps > 0:
        # The one-pass form (LoRA on π_t, one model pass per token), distilled from the fit.
        # The main job's recipe for the one-pass form.
        recipe = GeometricMixtureConfig(seed=args.seed).onepass_config(args.alpha, cap)
        onepass = GFlowNetSampler(
            target, world.shifted, recipe, adapter_name=f"bench_cost_onepass_{name}"
        )
        started = time.perf_counter()
        onepass.fit(fit_prompts, args.onepass_steps, progress=False, teacher=gfn.policy)
        print(
            f"[{name}] one-pass form distilled: {args.onepass_steps} steps, "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        with torch.no_grad():
            tv["GFlowNet one-pass"] = _mean_tv(
                exact, [exact_distribution(onepass.policy, p, cap) for p in prompts]
            )
    # SIR from the local product also on a dense K grid (exact laws cost no model tokens): the
    # TV rule matches against the smallest K that is as exact, not the next K sampled.
    sir_ks = sorted(set(_counts(args.sir)) | set(CURVE_KS))
    for prefix, proposals, ks in (
        ("SIR q_loc", local_laws, sir_ks),
        ("SIR GFN", gfn_laws, _counts(args.gfn_sir)),
    ):
        total = dict.fromkeys(ks, 0.0)
        for e, q in zip(exact, proposals, strict=True):
            laws = sir_output_laws(q.logprobs, e.logprobs, ks, rtol=1e-6)
            for k, law in zip(ks, laws, strict=True):
                total[k] += _tv(e, law.logprobs) / len(prompts)
        tv.update({f"{prefix} K={k}": value for k, value in total.items()})

    entries = [
        (f"SIR q_loc K={k}", "local", ImportanceResampler(target, None, k, max_new_tokens=cap))
        for k in _counts(args.sir)
    ]
    entries += [
        (f"SMC q_loc N={n}", "local", SMCSampler(target, n, max_new_tokens=cap))
        for n in _counts(args.smc)
    ]
    entries.append(("GFlowNet", "gflownet", gfn))
    if onepass is not None:
        entries.append(("GFlowNet one-pass", "gflownet", onepass))
    entries += [
        (
            f"SIR GFN K={k}",
            "gflownet",
            ImportanceResampler(target, gfn.policy, k, max_new_tokens=cap),
        )
        for k in _counts(args.gfn_sir)
    ]
    entries += [
        (
            f"twisted SMC N={n}",
            "gflownet",
            SMCSampler(target, n, proposal=gfn.policy, twist="flow", max_new_tokens=cap),
        )
        for n in _counts(args.twisted_smc)
    ]

    rows = []
    for label, family, sampler in entries:
        before = model_tokens(target, gfn.policy)
        start = time.perf_counter()
        samples = sampler.sample(prompts, draws, generator=args.seed)
        seconds = time.perf_counter() - start
        ess = torch.as_tensor(samples.stats["ess"], dtype=torch.float64)
        if sampler is gfn or sampler is onepass:
            tokens = samples.stats["tokens"]  # its sampling passes, not the evaluation scoring
        else:
            tokens = model_tokens(target, gfn.policy) - before
            # SIR/SMC: the mean ESS of one draw's own candidates or population, per draw.
            ess = ess * draws
        estimate = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64)
        rows.append(
            Row(
                name=label,
                family=family,
                tokens_per_draw=tokens / (len(prompts) * draws),
                ess_per_draw=float(ess.sum()) / (len(prompts) * draws),
                log_z_error=float((estimate - log_z).abs().mean()),
                tv=tv.get(label),
                weighted=sampler is not gfn,
                seconds=seconds,
            )
        )
    local_tv = _mean_tv(exact, local_laws)
    # Tokens per SIR candidate from the local product (linear in K: measured on the sampled K).
    sampled = [(r, k) for k in _counts(args.sir) for r in rows if r.name == f"SIR q_loc K={k}"]
    per_candidate = sum(r.tokens_per_draw / k for r, k in sampled) / max(1, len(sampled))
    curve = [
        Row(
            name=f"SIR q_loc K={k} (exact law)",
            family="local",
            tokens_per_draw=k * per_candidate,
            ess_per_draw=math.nan,
            log_z_error=math.nan,
            tv=tv[f"SIR q_loc K={k}"],
            weighted=False,
            seconds=math.nan,
        )
        for k in CURVE_KS
    ]
    _print_world(name, world, rows, curve, local_tv, args)
    for row in rows:
        emit(
            "cost_per_sample",
            world=name,
            sampler=row.name,
            alpha=args.alpha,
            tokens_per_draw=row.tokens_per_draw,
            tokens_per_ess=row.tokens_per_ess,
            ess_per_draw=row.ess_per_draw,
            log_z_error=row.log_z_error,
            tv=row.tv,
            seconds=row.seconds,
        )
    emit(
        "cost_per_sample_gflownet_fit",
        world=name,
        parametrization=gfn.parametrization,
        steps=steps,
        tokens=fit_tokens,
        seconds=fit_seconds,
        local_product_tv=local_tv,
    )
    return rows


def matched(rows: list[Row], error: str, cost: str) -> list[tuple[Row, Row, float, bool]]:
    """GFlowNet-based rows with their matched baselines and cost ratios (module docstring).

    ``error``: "tv" (rows with an exact law) or "log_z_error" (weighted rows); ``cost``:
    "tokens_per_ess" or "tokens_per_draw". Returns (row, baseline, row cost ÷ baseline cost,
    bound) sorted by ratio; ``bound`` is True when no baseline is as exact as the row (the
    baseline is then the most exact one, and the row is also more exact than it).
    """

    def has(row: Row) -> bool:
        return getattr(row, error) is not None and (error == "tv" or row.weighted)

    local = [r for r in rows if r.family == "local" and has(r)]
    out = []
    for row in rows:
        if row.family != "gflownet" or not has(row) or not local:
            continue
        as_exact = [b for b in local if getattr(b, error) <= getattr(row, error)]
        if as_exact:
            baseline, bound = min(as_exact, key=lambda b: getattr(b, cost)), False
        else:
            baseline, bound = min(local, key=lambda b: getattr(b, error)), True
        out.append((row, baseline, getattr(row, cost) / getattr(baseline, cost), bound))
    return sorted(out, key=lambda item: item[2])


def _print_world(
    name: str,
    world: ToyWorld,
    rows: list[Row],
    curve: list[Row],
    local_tv: float,
    args: argparse.Namespace,
) -> None:
    print(
        f"\n[{name}] α = {args.alpha}, {args.prompts} held-out prompts x {args.draws} draws, "
        f"L = {world.max_new_tokens}; local product exact TV {local_tv:.4f}"
    )
    print(
        f"{'sampler':>18} {'tok/draw':>9} {'ESS/draw':>9} {'tok/ESS':>9} {'|Δlog Z|':>9} "
        f"{'TV':>7} {'s':>6}"
    )
    for r in rows:
        tv = f"{r.tv:7.4f}" if r.tv is not None else f"{'-':>7}"
        print(
            f"{r.name:>18} {r.tokens_per_draw:9.1f} {r.ess_per_draw:9.2f} "
            f"{r.tokens_per_ess:9.1f} {r.log_z_error:9.4f} {tv} {r.seconds:6.1f}"
        )
    for error, cost, label in (
        ("tv", "tokens_per_draw", "exact TV, tokens per draw"),
        ("log_z_error", "tokens_per_ess", "|Δlog Z|, tokens per effective sample (population)"),
        ("log_z_error", "tokens_per_draw", "|Δlog Z|, tokens per draw"),
    ):
        pairs = matched(rows + curve if error == "tv" else rows, error, cost)
        if not pairs:
            continue
        row, baseline, ratio, bound = pairs[0]
        note = ", more exact than every baseline" if bound else ""
        print(
            f"[{name}] {label}: best GFlowNet-based ÷ matched local-product = {row.name} "
            f"{getattr(row, cost):.1f} ÷ {baseline.name} {getattr(baseline, cost):.1f} = "
            f"{ratio:.3f} ({1 / ratio:.2f}x fewer; {error} {getattr(row, error):.4f} vs "
            f"{getattr(baseline, error):.4f}{note})"
        )
        emit(
            "cost_per_sample_ratio",
            world=name,
            error=error,
            cost=cost,
            sampler=row.name,
            baseline=baseline.name,
            ratio=ratio,
            more_exact_than_every_baseline=bound,
        )


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5, help="target weight α (0.5)")
    parser.add_argument(
        "--worlds", default="stress,overlap", help=f"comma-separated, of {sorted(WORLDS)}"
    )
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per world (8)")
    parser.add_argument("--draws", type=int, default=64, help="draws per prompt (64)")
    parser.add_argument(
        "--sir", default="1,4,16,64", help="SIR K from the local product (K = 1: q_loc itself)"
    )
    parser.add_argument("--smc", default="4,16,64", help="SMC N from the local product")
    parser.add_argument("--gfn-sir", default="4,16", help="SIR K with the GFlowNet proposal")
    parser.add_argument("--twisted-smc", default="4,16", help="twisted SMC N (GFlowNet)")
    parser.add_argument(
        "--parametrization",
        default="auto",
        choices=["auto", *PARAMETRIZATIONS],
        help="GFlowNetConfig.parametrization (auto); every other setting is the config default",
    )
    parser.add_argument(
        "--fit-prompts",
        default="eval",
        choices=("eval", "train"),
        help="prompts the GFlowNet and its one-pass form are fit on: eval (the measured prompts, "
        "as SIR and SMC run on them; the main job's default) or train (amortized, measured on "
        "prompts the fit never saw)",
    )
    parser.add_argument(
        "--gfn-steps",
        type=int,
        default=500,
        help="fit steps (500: keeps the two worlds within ~5 minutes on one thread); "
        "-1 uses GFlowNetConfig.steps",
    )
    parser.add_argument(
        "--onepass-steps",
        type=int,
        default=GeometricMixtureConfig.onepass_steps,
        help="steps distilling the GFlowNet into its one-pass LoRA form (the main job's; 0: "
        "skip it)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    names = [w for w in args.worlds.split(",") if w]
    unknown = sorted(set(names) - set(WORLDS))
    if unknown:
        parser.error(f"--worlds: unknown {unknown}; choose from {sorted(WORLDS)}")
    if args.device == "cpu" or args.threads is not None:
        torch.set_num_threads(args.threads or 1)  # tiny models: 1 thread is fastest here

    started = time.perf_counter()
    results = {}
    for name in names:
        world_start = time.perf_counter()
        world = build_world(WORLDS[name], device=args.device)
        print(f"[{name}] world ready in {time.perf_counter() - world_start:.1f} s", flush=True)
        results[name] = run_world(name, world, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
