"""Wall time of an α-SPIN iteration on the tiny world with a GFlowNet opponent (fitted cold,
or warm-started from the previous iteration's) and with the importance-sampling opponent, at
equal reference accuracy, as ratios against the importance-sampling one.

One α-SPIN run with the GFlowNet opponent (``--iterations`` GFlowNet iterations after the
exact iteration 0) gives the iterates and references. At each iteration t ≥ 1, on the same
reference and the first ``--eval-prompts`` fit prompts:

- accuracy: the exact TV between π_ref (enumerated and normalized) and the law of one draw of
  each opponent: the GFlowNet policy's (enumerated), and SIR's with K candidates from M_h
  (``gfn_spin.exact.sir_output_laws``, for every K of ``--candidates``);
- the GFlowNet fits: the run's own (cold, of ``--gflownet-steps`` steps, at t = 1;
  warm-started from iteration t−1 at t ≥ 2, with the config's ``gflownet_warm_steps`` and
  ``gflownet_warm_learning_rate``), and at t ≥ 2 a cold one for comparison and warm ones of
  each length in ``--warm-steps`` (at ``--warm-learning-rate``, default the run's);
- the importance sampler at the smallest K of ``--candidates`` whose TV is at most the
  GFlowNet's (the warm fit of the run when there is one, else the cold one);
- an opponent's cost: building (and fitting) it plus one draw for every example, in the run's
  generation chunks; an iteration's wall time is that plus the rest of the run's iteration
  (reference scoring, training, evaluation), which does not depend on the opponent.

    python -m bench.alpha_spin_iteration                       # the defaults
    python -m bench.alpha_spin_iteration --warm-steps 0,25,100   # and other warm fit lengths
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench._timing import emit
from gfn_spin.density import Density
from gfn_spin.exact import divergences, exact_distribution, response_alphabet, sir_output_laws
from samplers.base import Sampler
from samplers.gflownet import GFlowNetSampler
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.config import derive_seed
from selfplay.opponents import opponent_sampler as make_opponent
from selfplay.reference import history_mixture
from worlds.toy import build_world


def counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


class ReferenceLaw:
    """π_ref's exact law on a few prompts, and the TV of another law to it."""

    def __init__(self, reference: Density, prompts: Sequence[Sequence[int]], cap: int) -> None:
        self.prompts, self.cap = [list(p) for p in prompts], cap
        self.alphabet = response_alphabet(reference)
        self.exact = [self.law_of(reference, p) for p in self.prompts]

    def law_of(self, density: Density, prompt: list[int]) -> Any:
        return exact_distribution(density, prompt, self.cap, allowed_token_ids=self.alphabet)

    def tv(self, laws: Sequence[torch.Tensor]) -> float:
        """Mean over prompts of TV(π_ref, law)."""
        tvs = [divergences(p.logprobs, q)["tv"] for p, q in zip(self.exact, laws, strict=True)]
        return sum(tvs) / len(tvs)

    def density_tv(self, density: Density) -> float:
        laws = []
        for prompt, target in zip(self.prompts, self.exact, strict=True):
            law = self.law_of(density, prompt)
            if law.responses != target.responses:
                raise RuntimeError("enumeration orders differ; cannot align supports")
            laws.append(law.logprobs)
        return self.tv(laws)

    def sir_tvs(self, proposal: Density, ks: Sequence[int]) -> dict[int, float]:
        """TV of SIR's exact output law with K candidates from ``proposal``, for each K."""
        per_prompt = [
            sir_output_laws(
                self.law_of(proposal, prompt).logprobs, target.logprobs + target.log_z, ks
            )
            for prompt, target in zip(self.prompts, self.exact, strict=True)
        ]
        return {k: self.tv([laws[j].logprobs for laws in per_prompt]) for j, k in enumerate(ks)}


def draw_seconds(
    sampler: Sampler, prompts: Sequence[Sequence[int]], chunk: int, seed: int
) -> float:
    """Seconds to draw one response per prompt, in the run's generation chunks."""
    started = time.perf_counter()
    for start in range(0, len(prompts), chunk):
        sampler.sample(prompts[start : start + chunk], 1, generator=derive_seed(seed, start))
    return time.perf_counter() - started


def timed_fit(build: Callable[[], GFlowNetSampler], steps: int, prompts: list) -> tuple:
    started = time.perf_counter()
    sampler = build()
    sampler.fit(prompts, steps, progress=False)
    return sampler, time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.95, help="α (0.95)")
    parser.add_argument("--max-examples", type=int, default=512, help="SFT pairs used (512)")
    parser.add_argument("--iterations", type=int, default=2, help="GFlowNet iterations (2)")
    parser.add_argument("--gflownet-steps", type=int, default=None, help="cold fit steps")
    parser.add_argument(
        "--warm-steps", default="", help="extra warm fit lengths to measure, comma-separated"
    )
    parser.add_argument(
        "--warm-learning-rate",
        type=float,
        default=None,
        help="peak learning rate of the extra warm fits (default: the run's warm rate)",
    )
    parser.add_argument("--candidates", default="1,2,4,8,16,32,64,128", help="SIR K grid")
    parser.add_argument("--eval-prompts", type=int, default=16, help="prompts of the exact TV")
    parser.add_argument("--seed", type=int, default=0, help="run seed (0)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        torch.set_num_threads(args.threads or 1)

    gflownet = AlphaSpinConfig().gflownet
    if args.gflownet_steps is not None:
        gflownet = dataclasses.replace(gflownet, steps=args.gflownet_steps)
    built: list[dict[str, Any]] = []

    def timed_opponent(cfg: AlphaSpinConfig, reference: Density, iterates: Any, **k: Any) -> Any:
        started = time.perf_counter()
        sampler = make_opponent(cfg, reference, iterates, **k)
        if isinstance(sampler, GFlowNetSampler):
            entry = {
                "t": k["iteration"],
                "sampler": sampler,
                "fit_s": time.perf_counter() - started,
                "draw_s": 0.0,
                "reference": reference,
                "iterates": list(iterates),
                "warm_from": k.get("warm_start_from"),
            }
            built.append(entry)
            sample = sampler.sample

            def timed_sample(*a: Any, **kw: Any) -> Any:
                started = time.perf_counter()
                try:
                    return sample(*a, **kw)
                finally:
                    entry["draw_s"] += time.perf_counter() - started

            sampler.sample = timed_sample
        return sampler

    rows = []
    with tempfile.TemporaryDirectory() as output_dir:
        config = AlphaSpinConfig(
            output_dir=output_dir,
            alpha=args.alpha,
            sampler="gflownet",
            gflownet=gflownet,
            gflownet_warm_start=True,
            max_examples=args.max_examples,
            iterations=args.iterations + 1,
            seed=args.seed,
            device=args.device,
            progress=False,
        )
        trainer = AlphaSpinTrainer(
            config, world=build_world(device="cpu"), opponents=timed_opponent
        )
        records = trainer.train()
        seconds = {r["iteration"]: sum(r["seconds"].values()) for r in records}
        for entry in built:
            rows.append(measure(args, config, trainer, entry, seconds[entry["t"] + 1]))
    return rows


def measure(
    args: argparse.Namespace,
    config: AlphaSpinConfig,
    trainer: AlphaSpinTrainer,
    entry: dict[str, Any],
    iteration_s: float,
) -> dict[str, Any]:
    """One iteration's figures (printed and emitted)."""
    t, reference, iterates = entry["t"], entry["reference"], entry["iterates"]
    prompts = trainer.examples.prompt_ids
    cap, chunk = trainer.max_new_tokens, config.generation_chunk
    seed = derive_seed(config.seed, "generate", t)
    law = ReferenceLaw(reference, prompts[: args.eval_prompts], cap)
    run_sampler = entry["sampler"]
    # Scoring, training and evaluation: the same work whatever the opponent.
    rest_s = iteration_s - entry["fit_s"] - entry["draw_s"]
    # The opponent's cold settings (a warm-started sampler's config holds its warm rate).
    fit_config = dataclasses.replace(
        config.gflownet,
        max_new_tokens=cap,
        adapter_name=f"bench_cold_{t}",
        seed=run_sampler.config.seed,
    )
    warm = entry["warm_from"] is not None and config.gflownet_warm_start
    opponents = {}
    if warm:
        cold, cold_fit_s = timed_fit(
            lambda: GFlowNetSampler(reference, iterates[-1], fit_config), None, prompts
        )
        opponents["gflownet cold"] = (law.density_tv(cold.policy), cold_fit_s, cold)
        run_name = "gflownet warm (run)"
    else:
        run_name = "gflownet cold"
    opponents[run_name] = (law.density_tv(run_sampler.policy), entry["fit_s"], run_sampler)
    warm_rate = args.warm_learning_rate or config.gflownet_warm_learning_rate
    if warm:
        for steps in counts(args.warm_steps):

            def build(steps: int = steps) -> GFlowNetSampler:
                sampler = GFlowNetSampler(
                    reference, iterates[-1], fit_config, adapter_name=f"bench_warm_{t}_{steps}"
                )
                sampler.warm_start(entry["warm_from"], learning_rate=warm_rate)
                return sampler

            sampler, fit_s = timed_fit(build, steps, prompts)
            opponents[f"gflownet warm {steps}"] = (law.density_tv(sampler.policy), fit_s, sampler)
    accuracy = opponents[run_name][0]
    ks = counts(args.candidates)
    sir = law.sir_tvs(history_mixture(iterates, config.history), ks)
    matched = next((k for k in ks if sir[k] <= accuracy), ks[-1])
    importance_config = dataclasses.replace(config, sampler="importance", num_candidates=matched)
    started = time.perf_counter()
    importance = make_opponent(
        importance_config, reference, iterates, max_new_tokens=cap, iteration=t
    )
    importance_s = time.perf_counter() - started + draw_seconds(importance, prompts, chunk, seed)

    costs = {
        name: entry["fit_s"] + entry["draw_s"]
        if s is run_sampler
        else fit_s + draw_seconds(s, prompts, chunk, seed)
        for name, (_, fit_s, s) in opponents.items()
    }
    costs["importance"] = importance_s
    tvs = {name: tv for name, (tv, _, _) in opponents.items()} | {"importance": sir[matched]}
    reached = "" if sir[matched] <= accuracy else " (not reached: largest K)"
    print(
        f"iteration {t}: α = {config.alpha}, h = {config.history}, {len(prompts)} prompts, "
        f"TV on {len(law.prompts)} prompts; SIR K = {matched} matches TV {accuracy:.4f}{reached}"
    )
    print("  SIR TV by K: " + ", ".join(f"{k}: {sir[k]:.4f}" for k in ks))
    print(f"  {'opponent':>22} {'TV':>8} {'opponent s':>11} {'iteration s':>12} {'ratio':>7}")
    base = rest_s + importance_s
    for name in (*opponents, "importance"):
        total = rest_s + costs[name]
        print(
            f"  {name:>22} {tvs[name]:8.4f} {costs[name]:11.2f} {total:12.2f} {total / base:7.2f}"
        )
    row = {
        "iteration": t,
        "alpha": config.alpha,
        "history": config.history,
        "sir_candidates": matched,
        "sir_tv_by_k": sir,
        "tv": tvs,
        "opponent_s": costs,
        "rest_s": rest_s,
        "iteration_ratio_vs_importance": {n: (rest_s + c) / base for n, c in costs.items()},
    }
    emit("alpha_spin_iteration", **row)
    return row


if __name__ == "__main__":
    main()
