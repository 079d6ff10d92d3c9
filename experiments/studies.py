"""Shared part of the sampler studies on the tiny world: settings, setup, CSV, table, plot.

For whoever runs or writes one of the studies that ask which sampler settings matter:
``python -m experiments.sampler_sweep`` (SIR's K, SMC's N, GFlowNet settings one at a time),
``experiments.amortization`` (one adapter for many prompts), ``experiments.torchgfn_baseline``
(torchgfn's SubTB on one prompt) and ``experiments.large_models`` (random Llamas too large to
enumerate); ``experiments.sampler_ablation`` runs them together. The target is the geometric
mixture π_base^(1-α) π_t^α of the tiny world (docs/toyworld.md), enumerated exactly on a few
held-out eval prompts; every study writes ``ablation.csv`` (one row per measurement),
``results.json`` (config, versions, git commit, rows), ``ablation.png`` and ``run.log`` in its
``--output-dir``.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from experiments.cli import parse_config
from experiments.common import (
    check_alphas,
    parse_overrides,
    prepare_output_dir,
    setup_logging,
    world_config,
    write_results,
)
from experiments.evaluation import Components, EvaluationConfig, enumerate_components
from gfn_spin.io import write_text_atomic
from gfn_spin.options import option
from samplers.gflownet import GFlowNetConfig
from worlds.many_prompt import ManyPromptConfig, build_many_prompt_world

CSV_COLUMNS = (
    "section",
    "alpha",
    "name",
    "setting",
    "measure",
    "tv",
    "noise_floor_tv",
    "kl",
    "ess_fraction",
    "tokens_per_draw",
    "train_steps",
    "train_seconds",
    "fit_tokens",
    "target_evaluations",
    "log_z_error",
    "ess_per_token",
    "kl_q_target",
    "elbo",
    "log_z_spread",
)


def ablation_gflownet() -> GFlowNetConfig:
    """The base GFlowNet setting that the studies vary: the twist form, 200 rollouts."""
    return GFlowNetConfig(
        parametrization="twist",
        steps=200,
        learning_rate=3e-3,
        prompts_per_step=32,
        twist_updates=8,
        explore_prob=0.0,
    )


#: GFlowNetConfig fields that a study sets itself (no flags, no variants).
DERIVED = ("max_new_tokens", "adapter_name", "seed")


@dataclass
class AblationConfig(EvaluationConfig):
    """Settings every sampler study shares: the world, the eval prompts, the base GFlowNet."""

    output_dir: str = option(
        "outputs/sampler_ablation",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    quick: bool = option(False, "Small budgets everywhere: each size still at its default shrinks.")
    alphas: tuple[float, ...] = option(
        (0.5,), "Values of α; the target is GeometricMixture([base, π_t], [1-α, α])."
    )
    threads: int = option(
        1,
        "CPU threads for torch (the tiny models run fastest single-threaded; 0: torch's default).",
    )
    world_cache: str | None = option(
        None, "Cache directory of the tiny world (default $GFN_SPIN_CACHE or ~/.cache/gfn_spin)."
    )
    world: tuple[str, ...] = option(
        (),
        """Tiny-world settings as field=value, fields of worlds.toy.ToyWorldConfig
            (e.g. shift_rule=style sft_examples=8192: a shifted task that overlaps the base
            task); each distinct world is built once and cached.""",
    )
    many_prompt: str = option(
        "",
        """A preset of the many-prompt world (worlds.many_prompt: "overlap" or "stress") to use
        instead of the tiny world: its fit prompts are the train prompts, its new prompts (never
        fitted, never in SFT) the eval prompts; empty: the tiny world.""",
    )
    num_eval_prompts: int = option(
        4,
        "Held-out prompts whose target is enumerated (each has 21,845 responses at L=7; evenly "
        "spaced among the many-prompt world's new prompts).",
    )
    draws: int = option(
        64, "Draws per eval prompt of SIR/SMC (their |Δlog Z| is measured on them)."
    )
    gflownet: GFlowNetConfig = option(
        factory=ablation_gflownet,
        help="The GFlowNet setting the studies vary, one flag per field (--gflownet.NAME).",
        derived=DERIVED,
    )
    progress: bool = option(True, "Show tqdm progress bars.")

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        world_config(self.world)  # a bad --world setting fails here, not after loading
        if self.many_prompt:
            ManyPromptConfig(preset=self.many_prompt)
        check_alphas(self.alphas)
        for name in ("num_eval_prompts", "draws", "smc_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        gfn_config(self, "", 0.5, 7)
        for field in dataclasses.fields(self):
            if field.metadata.get("flat"):  # a study's own options, checked against this config
                getattr(self, field.name).validate(self)


def gfn_config(config: AblationConfig, variant: str, alpha: float, cap: int) -> GFlowNetConfig:
    """The base GFlowNet setting changed by ``variant`` (comma-joined field=value), with a
    unique adapter name per setting."""
    values = parse_overrides(GFlowNetConfig, [variant])
    safe = "".join(c if c.isalnum() else "_" for c in f"ablation_{alpha:g}_{variant or 'base'}")
    return dataclasses.replace(
        config.gflownet, max_new_tokens=cap, seed=config.seed, adapter_name=safe, **values
    )


def base_setting(config: AblationConfig) -> str:
    """The base GFlowNet setting as the field=value pairs that differ from GFlowNetConfig's."""
    default = GFlowNetConfig()
    return ",".join(
        f"{f.name}={getattr(config.gflownet, f.name)}"
        for f in dataclasses.fields(GFlowNetConfig)
        if f.name not in DERIVED and getattr(config.gflownet, f.name) != getattr(default, f.name)
    )


class Setup:
    """The tiny world, its eval prompts and their enumerated components (built when first read,
    so a study that needs no world builds none)."""

    def __init__(self, config: AblationConfig, logger: Any) -> None:
        self.config, self.logger = config, logger

    @cached_property
    def world(self) -> Any:
        from worlds.toy import build_world

        started = time.perf_counter()
        if self.config.many_prompt:
            many = ManyPromptConfig(preset=self.config.many_prompt)
            world = build_many_prompt_world(many, cache_dir=self.config.world_cache).world
        else:
            world = build_world(world_config(self.config.world), cache_dir=self.config.world_cache)
        self.logger.info("world ready in %.1f s", time.perf_counter() - started)
        return world

    @cached_property
    def eval_prompts(self) -> list[list[int]]:
        prompts, count = self.world.eval_prompts, self.config.num_eval_prompts
        # The many-prompt world's 1,024 new prompts are sorted: its first few would share
        # their first symbols, so it is probed at evenly spaced ones.
        stride = max(1, len(prompts) // count) if self.config.many_prompt else 1
        return [list(p) for p in prompts[::stride][:count]]

    @cached_property
    def components(self) -> Components:
        cap = self.world.max_new_tokens
        return enumerate_components(self.world.base, self.world.shifted, self.eval_prompts, cap)


Study = Callable[[Any, Setup, Any], list[dict[str, Any]]]
"""One study's section: (a config holding its options, the setup, a logger) → its rows."""


def study_options(cls: type, help: str) -> Any:  # noqa: A002 -- option's own keyword
    """The field of a config that holds one study's options (``cls``, a dataclass with a
    ``validate(config)``): its flags keep their own names (``flat``, :mod:`experiments.cli`), so
    a config composing several studies offers every study's flags unchanged."""
    return option(factory=cls, help=help, flat=True)


def run_studies(
    cls: type[AblationConfig],
    argv: list[str] | None,
    studies: Callable[[Any], list[Study]],
    tool: str,
    doc: str | None,
) -> dict[str, Any]:
    """Parse ``argv`` into ``cls``, run the studies it selects, write every output; the results.
    ``tool`` is the study's module name, ``doc`` its docstring (whose first paragraph
    ``--help`` shows)."""
    config = parse_config(cls, argv, description=(doc or "").split("\n\n")[0])
    config.validate()
    output_dir = prepare_output_dir(config.output_dir, tool=tool)
    logger = setup_logging(output_dir, tool)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    setup = Setup(config, logger)
    rows: list[dict[str, Any]] = []
    csv_path = output_dir / "ablation.csv"
    for study in studies(config):
        rows.extend(study(config, setup, logger))
        write_csv(rows, csv_path)  # partial results survive an interrupted run
    table = format_table(rows)
    print(table)
    logger.debug("\n%s", table)
    total = time.perf_counter() - started
    logger.info("total %.1f s; results in %s", total, output_dir)
    results = {"rows": rows, "seconds": total, "table": table}
    write_results(results, output_dir, config)
    plot(rows, output_dir / "ablation.png")
    return results


def study_main(
    cls: type[AblationConfig], study: Study, tool: str, doc: str | None
) -> Callable[..., dict[str, Any]]:
    """``main(argv=None)`` of a module that runs one study alone (see :func:`run_studies`)."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        """Run the study; returns the results dict (also written to ``output_dir``)."""
        return run_studies(cls, argv, lambda config: [study], tool, doc)

    return main


# -- output ---------------------------------------------------------------------------------


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The rows as CSV with the columns CSV_COLUMNS (a missing value is an empty cell)."""
    lines = [",".join(CSV_COLUMNS)]
    for row in rows:
        cells = []
        for column in CSV_COLUMNS:
            value = row.get(column)
            cells.append("" if value is None else str(value))
        lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
    write_text_atomic("\n".join(lines) + "\n", path)
    with path.open(encoding="utf-8") as handle:  # the file parses back as CSV
        assert len(list(csv.reader(handle))) == len(rows) + 1


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TV of SIR/SMC against budget, TV per GFlowNet setting, torchgfn vs ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amortized = [r for r in rows if r["section"] == "amortization"]
    fig, axes = plt.subplots(1, 3 + bool(amortized), figsize=(17 + 5 * bool(amortized), 5))
    sweep_rows = [r for r in rows if r["section"] == "sweep"]
    for alpha in sorted({r["alpha"] for r in sweep_rows}):
        for family in ("SIR", "SMC"):
            mine = [
                r
                for r in sweep_rows
                if r["alpha"] == alpha
                and r["name"].startswith(family)
                and r.get("log_z_error") is not None  # SMC points below their noise floor
            ]
            if mine:
                axes[0].plot(
                    [int(r["setting"].split("=")[1]) for r in mine],
                    [r["log_z_error"] for r in mine],
                    "o-",
                    label=f"{family} α={alpha:g}",
                )
    axes[0].set(
        xscale="log", yscale="log", xlabel="K (SIR) or N (SMC)", ylabel="mean |log Ẑ − log Z|"
    )
    if axes[0].get_legend_handles_labels()[0]:  # a study without the sweep draws none
        axes[0].legend(fontsize=7)
    gfn_rows = [r for r in sweep_rows if r["name"].startswith("GFlowNet")]
    labels = [f"{r['name'][9:]} α={r['alpha']:g}" for r in gfn_rows]
    axes[1].barh(range(len(gfn_rows)), [r["tv"] for r in gfn_rows])
    axes[1].set_yticks(range(len(gfn_rows)), labels, fontsize=7)
    axes[1].set(xlabel="exact TV of the GFlowNet policy")
    ext = [r for r in rows if r["section"] == "torchgfn"]
    axes[2].barh(range(len(ext)), [r["tv"] for r in ext])
    axes[2].set_yticks(
        range(len(ext)), [f"{r['name'][:28]} α={r['alpha']:g}" for r in ext], fontsize=7
    )
    axes[2].set(xlabel="exact TV, one prompt, equal target evaluations")
    for (alpha, name), group in _groups(amortized, ("alpha", "name")).items():
        label = (
            name.replace("GFlowNet fit", "SubTB fit").replace(
                "Likelihood fit on exact target draws (oracle)", "oracle fit"
            )
            + f" α={alpha:g}"
        )
        if all(r["train_steps"] == 0 for r in group):  # no fit (the local product): a level
            axes[3].axhline(group[0]["tv"], ls=":", lw=1, label=label)
            continue
        axes[3].plot([r["train_steps"] for r in group], [r["tv"] for r in group], "o-", label=label)
    if amortized:
        axes[3].axhline(0.02, color="red", ls="--", lw=0.8)
        axes[3].set(xscale="log", xlabel="training steps", ylabel="exact TV")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _groups(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text: TV/KL exact for GFlowNets, |log Ẑ − log Z| for SIR/SMC, large figures."""

    def num(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None or value == "" else format(value, spec)

    lines = [
        f"{'section':<9} {'α':>5} {'name':<50} {'TV':>7} {'KL':>8} {'|dlogZ|':>8} "
        f"{'ESS/N':>6} {'ESS/tok':>8} {'train s':>7}"
    ]
    for r in rows:
        kl = r.get("kl") if r.get("kl") is not None else r.get("kl_q_target")
        lines.append(
            f"{r['section']:<9} {r['alpha']:>5g} {r['name'][:50]:<50} {num(r.get('tv')):>7} "
            f"{num(kl):>8} {num(r.get('log_z_error')):>8} {num(r.get('ess_fraction'), '.3f'):>6} "
            f"{num(r.get('ess_per_token'), '.2e'):>8} {num(r.get('train_seconds'), '.0f'):>7}"
        )
    return "\n".join(lines)
