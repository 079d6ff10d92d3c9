"""Every sampler on a real language model, measured where nothing can be enumerated.
``python -m experiments.real_model`` (quick CPU setting; ``--full`` for a GPU).

For whoever wants to know how close each sampler comes to the geometric mixture
``π_base^(1-α) · π_other^α`` of a real instruct model (SmolLM2-135M-Instruct, vocabulary
49,152, the ``worlds.smollm`` world) and what each draw costs. For each α and each pair of the
world (``iterate``: the base and an α-SPIN iterate of it, overlapping; ``style``: the base and
a style adapter, barely overlapping):

- a reference ``log Z`` per prompt from ``reference_runs`` SMC runs of ``reference_particles``
  particles each (samplers.accuracy.reference_log_z: the log of the mean Ẑ, delta-method SE);
- the samplers with a density, the local product and the twist-form GFlowNet (fitted on the
  fit prompts, measured on them and on new prompts): estimated KL(q‖p) ± SE and ESS/N from
  ``draws`` draws per prompt;
- the samplers without one, SIR (K = ``particles``), SMC and GFlowNet-twisted SMC (N =
  ``particles``, equal model tokens per draw but for the twist head): ``|Δ log Z|`` ± SE of
  ``runs`` independent estimates against the reference, and ESS/N (of K or N);
- model tokens per draw: the sampling passes, plus for the GFlowNet and twisted SMC its fit
  spread over every draw made with it in this run, with the break-even number of draws per fit
  prompt against plain SMC. The target scoring of density samplers' draws is a measurement, not
  a cost of the draw, and is not counted.

Outputs in ``output_dir``: ``results.json`` (every row, the config, the environment),
``real_model.png`` (KL and ``|Δ log Z|`` per sampler, pair and α), ``run.log``. ``--world
tiny`` runs the same measurements on the tiny world (seconds; for tests). A bad setting stops
with a one-line error before any model work.

Why one module over 400 lines: it is one study read top to bottom (settings, world, measures,
tables, figure, run), each part used only by the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

from experiments.cli import parse_config, run_command
from experiments.common import (
    check_alphas,
    output_set,
    prepare_output_dir,
    setup_logging,
    write_results,
)
from gfn_spin.density import PromptLike
from gfn_spin.devices import resolve_device
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from gfn_spin.policy import Policy
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.accuracy import Estimate, kl_to_target, log_z_error, smc_reference
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler
from samplers.weighting import log_weights_by_prompt, model_tokens
from worlds.toy import build_world as build_tiny

World = Literal["smollm2", "tiny"]


def real_model_gflownet() -> GFlowNetConfig:
    """The real-model GFlowNet preset: the twist form (a head on the frozen components' hidden
    states, so one pass per component per token), small batches of many draws per prompt, a
    short buffer, no exploration, and Adafactor, whose factored state keeps a checkpoint about
    the size of the head (AdamW's moments triple it; on the tiny world's twist fit both reach
    the same TV). The tiny world's defaults stay as they are."""
    return GFlowNetConfig(
        parametrization="twist",
        optimizer="adafactor",
        # The quick setting's fit: what 2 CPU cores afford within the job's 10 minutes (each
        # step a rollout and 4 head updates, about 2.2x a sampling pass of its batch on
        # SmolLM2); --full sets 300.
        steps=12,
        learning_rate=1e-3,
        warmup_steps=3,
        prompts_per_step=2,
        samples_per_prompt=8,
        twist_updates=4,
        twist_buffer=8,
        explore_prob=0.0,
        checkpoint_every=0,
        adapter_name="real_model",
    )


@dataclass
class RealModelConfig:
    """Estimated KL(q‖p), |Δ log Z| and cost of every sampler on a real model, per pair and α."""

    FULL: ClassVar[dict[str, Any]] = {
        "max_new_tokens": 0,
        "fit_prompts": 8,
        "new_prompts": 8,
        "reference_particles": 256,
        "reference_runs": 16,
        "particles": 32,
        "runs": 16,
        "draws": 64,
        "gflownet.steps": 300,
        "gflownet.prompts_per_step": 8,
        "batch_size": 1024,
    }
    """Settings of ``--full`` (for a GPU; each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/real_model", "Directory for results.json, real_model.png and run.log."
    )
    full: bool = option(
        False,
        """The full setting (more prompts, particles, runs and GFlowNet steps; for a GPU). The
        default is the quick setting for 2 CPU cores.""",
    )
    world: World = option(
        "smollm2",
        """"smollm2": SmolLM2-135M-Instruct and its iterate and style pairs (worlds.smollm, built
        once into $GFN_SPIN_CACHE); "tiny": the tiny world's base and shifted policies
        (seconds; for tests).""",
    )
    pairs: tuple[str, ...] = option(
        (), "Pairs of the world to measure (empty: all; smollm2: iterate style)."
    )
    alphas: tuple[float, ...] = option(
        (0.5, 0.95), "α values of the targets π_base^(1-α)·π_other^α."
    )
    max_new_tokens: int = option(8, "Length cap L of every response (0: the world's own cap).")
    fit_prompts: int = option(
        2, "Prompts the GFlowNet is fitted on (the world's first training prompts)."
    )
    new_prompts: int = option(2, "Prompts never fitted on (the world's first held-out prompts).")
    reference_particles: int = option(32, "Particles N of each reference SMC run.")
    reference_runs: int = option(
        4, "Independent reference SMC runs per prompt (≥ 2; their Ẑ are averaged)."
    )
    particles: int = option(
        8, "K of SIR and N of SMC and twisted SMC (equal model tokens per estimate)."
    )
    runs: int = option(
        4, "Independent log Ẑ estimates per prompt of SIR, SMC and twisted SMC (≥ 2)."
    )
    draws: int = option(16, "Draws per prompt of the local product and the GFlowNet, for KL (≥ 2).")
    gflownet: GFlowNetConfig = option(
        factory=real_model_gflownet,
        help="The GFlowNet's fit (real-model preset).",
        derived=("max_new_tokens", "seed", "adapter_name", "parametrization"),
    )
    batch_size: int = option(
        64,
        """Rows per decoding batch of SIR and SMC: bounds memory (on SmolLM2 each row's KV cache
        and next-token scores take about 2 MB per model; 64 rows peaked at 1.6 GB resident in
        all, 512 passed 5 GB).""",
    )
    device: str = option("auto", '"auto" (CUDA when present), "cpu", ...')
    threads: int = option(2, "CPU threads for torch (0: torch's default).")
    seed: int = option(0, "Seed of every sampler and of the fit.")
    progress: bool = option(True, "Show progress bars.")

    def validate(self) -> None:
        """Raise a ValueError naming the setting, before any model work."""
        check_alphas(self.alphas)
        for name in ("fit_prompts", "new_prompts", "reference_particles", "particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("reference_runs", "runs", "draws"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be >= 2 (for a standard error)"
                )
        if self.max_new_tokens < 0 or self.batch_size < 1 or self.threads < 0:
            raise ValueError("max_new_tokens and threads must be >= 0, batch_size >= 1")


@dataclass
class OpenWorld:
    """What the job reads from a world: named (base, other) pairs, prompts, its length cap."""

    pairs: dict[str, tuple[Policy, Policy]]
    fit_prompts: list[PromptLike]
    new_prompts: list[PromptLike]
    max_new_tokens: int
    build_seconds: float


def open_world(config: RealModelConfig, device: torch.device) -> OpenWorld:
    """Build (or load from the cache) the configured world."""
    started = time.perf_counter()
    if config.world == "tiny":
        tiny = build_tiny()
        base, shifted = tiny.base, tiny.shifted
        pairs = {"shifted": (base, shifted)}
        fit, new, cap = tiny.train_prompts, tiny.eval_prompts, tiny.max_new_tokens
    else:
        # Not at module level: worlds.smollm comes with the real-model world's branch, and
        # --world tiny (the tests) must run where that world is not installed.
        from worlds.smollm import build_world as build_smollm

        smol = build_smollm(device=device, progress=config.progress)
        pairs, cap = smol.pairs, smol.max_new_tokens
        fit, new = smol.train_prompts, smol.eval_prompts
    if config.pairs:
        unknown = sorted(set(config.pairs) - set(pairs))
        if unknown:
            raise ValueError(f"pairs={list(config.pairs)}: {unknown} not in {sorted(pairs)}")
        pairs = {name: pairs[name] for name in config.pairs}
    if config.fit_prompts > len(fit) or config.new_prompts > len(new):
        raise ValueError(
            f"fit_prompts={config.fit_prompts} and new_prompts={config.new_prompts} exceed the "
            f"world's {len(fit)} training and {len(new)} held-out prompts"
        )
    return OpenWorld(
        pairs,
        list(fit[: config.fit_prompts]),
        list(new[: config.new_prompts]),
        config.max_new_tokens or cap,
        time.perf_counter() - started,
    )


def _row(pair: str, alpha: float, sampler: str, prompts: str, **values: Any) -> dict[str, Any]:
    return {"pair": pair, "alpha": alpha, "sampler": sampler, "prompts": prompts, **values}


def _estimate(name: str, estimate: Estimate) -> dict[str, Any]:
    """The estimate's mean ± SE over prompts, and whether it stands above its noise: a value
    not above twice its standard error is not a result (shown in parentheses, drawn hatched).
    Both figures are nonnegative, so a value far below zero is not one either: it says the
    reference log Z is low (a log of a mean of Ẑ is biased low)."""
    value, se = estimate.mean()
    return {name: value, f"{name}_se": se, f"{name}_resolved": value > 2 * se}


@dataclass
class _PairRows:
    """The rows of one pair and α, each measured against the SMC ``reference`` per prompt;
    ``subsets`` names the prompt indices a density sampler's KL is averaged over."""

    pair: str
    alpha: float
    reference: Any
    subsets: dict[str, list[int]]
    draws: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add_density(self, name: str, samples: Any, extra: dict[str, Any]) -> None:
        """KL(q‖p) ± SE and ESS/N per prompt subset, from ``draws`` draws per prompt."""
        log_w = log_weights_by_prompt(samples.log_target, samples.log_q, self.draws)
        kl = kl_to_target(log_w, self.reference)
        ess = samples.stats["ess_fraction"]
        for subset, index in self.subsets.items():
            self.rows.append(
                _row(self.pair, self.alpha, name, subset, **_estimate("kl", kl.select(index)),
                     ess_fraction=float(ess[index].mean()), **extra)
            )  # fmt: skip

    def add_weighting(self, name: str, samples: Any, extra: dict[str, Any]) -> dict[str, Any]:
        """|Δ log Z| ± SE of a sampler without a density, over all prompts; returns its row."""
        error = log_z_error(samples.stats["log_z_populations"], self.reference)
        row = _row(self.pair, self.alpha, name, "all", **_estimate("log_z_error", error),
                   ess_fraction=float(samples.stats["ess_fraction"].mean()),
                   sampling_tokens_per_draw=samples.stats.tokens / len(samples), **extra)  # fmt: skip
        row.setdefault("tokens_per_draw", row["sampling_tokens_per_draw"])
        self.rows.append(row)
        return row

    def with_reference(self) -> list[dict[str, Any]]:
        """Every row, stamped with the reference's mean ``log Z`` ± SE over prompts."""
        log_z, log_z_se = self.reference.mean()
        for row in self.rows:
            row.update(reference_log_z=log_z, reference_log_z_se=log_z_se)
        return self.rows


def _fitted_gflownet(
    config: RealModelConfig, world: OpenWorld, target: GeometricMixture, other: Policy, pair: str
) -> tuple[GFlowNetSampler, int, float]:
    """The pair's GFlowNet fitted on the fit prompts, with its fit's model tokens and seconds."""
    gfn_config = replace(
        config.gflownet,
        max_new_tokens=world.max_new_tokens,
        seed=config.seed,
        adapter_name=f"real_model_{pair}",
    )
    gflownet = GFlowNetSampler(target, other, gfn_config)
    fit_started, tokens_before = time.perf_counter(), model_tokens(target, gflownet.policy)
    gflownet.fit(world.fit_prompts, progress=config.progress, log_every=10**9)
    fit_tokens = model_tokens(target, gflownet.policy) - tokens_before
    return gflownet, fit_tokens, time.perf_counter() - fit_started


def _fit_costs(
    gflownet: GFlowNetSampler,
    fit_tokens: int,
    fit_seconds: float,
    fit_per_draw: float,
    saved: float,
    n_fit: int,
) -> dict[str, Any]:
    """The fit's cost columns; ``saved``: the sampling tokens per draw it saves against SMC."""
    return {
        "fit_tokens": fit_tokens,
        "fit_seconds": fit_seconds,
        "fit_steps": gflownet.state.step,
        "fit_tokens_per_draw": fit_per_draw,
        # Draws per fit prompt after which fit + GFlowNet draws cost fewer tokens than SMC's.
        "break_even_draws_per_prompt": fit_tokens / n_fit / saved if saved > 0 else None,
    }


def measure_pair(
    config: RealModelConfig,
    world: OpenWorld,
    pair: str,
    alpha: float,
    bar: Any,
    logger: Any,
) -> list[dict[str, Any]]:
    """Every sampler's rows for the target ``π_base^(1-α) · π_other^α`` of one pair."""
    base, other = world.pairs[pair]
    target = GeometricMixture([base, other], [1 - alpha, alpha])
    cap, n_fit = world.max_new_tokens, len(world.fit_prompts)
    prompts = world.fit_prompts + world.new_prompts
    subsets = {"fit": list(range(n_fit)), "new": list(range(n_fit, len(prompts)))}
    seed, n, k, runs = config.seed, config.draws, config.particles, config.runs

    def stage(text: str) -> None:
        bar.set_postfix_str(f"{pair} α={alpha:g} {text}")
        bar.update(1)

    reference = smc_reference(
        target,
        prompts,
        num_particles=config.reference_particles,
        runs=config.reference_runs,
        max_new_tokens=cap,
        generator=seed,
        batch_size=config.batch_size,
    )
    stage("reference")
    rows = _PairRows(pair, alpha, reference, subsets, n)
    density_rows, weighting_row = rows.add_density, rows.add_weighting

    local = AncestralSampler(target.local_product(), max_new_tokens=cap, target=target)
    samples = local.sample(prompts, n, generator=seed + 1)
    density_rows("local product", samples, {"tokens_per_draw": samples.stats.tokens / len(samples)})
    stage("local product")

    sir = ImportanceResampler(target, None, k, max_new_tokens=cap, batch_size=config.batch_size)
    weighting_row(f"SIR K={k}", sir.sample(prompts, runs, generator=seed + 2), {})
    stage("SIR")
    smc = SMCSampler(target, k, max_new_tokens=cap, batch_size=config.batch_size)
    smc_row = weighting_row(f"SMC N={k}", smc.sample(prompts, runs, generator=seed + 3), {})
    stage("SMC")

    gflownet, fit_tokens, fit_seconds = _fitted_gflownet(config, world, target, other, pair)
    stage("GFlowNet fit")
    samples = gflownet.sample(prompts, n, generator=seed + 4)
    twisted = SMCSampler(
        target, k, proposal=gflownet.policy, twist="flow", max_new_tokens=cap,
        batch_size=config.batch_size,
    )  # fmt: skip
    twisted_samples = twisted.sample(prompts, runs, generator=seed + 5)
    stage("twisted SMC")
    # The fit is spread over every draw made with the fitted GFlowNet in this run.
    draws_made = len(samples) + len(twisted_samples)
    fit_per_draw = fit_tokens / draws_made
    sampling = samples.stats.tokens / len(samples)
    saved = smc_row["sampling_tokens_per_draw"] - sampling
    fit_extra = _fit_costs(gflownet, fit_tokens, fit_seconds, fit_per_draw, saved, n_fit)
    density_rows(
        f"GFlowNet ({gflownet.parametrization})",
        samples,
        {"sampling_tokens_per_draw": sampling, "tokens_per_draw": sampling + fit_per_draw,
         **fit_extra},
    )  # fmt: skip
    twisted_sampling = twisted_samples.stats.tokens / len(twisted_samples)
    weighting_row(
        f"twisted SMC N={k}",
        twisted_samples,
        {"tokens_per_draw": twisted_sampling + fit_per_draw, **fit_extra,
         "break_even_draws_per_prompt": None},
    )  # fmt: skip
    logger.debug("%s α=%g reference log Z per prompt %s ± %s", pair, alpha,
                 reference.value.tolist(), reference.se.tolist())  # fmt: skip
    return rows.with_reference()


def _cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        return "—"
    text = f"{value:.3f} ± {row[f'{name}_se']:.3f}"
    return text if row[f"{name}_resolved"] else f"({text})"


#: The tables' footnote for estimates within twice their standard error of zero.
UNRESOLVED = (
    "(…): not above 2 SE, not resolved at these settings; more --draws, --runs, "
    "--fit_prompts/--new_prompts or --reference_runs resolve it (--full on a GPU); a KL below "
    "zero says the reference log Z is low (more --reference_particles)"
)


def format_tables(rows: list[dict[str, Any]]) -> str:
    """One table per sampler: a line per pair, α and prompt subset."""
    blocks = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        lines = [
            f"== {sampler}",
            f"{'pair':<8} {'α':>5} {'prompts':<7} {'KL(q‖p) ± SE':>16} {'ESS/N':>6} "
            f"{'|Δlog Z| ± SE':>16} {'tokens/draw':>11}  fit, break-even",
        ]
        for r in (r for r in rows if r["sampler"] == sampler):
            fit = ""
            if "fit_tokens" in r:
                even = r["break_even_draws_per_prompt"]
                fit = (
                    f"  fit {r['fit_tokens']:,} tokens ({r['fit_tokens_per_draw']:.0f}/draw, "
                    f"{r['fit_steps']} steps, {r['fit_seconds']:.0f} s)"
                    + ("" if sampler.startswith("twisted") else
                       f", break-even vs SMC {'never' if even is None else f'{even:.0f}'} "
                       "draws per fit prompt")
                )  # fmt: skip
            lines.append(
                f"{r['pair']:<8} {r['alpha']:>5g} {r['prompts']:<7} {_cell(r, 'kl'):>16} "
                f"{r['ess_fraction']:>6.3f} {_cell(r, 'log_z_error'):>16} "
                f"{r['tokens_per_draw']:>11.0f}{fit}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" + UNRESOLVED


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """KL(q‖p) of the density samplers and |Δ log Z| of the others, with 2-SE bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys((r["pair"], r["alpha"]) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, name, label in (
        (axes[0], "kl", "estimated KL(q‖p) (nats)"),
        (axes[1], "log_z_error", "|Δ log Z| against the reference (nats)"),
    ):
        series = list(
            dict.fromkeys((r["sampler"], r["prompts"]) for r in rows if r.get(name) is not None)
        )
        width = 0.8 / max(1, len(series))
        for j, (sampler, subset) in enumerate(series):
            values, errors, hatches = [], [], []
            for setting in settings:
                match = [r for r in rows if (r["pair"], r["alpha"]) == setting
                         and (r["sampler"], r["prompts"]) == (sampler, subset)]  # fmt: skip
                values.append(match[0][name] if match else float("nan"))
                errors.append(2 * match[0][f"{name}_se"] if match else 0.0)
                hatches.append("" if match and match[0][f"{name}_resolved"] else "//")
            x = [i + (j - (len(series) - 1) / 2) * width for i in range(len(settings))]
            tag = sampler if subset == "all" else f"{sampler}, {subset} prompts"
            ax.bar(x, values, width, yerr=errors, label=tag, capsize=2, hatch=hatches)
        ax.set_xticks(range(len(settings)), [f"{p} α={a:g}" for p, a in settings])
        ax.set_ylabel(label)
        ax.legend(fontsize=7, title="hatched: not above 2 SE", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: RealModelConfig, output_dir: Path, logger: Any) -> dict[str, Any]:
    """Open the world, measure every pair and α, write results.json and the plot."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    device = resolve_device(config.device)
    world = open_world(config, device)
    logger.info(
        "world %s opened in %.0f s: pairs %s, %d fit + %d new prompts, L = %d",
        config.world, world.build_seconds, list(world.pairs), len(world.fit_prompts),
        len(world.new_prompts), world.max_new_tokens,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    settings = [(pair, alpha) for pair in world.pairs for alpha in config.alphas]
    with tqdm(total=6 * len(settings), desc="real model", disable=not config.progress) as bar:
        for pair, alpha in settings:
            rows += measure_pair(config, world, pair, alpha, bar, logger)
    table = format_tables(rows)
    print(table)
    logger.debug("\n%s", table)
    seconds = time.perf_counter() - started
    results = {
        "rows": rows,
        "table": table,
        "seconds": seconds,
        "world_seconds": world.build_seconds,
        "max_new_tokens": world.max_new_tokens,
    }
    write_results(results, output_dir, config)
    plot(rows, output_dir / "real_model.png")
    logger.info("total %.0f s (world %.0f s)", seconds, world.build_seconds)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the results (also written to ``output_dir``). A bad setting or a
    missing model is refused (one line through run_command)."""
    config = parse_config(RealModelConfig, argv, description=__doc__.split("\n")[0])
    config.validate()
    resolve_device(config.device)
    root = prepare_output_dir(config.output_dir)
    with output_set(root) as output_dir:
        logger = setup_logging(output_dir, "experiments.real_model", append=False)
        results = run(config, output_dir, logger)
        logger.info("results in %s", root)
    return results


if __name__ == "__main__":
    run_command(main)
