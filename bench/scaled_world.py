"""Exact log Z against SMC estimates on the scaled world (256 symbols, cap 32), held-out prompts.

The scaled world's policies read the last two tokens only, so the geometric mixture's
normalizer is exact there (a dynamic program, ``worlds.bounded_context``). This script measures how
far SMC's ``log Ẑ`` (local-product proposal, adaptive resampling) lands from it: per particle
count, the mean ``|Δlog Z|`` over prompts and runs, the bias, the spread over runs (std, mean
over prompts), model tokens per run and wall time, with ratios against the exact program's
cost. It also reports the exact ESS/N and KL(q‖p) of the local product (the proposal SMC
extends), and the largest gap between a policy's teacher-forced law and its context tables.

    python -m bench.scaled_world                                  # α = 0.5, both pairs
    python -m bench.scaled_world --small --runs 4                 # the 5-symbol test world
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench._timing import emit
from gfn_spin.mixtures import LocalProduct
from samplers import SMCSampler
from worlds.bounded_context import BoundedContextTarget, ContextTables, check_bounded_context
from worlds.scaled import CONTEXT, PAIRS, ScaledWorldConfig, build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts used")
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--runs", type=int, default=8, help="independent SMC runs per N")
    parser.add_argument("--small", action="store_true", help="the small test variant")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = ScaledWorldConfig.small() if args.small else ScaledWorldConfig()
    started = time.perf_counter()
    world = build_world(config, cache_dir=args.cache_dir)
    emit(
        "scaled_world_build",
        num_symbols=config.num_symbols,
        max_new_tokens=config.max_new_tokens,
        vocab_size=len(world.tokenizer),
        build_seconds=world.build_seconds,
        load_seconds=time.perf_counter() - started,
        kl_data_base=world.kl_from_data("base"),
        kl_data_iterate=world.kl_from_data("iterate"),
        kl_data_stress=world.kl_from_data("stress"),
    )
    prompts = world.eval_prompts[: args.prompts]

    for pair in args.pairs:
        mixture = world.mixture(args.alpha, pair)
        started = time.perf_counter()  # from the models: both policies' tables, then the program
        tables = [
            ContextTables.from_density(policy, world.symbol_ids, CONTEXT)
            for policy in mixture.components
        ]
        target = BoundedContextTarget(
            tables[0].combine(tables[1:], mixture.weights), world.max_new_tokens
        )
        log_z = target.log_z(prompts)
        exact_seconds = time.perf_counter() - started
        local = ContextTables.from_density(
            LocalProduct(mixture.components, mixture.weights), world.symbol_ids, CONTEXT
        )
        draws = target.sample(prompts, 4, generator=0)
        rows = [prompts[i] for i in draws.prompt_index.tolist()]
        gap = max(
            check_bounded_context(
                getattr(world, name),
                world.policy_tables(name),
                rows,
                draws.response_ids,
                draws.lengths,
            )
            for name in ("base", pair)
        )
        emit(
            "scaled_world_exact",
            pair=pair,
            alpha=args.alpha,
            prompts=len(prompts),
            log_z_mean=float(log_z.mean()),
            local_product_ess=float(target.proposal_ess(local, prompts).mean()),
            local_product_kl_qp=float(target.kl_from(local, prompts).mean()),
            bounded_context_gap=gap,
            exact_seconds=exact_seconds,
        )
        for particles in args.particles:
            sampler = SMCSampler(mixture, particles, max_new_tokens=world.max_new_tokens)
            errors, seconds, tokens = [], [], []
            for run in range(args.runs):
                before = time.perf_counter()
                out = sampler.sample(prompts, 1, generator=1000 * particles + run)
                seconds.append(time.perf_counter() - before)
                tokens.append(out.stats["tokens"])
                errors.append(torch.as_tensor(out.stats["log_z"]).double().cpu() - log_z)
            delta = torch.stack(errors)  # [runs, prompts]
            spread = float(delta.std(0).mean()) if args.runs > 1 else float("nan")
            run_seconds = statistics.median(seconds)
            emit(
                "scaled_world_smc_log_z",
                pair=pair,
                alpha=args.alpha,
                num_particles=particles,
                runs=args.runs,
                mean_abs_delta=float(delta.abs().mean()),
                bias=float(delta.mean()),
                spread=spread,
                max_abs_delta=float(delta.abs().max()),
                tokens_per_run=statistics.median(tokens),
                seconds_per_run=run_seconds,
                smc_to_exact_seconds=run_seconds / exact_seconds,
            )


if __name__ == "__main__":
    main()
