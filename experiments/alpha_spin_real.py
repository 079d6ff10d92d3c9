"""SPIN vs α-SPIN vs fictitious play on a real model (SmolLM2-135M-Instruct), scored by its task.

    python -m experiments.alpha_spin_real --quick                  # CPU, a first look
    python -m experiments.alpha_spin_real --device cuda            # the full study, for a GPU
    python -m experiments.alpha_spin_real --quick --sampler smc    # α < 1 opponents from SMC

For whoever wants to know whether self-play variants differ on a real pretrained model, where
nothing can be enumerated. Runs SPIN (α=1, h=1), α-SPIN (α=0.95, h=2) and fictitious play
(α=1, h=all) with the α-SPIN trainer over several seeds, from the real-model world's base
(:mod:`worlds.smollm`: its GGUF converted once) on the world's built-in instruction set
(additions and first letters, each with one checkable answer). Before and after every
iteration it scores the iterate on the held-out tasks (mean score of its draws at temperature 1,
with the standard error over tasks) and records the opponent's ESS/N and log Ẑ, and, for α < 1,
its KL to π_ref from the opponent probe (``selfplay.probe``: an estimate for a sampler with a
density, an upper bound for SIR and SMC, on the first ``--probe-prompts`` training tasks); it writes
results.md, score.png, run.log and results.json (study config, per-run records, summary,
versions) to ``--output-dir``. Each run lives in its own folder and resumes when the study is
restarted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from experiments.alpha_spin import label, mean_std, run_jobs, write_study
from experiments.cli import parse_config
from experiments.common import prepare_output_dir, setup_logging
from experiments.real_model import real_model_gflownet
from gfn_spin.devices import resolve_device
from gfn_spin.options import option
from gfn_spin.policy import Policy
from samplers.gflownet.config import RUN_DERIVED_FIELDS
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from worlds.smollm import SmolWorldConfig, TaskScorer, converted_folder, task_pairs, task_split

VARIANTS = [("SPIN", 1.0, 1), ("α-SPIN", 0.95, 2), ("FP", 1.0, "all")]


@dataclass
class StudyConfig:
    """Settings of the study (trainer settings not listed keep AlphaSpinConfig's defaults)."""

    output_dir: str = option(
        "runs/alpha_spin_real",
        "Where results.json, results.md, score.png and one folder per run go.",
    )
    quick: bool = option(
        False,
        """A CPU-sized study: 8 training tasks (one optimizer step of 8 pairs per epoch), 8
            held-out tasks × 4 draws, L = 8, K = N = 4, 8 GFlowNet steps, the opponent probe on 2
            tasks with 16 reference particles.""",
    )
    seeds: int = option(3, "Seeds per variant (seed, ..., seed+seeds-1).")
    seed: int = option(0, "First seed of every variant's runs.")
    iterations: int = option(3, "Self-play iterations per run.")
    device: str = option("cpu", '"cpu", "cuda", ... or "auto" (CUDA when present).')
    sampler: Literal["auto", "importance", "smc", "gflownet", "ancestral"] = option(
        "auto",
        """Opponent sampler when α < 1: "importance" (auto), "smc", "gflownet" or
            "ancestral" (α = 1 is always sampled exactly).""",
    )
    num_candidates: int = option(8, "K of the importance sampler.")
    num_particles: int = option(8, "N of the SMC sampler.")
    gflownet_steps: int = option(
        20,
        """Steps of the GFlowNet opponent's cold fit (a quarter of them warmup; a warm-started
            fit takes a quarter), in batches of 4 prompts × 4 responses with 4 stored batches for
            the twist head.""",
    )
    train_tasks: int = option(64, "Training tasks (the α-SPIN data).")
    eval_tasks: int = option(24, "Held-out tasks the score is taken on.")
    eval_samples: int = option(8, "Draws per held-out task.")
    max_new_tokens: int = option(12, "Length cap L of responses.")
    beta: float = option(2.0, "β of the SPIN loss.")
    learning_rate: float = option(
        1e-3, "AdamW learning rate of the iterates' LoRA adapters (1e-2 breaks it)."
    )
    lora_rank: int = option(8, "LoRA rank of the iterates.")
    epochs: int = option(2, "Epochs per iteration.")
    batch_size: int = option(16, "Examples per optimizer step.")
    generation_chunk: int = option(
        8,
        """Prompts per opponent call: with K candidates each, every policy keeps a KV cache
            of chunk × K rows (about 46 kB per token and row for this model).""",
    )
    probe_prompts: int = option(
        4,
        """Training tasks on which each α < 1 iteration's opponent is measured against π_ref
            (AlphaSpinConfig.probe_prompts: its KL, or an upper bound for SIR and SMC, in the
            results table); 0: no probe.""",
    )
    probe_reference_particles: int = option(
        64, "Particles N of each reference SMC run of the opponent probe."
    )
    probe_reference_runs: int = option(
        4, "Independent reference SMC runs per probe prompt (≥ 2; their Ẑ are averaged)."
    )
    probe_draws: int = option(
        16, "Draws per probe prompt of an opponent with a density (GFlowNet, ancestral), ≥ 2."
    )
    probe_runs: int = option(
        4, "Independent log Ẑ estimates per probe prompt of a SIR or SMC opponent (≥ 2)."
    )
    workers: int = option(2, "Runs in parallel (one CPU thread each).")
    progress: bool = option(True, "Show a progress bar over the runs.")

    def validate(self) -> None:
        """Raise on bad values before any model work (trainer settings: AlphaSpinConfig's)."""
        for name in ("seeds", "iterations", "workers", "train_tasks", "eval_tasks", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.probe_prompts > self.train_tasks:
            raise ValueError(
                f"probe_prompts={self.probe_prompts} exceeds train_tasks={self.train_tasks}, "
                "the tasks it measures the opponent on"
            )
        resolve_device(self.device, "device")

    def world(self) -> SmolWorldConfig:
        """The world settings whose task split the study uses (the same seed's split)."""
        return SmolWorldConfig(
            train_tasks=self.train_tasks,
            eval_tasks=self.eval_tasks,
            max_new_tokens=self.max_new_tokens,
        )


# Set after the class, as experiments/alpha_spin.py explains (spawned workers).
StudyConfig.QUICK = {
    "train_tasks": 8,
    "eval_tasks": 8,
    "eval_samples": 4,
    "max_new_tokens": 8,
    "num_candidates": 4,
    "num_particles": 4,
    "batch_size": 8,
    "gflownet_steps": 8,
    "probe_prompts": 2,
    "probe_reference_particles": 16,
}


def study_gflownet(study: StudyConfig) -> dict[str, Any]:
    """The GFlowNet opponent's settings: the real-model preset
    (:func:`experiments.real_model.real_model_gflownet`) at the study's steps, without the
    fields each run sets itself, and with the ``auto`` form: a reference over a mixture of
    iterates (h ≥ 2) has no twist form and takes the residual one. The tiny world's defaults
    (lr 2e-3, exploration) took the opponent's KL to π_ref to 0.97 ± 0.22 nats in 8 steps on
    this model, where SIR's bound was 0.003."""
    preset = replace(
        real_model_gflownet(),
        parametrization="auto",
        steps=study.gflownet_steps,
        warmup_steps=study.gflownet_steps // 4,
    )
    return {k: v for k, v in asdict(preset).items() if k not in RUN_DERIVED_FIELDS}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (variant, seed) run in a worker: train from the base, score every iterate."""
    torch.set_num_threads(1)
    study = job["study"]
    train, held_out = task_split(study.world())
    device = None if study.device == "auto" else study.device
    base = Policy.from_pretrained(job["base"], device=resolve_device(device), dtype=torch.float32)
    scorer = TaskScorer(held_out, study.max_new_tokens, study.eval_samples, seed=study.seed)
    config = AlphaSpinConfig(progress=False, **job["config"])
    started = time.perf_counter()
    records = AlphaSpinTrainer(
        config, policy=base, dataset=task_pairs(train), evaluate=scorer
    ).train()
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "records": records,
        "seconds": time.perf_counter() - started,
    }


def jobs(study: StudyConfig, root: Path, base: Path) -> list[dict[str, Any]]:
    out = []
    for name, alpha, history in VARIANTS:
        for seed in range(study.seed, study.seed + study.seeds):
            out.append(
                {
                    "variant": label(name, alpha, history),
                    "seed": seed,
                    "study": study,
                    "base": str(base),
                    "config": {
                        "alpha": alpha,
                        "history": history,
                        "sampler": study.sampler,
                        "num_candidates": study.num_candidates,
                        "num_particles": study.num_particles,
                        "gflownet": study_gflownet(study),
                        "gflownet_warm_steps": max(1, study.gflownet_steps // 4),
                        "beta": study.beta,
                        "learning_rate": study.learning_rate,
                        "lora_rank": study.lora_rank,
                        "lora_alpha": 2 * study.lora_rank,
                        "epochs": study.epochs,
                        "batch_size": study.batch_size,
                        "iterations": study.iterations,
                        "max_new_tokens": study.max_new_tokens,
                        "generation_chunk": study.generation_chunk,
                        "probe_prompts": study.probe_prompts,
                        "probe_reference_particles": study.probe_reference_particles,
                        "probe_reference_runs": study.probe_reference_runs,
                        "probe_draws": study.probe_draws,
                        "probe_runs": study.probe_runs,
                        "seed": seed,
                        "device": None if study.device == "auto" else study.device,
                        "output_dir": str(root / "runs" / f"a{alpha:g}_h{history}_s{seed}"),
                    },
                }
            )
    return out


def probe_summary(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The opponent probe's figure over the seeds' records of one iteration: the mean of each
    seed's ``opponent/kl`` (or ``opponent/kl_bound``, an upper bound, kept under its own name;
    each over the seeds that have it, as ``sampler="auto"`` may pick differently per seed) and
    the standard error of that mean from the probes' own SEs (the seeds' probes are
    independent, so their squared SEs add); empty where no seed has one."""
    out: dict[str, float] = {}
    for key in ("kl", "kl_bound"):
        found = [m for m in metrics if f"opponent/{key}" in m]
        if found:
            out[f"opponent_{key}"] = sum(m[f"opponent/{key}"] for m in found) / len(found)
            squares = sum(m[f"opponent/{key}_se"] ** 2 for m in found)
            out[f"opponent_{key}_se"] = squares**0.5 / len(found)
    return out


def summarize(results: list[dict[str, Any]], iterations: int) -> dict[str, Any]:
    """Per variant and iteration: the task score's mean over seeds with its standard error
    over seeds, the mean within-run standard error (over held-out tasks), the paired change
    from the base, the opponent's ESS/N where it has one, and the opponent probe's KL or KL
    bound (:func:`probe_summary`) where it ran: row t holds the opponent that drew π_t's
    training data (iteration t − 1)."""
    runs_of: dict[str, list[list[dict[str, Any]]]] = {}
    for result in results:
        runs_of.setdefault(result["variant"], []).append(result["records"])
    table = {}
    for variant, runs in runs_of.items():
        rows = []
        for t in range(iterations + 1):
            metrics = [run[t]["metrics"] for run in runs]
            scores = [m["task/score"] for m in metrics]
            mean, std = mean_std(scores)
            changes = [
                m["task/score"] - run[0]["metrics"]["task/score"]
                for m, run in zip(metrics, runs, strict=True)
            ]
            change, change_std = mean_std(changes)
            row = {
                "iteration": t,
                "score": mean,
                "score_se": std / len(scores) ** 0.5,
                "score_se_within": sum(m["task/score_se"] for m in metrics) / len(metrics),
                "change": change,
                "change_se": change_std / len(changes) ** 0.5,
            }
            ess = [m["opponent/ess_fraction"] for m in metrics if "opponent/ess_fraction" in m]
            if ess:
                row["opponent_ess_fraction"] = sum(ess) / len(ess)
            row.update(probe_summary(metrics))
            rows.append(row)
        table[variant] = rows
    return table


def markdown(table: dict[str, Any], study: StudyConfig) -> str:
    lines = [
        f"Task score of π_t on {study.eval_tasks} held-out tasks × {study.eval_samples} draws, "
        f"mean ± standard error over {study.seeds} seeds (in brackets: the mean standard error "
        f"over tasks within a run); α < 1 opponents: sampler={study.sampler}; α = 1 and t = 0 "
        "sampled exactly.",
        "",
        "| variant | "
        + " | ".join(f"t={t}" for t in range(study.iterations + 1))
        + f" | change t={study.iterations} |",
        "|---" * (study.iterations + 3) + "|",
    ]
    for variant, rows in table.items():
        cells = [
            f"{r['score']:.3f} ± {r['score_se']:.3f} [{r['score_se_within']:.3f}]" for r in rows
        ]
        cells.append(f"{rows[-1]['change']:+.3f} ± {rows[-1]['change_se']:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + probe_markdown(table, study)


def probe_cell(row: dict[str, Any]) -> str:
    """``KL ± SE``, ``≤ bound ± SE`` (SIR, SMC: an upper bound on the KL), both (``sampler=
    "auto"`` picked a density sampler for some seeds and SIR for others), or ``—``."""
    parts = []
    if "opponent_kl" in row:
        parts.append(f"{row['opponent_kl']:.3f} ± {row['opponent_kl_se']:.3f}")
    if "opponent_kl_bound" in row:
        parts.append(f"≤ {row['opponent_kl_bound']:.3f} ± {row['opponent_kl_bound_se']:.3f}")
    return "; ".join(parts) or "—"


def probe_markdown(table: dict[str, Any], study: StudyConfig) -> str:
    """The opponent probe's table (the variants it ran for), or nothing."""
    probed = {
        variant: rows
        for variant, rows in table.items()
        if any(probe_cell(r) != "—" for r in rows[1:])
    }
    if not probed:
        return ""
    iterations = range(1, study.iterations + 1)
    lines = [
        "",
        f"Opponent's KL(q ‖ π_ref) on {study.probe_prompts} training tasks "
        "(`selfplay.probe`), mean over seeds ± the standard error from the probes' own: column "
        "t is the opponent that drew π_t's training data (t = 1: π_ref = π_0, sampled exactly); "
        "≤: SIR and SMC have no density, and the figure is the upper bound log Z − E[log Ẑ] "
        "on the KL of one draw's law, not an estimate of it.",
        "",
        "| variant | " + " | ".join(f"t={t}" for t in iterations) + " |",
        "|---" * (study.iterations + 1) + "|",
    ]
    for variant, rows in probed.items():
        lines.append(f"| {variant} | " + " | ".join(probe_cell(rows[t]) for t in iterations) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for variant, rows in table.items():
        axis.errorbar(
            [r["iteration"] for r in rows], [r["score"] for r in rows],
            yerr=[r["score_se"] for r in rows], marker="o", capsize=3, label=variant,
        )  # fmt: skip
    axis.set(xlabel="iteration t", ylabel="task score of π_t", title="SmolLM2-135M: held-out task")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    study = parse_config(StudyConfig, argv, description=(__doc__ or "").split("\n\n")[0])
    study.validate()
    root_path = Path(study.output_dir).expanduser()
    base = converted_folder()  # before any run: fails at once without the model's wheel
    todo = jobs(study, root_path, base)
    for job in todo:
        AlphaSpinConfig(**job["config"])  # every run's settings checked before any work
    root = prepare_output_dir(study.output_dir)
    log = setup_logging(root, "experiments.alpha_spin_real")
    started = time.perf_counter()
    log.info(f"{len(todo)} runs on {study.workers} workers -> {root}")
    results = run_jobs(run_one, todo, study.workers, study.progress)
    table = summarize(results, study.iterations)
    output = {"summary": table, "runs": results, "seconds": time.perf_counter() - started}
    write_study(output, markdown(table, study), root, study, "score.png", plot, log)
    return output


if __name__ == "__main__":
    main()
