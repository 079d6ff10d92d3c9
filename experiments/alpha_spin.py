"""SPIN vs α-SPIN vs fictitious play on the tiny world, measured by exact KL.

    python -m experiments.alpha_spin --quick            # a smaller study for a first look
    python -m experiments.alpha_spin                    # the full study
    python -m experiments.alpha_spin --sampler smc      # α < 1 opponents from SMC instead of SIR

For whoever compares self-play variants: runs SPIN (α=1, h=1), α-SPIN (α ∈ {0.5, 0.8, 0.95} ×
h ∈ {1, 2}) and fictitious play (α=1, h=all), each over several seeds and iterations, with the
α-SPIN trainer (docs/alpha_spin.md). After every iteration it records the exact
KL(p_data ‖ π_t) on held-out prompts and the drift KL(π_t ‖ π_0); it writes a table
(results.md), a plot (kl.png), a log (run.log) and everything (results.json: study config,
per-run records, summary, package versions, git commit, via experiments.common) to
``--output-dir``. Each run lives in its own folder and resumes if the study is interrupted and
restarted.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from experiments.cli import parse_config, run_command
from experiments.common import (
    prepare_output_dir,
    setup_logging,
    write_results,
    write_text_atomic,
)
from gfn_spin.devices import resolve_device
from gfn_spin.options import option
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from worlds.toy import ToyWorldEvaluator, build_world

VARIANTS_FULL = [
    ("SPIN", 1.0, 1),
    ("α-SPIN", 0.5, 1),
    ("α-SPIN", 0.5, 2),
    ("α-SPIN", 0.8, 1),
    ("α-SPIN", 0.8, 2),
    ("α-SPIN", 0.95, 1),
    ("α-SPIN", 0.95, 2),
    ("FP", 1.0, "all"),
]
VARIANTS_QUICK = [("SPIN", 1.0, 1), ("α-SPIN", 0.5, 1), ("α-SPIN", 0.95, 2), ("FP", 1.0, "all")]


@dataclass
class StudyConfig:
    """Settings of the study (trainer settings not listed here keep AlphaSpinConfig's defaults)."""

    output_dir: str = option(
        "runs/alpha_spin_study", "Where results.json, results.md, kl.png and one folder per run go."
    )
    quick: bool = option(
        False, "A smaller study (4 variants, 2 seeds, 2 iterations, 192 examples) for a first look."
    )
    seeds: int = option(3, "Seeds per variant (seed, seed+1, ..., seed+seeds-1).")
    seed: int = option(
        0, "First seed of every variant's runs (adapter init, generation, batch order)."
    )
    device: str = option(
        "cpu", 'Device of every run: "cpu", "cuda", "cuda:1", ... or "auto" (CUDA when present).'
    )
    iterations: int = option(3, "Self-play iterations per run.")
    sampler: Literal["auto", "importance", "smc", "gflownet", "ancestral"] = option(
        "importance",
        """Opponent sampler when α < 1: "importance" (SIR from M_h with num_candidates),
            "smc", "gflownet", "ancestral" or "auto" (chosen at each iteration from a pilot,
            selfplay.AlphaSpinConfig.auto_accuracy); α = 1 is always sampled exactly.""",
    )
    num_candidates: int = option(16, "K of the importance sampler.")
    num_particles: int = option(16, "N of the SMC sampler.")
    beta: float = option(2.0, "β of the SPIN loss.")
    learning_rate: float = option(1e-3, "AdamW learning rate of the iterates' LoRA adapters.")
    epochs: int = option(2, "Epochs per iteration.")
    max_examples: int | None = option(
        None, "Real examples per iteration (None: all the world's SFT examples)."
    )
    drift_prompts: int = option(
        4, "Eval prompts on which the exact drift KL(π_t ‖ π_0) is computed (the costly one)."
    )
    workers: int = option(2, "Runs executed in parallel (one CPU thread each).")
    progress: bool = option(True, "Show a progress bar over the runs.")

    def validate(self) -> None:
        """Raise on bad values before any model work (trainer settings: AlphaSpinConfig's checks)."""
        for name in ("seeds", "iterations", "workers", "drift_prompts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        resolve_device(self.device, "device")  # "auto", or a device this machine has


# Settings of ``--quick`` (each one still at its default takes this value); the variants shrink
# to VARIANTS_QUICK. Set after the class rather than as a ClassVar in its body: the study's
# spawned workers re-run this module as ``__mp_main__``, where dataclasses cannot resolve a
# string ``ClassVar`` annotation and would take the dict for a mutable field default.
StudyConfig.QUICK = {
    "seeds": 2,
    "iterations": 2,
    "max_examples": 192,
    "num_candidates": 8,
    "num_particles": 8,
    "drift_prompts": 2,
}


def variants(study: StudyConfig) -> list[tuple[str, float, int | str]]:
    return VARIANTS_QUICK if study.quick else VARIANTS_FULL


def label(name: str, alpha: float, history: int | str) -> str:
    return f"{name} α={alpha:g} h={history}"


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (variant, seed) run in a worker: train, evaluate exactly, return its records."""
    torch.set_num_threads(1)
    world = build_world()
    evaluator = ToyWorldEvaluator(world, drift_prompts=job.pop("drift_prompts"))
    config = AlphaSpinConfig(progress=False, **job["config"])
    started = time.perf_counter()
    records = AlphaSpinTrainer(config, world=world, evaluate=evaluator).train()
    return {**job, "records": records, "seconds": time.perf_counter() - started}


def jobs(study: StudyConfig, root: Path) -> list[dict[str, Any]]:
    out = []
    for name, alpha, history in variants(study):
        for seed in range(study.seed, study.seed + study.seeds):
            folder = root / "runs" / f"a{alpha:g}_h{history}_s{seed}"
            out.append(
                {
                    "variant": label(name, alpha, history),
                    "seed": seed,
                    "drift_prompts": study.drift_prompts,
                    "config": {
                        "alpha": alpha,
                        "history": history,
                        "sampler": study.sampler,
                        "num_candidates": study.num_candidates,
                        "num_particles": study.num_particles,
                        "beta": study.beta,
                        "learning_rate": study.learning_rate,
                        "epochs": study.epochs,
                        "iterations": study.iterations,
                        "max_examples": study.max_examples,
                        "seed": seed,
                        "device": None if study.device == "auto" else study.device,
                        "output_dir": str(folder),
                    },
                }
            )
    return out


def run_jobs(
    run: Callable[[dict[str, Any]], dict[str, Any]],
    todo: list[dict[str, Any]],
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """``run(job)`` for every (variant, seed) job, on ``workers`` spawned processes when more
    than one (one CPU thread each), with a progress bar; the results in ``todo``'s order."""
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(
                tqdm(
                    pool.imap_unordered(run, todo),
                    total=len(todo),
                    desc="runs",
                    disable=not progress,
                )
            )
    else:
        results = [run(job) for job in tqdm(todo, desc="runs", disable=not progress)]
    order = {(j["variant"], j["seed"]): i for i, j in enumerate(todo)}
    return sorted(results, key=lambda r: order[(r["variant"], r["seed"])])


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results: list[dict[str, Any]], iterations: int) -> dict[str, Any]:
    """Per variant and iteration: mean and std over seeds of kl_data and kl_drift."""
    summary: dict[str, Any] = {}
    for result in results:
        summary.setdefault(result["variant"], []).append(result["records"])
    table = {}
    for variant, runs in summary.items():
        rows = []
        for t in range(iterations + 1):
            row = {"iteration": t}
            for key in ("kl_data", "kl_drift"):
                values = [run[t]["metrics"][key] for run in runs]
                row[key], row[key + "_std"] = mean_std(values)
            # The change from the base, per seed (paired: all seeds share π_0).
            deltas = [run[t]["metrics"]["kl_data"] - run[0]["metrics"]["kl_data"] for run in runs]
            row["kl_data_change"], row["kl_data_change_std"] = mean_std(deltas)
            rows.append(row)
        table[variant] = rows
    return table


def markdown(table: dict[str, Any], study: StudyConfig) -> str:
    lines = [
        f"Exact KL(p_data‖π_t) and drift KL(π_t‖π_0) on the tiny world, mean ± std over "
        f"{study.seeds} seeds; α < 1 opponents: sampler={study.sampler}"
        + f"; α = 1 and t = 0 sampled exactly; drift on {study.drift_prompts} prompts.",
        "",
        "| variant | "
        + " | ".join(f"KL data t={t}" for t in range(study.iterations + 1))
        + f" | Δ KL data t={study.iterations} | drift t={study.iterations} |",
        "|---" * (study.iterations + 4) + "|",
    ]
    for variant, rows in table.items():
        cells = [f"{r['kl_data']:.3f} ± {r['kl_data_std']:.3f}" for r in rows]
        last = rows[-1]
        cells.append(f"{last['kl_data_change']:+.3f} ± {last['kl_data_change_std']:.3f}")
        cells.append(f"{last['kl_drift']:.3f} ± {last['kl_drift_std']:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, rows in table.items():
        ts = [r["iteration"] for r in rows]
        for axis, key in zip(axes, ("kl_data", "kl_drift"), strict=True):
            axis.errorbar(
                ts,
                [r[key] for r in rows],
                yerr=[r[key + "_std"] for r in rows],
                marker="o",
                capsize=3,
                label=variant,
            )
    axes[0].set(xlabel="iteration t", ylabel="KL(p_data ‖ π_t)", title="distance to the data")
    axes[1].set(xlabel="iteration t", ylabel="KL(π_t ‖ π_0)", title="drift from the base")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    study = parse_config(StudyConfig, argv, description=(__doc__ or "").split("\n\n")[0])
    study.validate()

    todo = jobs(study, Path(study.output_dir).expanduser())
    for job in todo:
        AlphaSpinConfig(**job["config"])  # every run's settings checked before any work
    root = prepare_output_dir(study.output_dir)
    log = setup_logging(root, "experiments.alpha_spin")
    build_world()  # once here, so that workers load it from the cache
    started = time.perf_counter()
    log.info(f"{len(todo)} runs on {study.workers} workers -> {root}")
    results = run_jobs(run_one, todo, study.workers, study.progress)
    table = summarize(results, study.iterations)
    output = {"summary": table, "runs": results, "seconds": time.perf_counter() - started}
    write_study(output, markdown(table, study), root, study, "kl.png", plot, log)
    return output


def write_study(
    output: dict[str, Any],
    text: str,
    root: Path,
    study: Any,
    figure: str,
    draw: Callable[[dict[str, Any], Path], None],
    log: Any,
) -> None:
    """A study's outputs in ``root``: results.json (``output`` with the study's config), the
    table ``text`` as results.md (also printed), and ``draw(output["summary"], root / figure)``."""
    write_results(output, root, study)
    write_text_atomic(text, root / "results.md")
    draw(output["summary"], root / figure)
    print(text)
    log.info(f"wrote {root / 'results.json'}, results.md, {figure} in {output['seconds']:.0f} s")


if __name__ == "__main__":
    run_command(main)
