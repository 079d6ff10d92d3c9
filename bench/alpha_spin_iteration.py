"""One α-SPIN iteration on the tiny world, broken down: sampler setup, generation, reference
scoring, training, evaluation.

The trainer is not changed: the functions it calls are wrapped with timers for the run, where
its modules look them up (``opponent_sampler``: building the sampler, and fitting it for "gflownet"; the sampler's
``sample``: generating y'; ``reference_logps``: log π̃_ref of y and y'; ``train_iterate``:
the SPIN loss epochs; the evaluator: exact KLs). Iteration 1 is the one timed (π_ref is then a
geometric mixture of π_0 and π_1, sampled by ``--sampler``); iteration 0 (π_ref = π_0, sampled
exactly) runs first, untimed.

    python -m bench.alpha_spin_iteration                    # SIR opponent (the default)
    python -m bench.alpha_spin_iteration --sampler gflownet
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

import selfplay.generation
import selfplay.trainer
from bench._timing import emit
from samplers.gflownet import GFlowNetConfig
from selfplay import AlphaSpinConfig, AlphaSpinTrainer

PHASES = ("sampler_setup", "generation", "reference_scoring", "training", "evaluation")


def timed(seconds: dict[str, float], phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - started

    return wrapper


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sampler", default="importance", help="opponent sampler (importance, smc, gflownet)"
    )
    parser.add_argument("--alpha", type=float, default=0.95, help="α (0.95)")
    parser.add_argument("--max-examples", type=int, default=512, help="SFT pairs used (512)")
    parser.add_argument("--gflownet-steps", type=int, default=200, help="GFlowNet fit steps")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        torch.set_num_threads(args.threads or 1)

    seconds: dict[str, float] = defaultdict(float)
    evaluator_calls = []
    # (module, name): the function the trainer's modules call, by the name they call it.
    originals = {
        (selfplay.trainer, "opponent_sampler"): selfplay.trainer.opponent_sampler,
        (selfplay.generation, "reference_logps"): selfplay.generation.reference_logps,
        (selfplay.trainer, "train_iterate"): selfplay.trainer.train_iterate,
    }
    build_sampler = selfplay.trainer.opponent_sampler

    def opponent_sampler(*a: Any, **k: Any) -> Any:
        sampler = timed(seconds, "sampler_setup", build_sampler)(*a, **k)
        sampler.sample = timed(seconds, "generation", sampler.sample)
        return sampler

    selfplay.trainer.opponent_sampler = opponent_sampler
    selfplay.generation.reference_logps = timed(
        seconds, "reference_scoring", selfplay.generation.reference_logps
    )
    selfplay.trainer.train_iterate = timed(seconds, "training", selfplay.trainer.train_iterate)
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            config = AlphaSpinConfig(
                output_dir=output_dir,
                alpha=args.alpha,
                sampler=args.sampler,
                gflownet=GFlowNetConfig(steps=args.gflownet_steps),
                max_examples=args.max_examples,
                iterations=1,
                device=args.device,
                progress=False,
            )
            trainer = AlphaSpinTrainer(config)
            evaluate = trainer.evaluate
            trainer.evaluate = timed(seconds, "evaluation", evaluate)
            evaluator_calls.append(evaluate)
            trainer.train()  # iteration 0: π_ref = π_0, exact sampling (warm-up, untimed)
            seconds.clear()
            trainer.config.iterations = 2
            started = time.perf_counter()
            trainer.train()  # iteration 1: π_ref ∝ π_0^(1-α) · M_h^α
            total = time.perf_counter() - started
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)

    other = total - sum(seconds[p] for p in PHASES)
    print(
        f"α-SPIN iteration 1 on the tiny world, α = {args.alpha}, sampler {args.sampler}, "
        f"{args.max_examples} examples, device {args.device}: {total:.2f} s"
    )
    for phase in (*PHASES, "other"):
        value = other if phase == "other" else seconds[phase]
        print(f"{phase:>18}: {value:7.2f} s  ({100 * value / total:4.1f}%)")
    emit(
        "alpha_spin_iteration",
        sampler=args.sampler,
        alpha=args.alpha,
        examples=args.max_examples,
        device=args.device,
        total_s=total,
        other_s=other,
        **{f"{p}_s": seconds[p] for p in PHASES},
    )
    return {"total": total, **seconds}


if __name__ == "__main__":
    main()
