"""The settings of an α-SPIN run (:class:`AlphaSpinConfig`) and the seeds derived from them.

For users configuring :class:`selfplay.AlphaSpinTrainer`, from Python or from the command line
(``python -m experiments.train_alpha_spin --help`` is built from the fields' ``help``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

from gfn_spin.devices import check_device
from gfn_spin.io import dataclass_from_dict, settings_as_applied
from gfn_spin.options import option
from gfn_spin.samples import check_count
from gfn_spin.schedules import LrDecay
from objectives.spin import LOSS_TYPES
from samplers.gflownet import GFlowNetConfig
from samplers.gflownet.config import RUN_DERIVED_FIELDS

#: α-SPIN run fields that may differ when a run is resumed (they do not change its results:
#: the probe's settings change what later iterations measure, never the data or the iterates);
#: a GFlowNet fit has its own, samplers.gflownet.config.RESUMABLE_FIELDS.
RUN_RESUMABLE_FIELDS = (
    "output_dir",
    "iterations",
    "progress",
    "probe_prompts",
    "probe_reference_particles",
    "probe_reference_runs",
    "probe_draws",
    "probe_runs",
)


def opponent_gflownet_config() -> GFlowNetConfig:
    """The GFlowNet opponent's settings: the sampler's defaults, fitted for 200 steps an
    iteration from fresh weights (a warm-started fit is set by the ``gflownet_warm_*``
    fields)."""
    return GFlowNetConfig(steps=200)


@dataclass
class AlphaSpinConfig:
    """Every setting of an α-SPIN run (saved in the run's manifest).

    The defaults are chosen for the tiny world (a small model, L = 7): SPIN's own defaults
    (β = 0.1, RMSProp, lr 5e-7 then 1e-7, batch 64) are for 7B models, whose steps are far too
    small for a tiny one. Here: AdamW, lr 1e-3, LoRA r = 16, batch 32,
    2 epochs per iteration, and β = 2. Why β ≥ 1: with unlimited data the sigmoid loss is
    minimized by π ∝ π_ref^(1-1/β) · p_data^(1/β), so β = 1 jumps to p_data in one iteration
    whatever the reference (α and h would not matter), β < 1 overshoots past p_data, and
    β = 2 moves halfway (geometrically) from π_ref toward p_data, which is where the
    reference's regularization shows (docs/alpha_spin.md).
    """

    # -- model and data ---------------------------------------------------------------------
    model: str | None = option(
        None, "HF model name or local directory of the base π_0; None: the tiny world's SFT base."
    )
    dataset: str | None = option(
        None,
        "`datasets` source of (prompt, real response) pairs: a hub name or a "
        "local json/jsonl/parquet/csv file or folder; None: the tiny world's SFT data.",
    )
    dataset_split: str = option("train", "Split of `dataset` to read.")
    prompt_column: str = option("prompt", "Column of `dataset` holding the prompts.")
    response_column: str = option("response", "Column of `dataset` holding the real responses.")
    messages_column: str | None = option(
        None,
        'Read a chat column instead (e.g. "real" of the SPIN data): first '
        "user turn = prompt, last assistant turn = response.",
    )
    max_examples: int | None = option(None, "Use only the first this many examples (None: all).")
    max_prompt_length: int = option(64, "Prompts longer than this keep their last tokens.")
    max_new_tokens: int | None = option(
        None,
        "Length cap L of responses (generation and training); None: the tiny world's L, else 256.",
    )

    # -- self-play -------------------------------------------------------------------------
    alpha: float = option(
        0.95,
        "α in π_ref ∝ π_0^(1-α)·M_h^α; 1 = no regularization toward the base "
        "(SPIN, fictitious play).",
    )
    history: int | str = option(
        2,
        "h, the number of latest iterates averaged in M_h (capped by those "
        'that exist), or "all" for fictitious play over π_0..π_t.',
    )
    sampler: Literal["auto", "exact", "ancestral", "importance", "smc", "gflownet"] = option(
        "auto",
        'Opponent sampler: "exact" (α = 1: the arithmetic mixture sampled '
        'exactly), "ancestral" (y\' ~ π_t, the cheap baseline for α < 1), '
        '"importance" (SIR), "smc", "gflownet"; "auto" = "exact" when α = 1, else '
        "chosen at each iteration from a pilot (samplers.choose_sampler): the local product, "
        "SIR from it with the K the pilot says reaches auto_accuracy, or a GFlowNet when SIR "
        "would need more than auto_max_candidates and the GFlowNet's total cost, fit included, "
        "is lower. A normalized π_ref (α = 1, or t = 0 where π_ref = π_0) is "
        "always sampled exactly.",
    )
    auto_accuracy: float = option(
        0.01,
        'sampler="auto": the mean exact TV of one opponent draw to π_ref (over prompts) the '
        "pilot's choice must reach.",
    )
    auto_max_candidates: int = option(
        64,
        'sampler="auto": above this K a GFlowNet is fitted and compared with SIR (fit '
        "included); at or below it SIR from the local product is used without a fit.",
    )
    proposal: Literal["history", "local", "current"] = option(
        "history",
        'Proposal of the importance sampler: "history" (M_h), "local" (the '
        'local product q_loc(v|s) ∝ π_0^(1-α)·M_h^α per token), "current" (π_t).',
    )
    num_candidates: int = option(16, "K, proposals per draw of the importance sampler.")
    num_particles: int = option(
        16, "N, particles per draw of the SMC sampler (proposal: the local product)."
    )
    gflownet: GFlowNetConfig = option(
        factory=opponent_gflownet_config,
        help="Settings of the GFlowNet opponent, fitted on the prompts at every "
        "iteration (its max_new_tokens, adapter_name and seed are set by the run).",
        derived=RUN_DERIVED_FIELDS,
    )
    gflownet_warm_start: bool = option(
        True,
        "Start each iteration's GFlowNet fit from the previous iteration's "
        "weights (the twist head, or the LoRA adapter, when their shapes match; "
        "else a cold start, logged with the reason).",
    )
    gflownet_warm_steps: int | None = option(
        50,
        "Steps of a warm-started GFlowNet fit (a cold fit takes "
        "gflownet.steps); None: gflownet.steps. The default, a quarter of the cold "
        "fit, matched its exactness on the tiny world (python -m "
        "bench.alpha_spin_iteration measures both).",
    )
    gflownet_warm_learning_rate: float | None = option(
        2e-4,
        "Peak learning rate of a warm-started GFlowNet fit, without warmup "
        "(a tenth of the cold fit's: at the cold peak a short warm fit drifts away "
        "from the previous weights); None: gflownet's schedule.",
    )
    generation_chunk: int = option(
        64,
        "Prompts per generation call; each chunk is seeded by its index (the "
        "unit of data parallelism, so results do not depend on the number of "
        "processes).",
    )

    # -- opponent probe --------------------------------------------------------------------
    probe_prompts: int = option(
        0,
        "At α < 1, measure each iteration's opponent against π_ref on the first this many "
        "prompts (selfplay.probe; metrics.json: opponent/kl ± SE for an opponent with a "
        "density, opponent/kl_bound ± SE, an upper bound, for SIR and SMC, and "
        "opponent/probe_tokens); 0: no probe. Cost per iteration and prompt, on the main "
        "process while the others wait: probe_reference_runs × probe_reference_particles SMC "
        "particles (none at t = 0, where π_ref = π_0 has log Z = 0), then probe_draws draws of "
        "the opponent (a density) or probe_runs draws of K or N each (SIR, SMC), all scored "
        "under π_ref.",
    )
    probe_reference_particles: int = option(
        64, "Particles N of each reference SMC run of the opponent probe."
    )
    probe_reference_runs: int = option(
        4, "Independent reference SMC runs per probe prompt (≥ 2; their Ẑ are averaged)."
    )
    probe_draws: int = option(
        16,
        "Draws per probe prompt of an opponent with a density (GFlowNet, ancestral, local "
        "product), for its KL (≥ 2).",
    )
    probe_runs: int = option(
        4,
        "Independent log Ẑ estimates (one per draw) per probe prompt of a SIR or SMC "
        "opponent, for its KL bound (≥ 2).",
    )

    # -- loss and optimization -------------------------------------------------------------
    beta: float = option(2.0, "β, the reward scale of the SPIN loss (SPIN: 0.1 for 7B).")
    loss_type: Literal[LOSS_TYPES] = option(
        "sigmoid", f"SPIN loss, one of {', '.join(LOSS_TYPES)} (objectives.spin)."
    )
    iterations: int = option(
        3, "Self-play iterations (iterates π_1..π_iterations); may be raised when resuming."
    )
    epochs: int = option(2, "Passes over the iteration's data when training π_(t+1) (SPIN: 2).")
    optimizer: Literal["adamw", "rmsprop", "sgd"] = option(
        "adamw", '"adamw", "rmsprop" (SPIN\'s) or "sgd"; a fresh optimizer every iteration.'
    )
    learning_rate: float = option(1e-3, "Peak learning rate (SPIN: 5e-7 for 7B models).")
    lr_decay: LrDecay = option(
        "constant",
        "Learning-rate decay over each iteration's steps after warmup "
        '(gfn_spin.schedules): "constant", "linear" or "cosine" (both to 0).',
    )
    warmup_ratio: float = option(
        0.0,
        "Fraction of each iteration's steps with linear warmup from rate 0 "
        '(SPIN: 0.1); none with lr_decay="constant", as transformers\' schedule of '
        "that name.",
    )
    weight_decay: float = option(0.0, "Weight decay of the optimizer.")
    max_grad_norm: float | None = option(1.0, "Gradient clipping norm (None: no clipping).")
    batch_size: int = option(
        32, "Examples per micro-batch, over all processes together (each takes an equal share)."
    )
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimizer step (effective batch = batch_size × this)."
    )
    finetuning: Literal["lora", "full"] = option(
        "lora", '"lora": iterates are LoRA adapters on one base; "full": full copies of the model.'
    )
    lora_rank: int = option(16, "LoRA rank r of the iterates.")
    lora_alpha: int = option(16, "LoRA scaling numerator of the iterates (not the α of α-SPIN).")

    # -- run -------------------------------------------------------------------------------
    seed: int = option(
        0, "Seed of everything stochastic (adapter init, generation chunks, batch order)."
    )
    output_dir: str = option(
        "runs/alpha_spin",
        "Where the manifest, data, iterates and metrics go (a run resumes from here).",
    )
    device: str | None = option(
        None, '"cpu", "cuda", ...; None: the accelerate process\'s device (CUDA when present).'
    )
    progress: bool = option(True, "Show progress bars (main process only).")

    def __post_init__(self) -> None:
        if isinstance(self.history, str) and self.history.strip().isdigit():
            self.history = int(self.history)
        if isinstance(self.gflownet, dict):  # read back from JSON
            self.gflownet = dataclass_from_dict(GFlowNetConfig, self.gflownet)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the bad setting and the fix (before any model work)."""
        if not (isinstance(self.alpha, int | float) and 0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        if self.history != "all" and (
            isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1
        ):
            raise ValueError(f"history={self.history!r} must be a positive integer or 'all'")
        for name in ("sampler", "proposal", "loss_type", "optimizer", "lr_decay", "finetuning"):
            allowed = _CHOICES[name]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.sampler == "exact" and self.alpha not in (0.0, 1.0):
            raise ValueError(
                f"sampler='exact' needs alpha=1 (π_ref is then an arithmetic mixture); with "
                f"alpha={self.alpha} π_ref is a geometric mixture: use sampler='importance', "
                "'smc', 'gflownet' or the 'ancestral' baseline"
            )
        if not isinstance(self.gflownet, GFlowNetConfig):
            raise ValueError(f"gflownet={self.gflownet!r} must be a GFlowNetConfig")
        self.gflownet.validate()
        _check_number(self, "beta", 0.0, low_open=True)
        _check_number(self, "learning_rate", 0.0, low_open=True)
        _check_number(self, "weight_decay", 0.0, low_open=False)
        _check_number(self, "warmup_ratio", 0.0, low_open=False, high=1.0)
        if self.warmup_ratio == 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if self.max_grad_norm is not None:
            _check_number(self, "max_grad_norm", 0.0, low_open=True)
        _check_number(self, "auto_accuracy", 0.0, low_open=True, high=1.0)
        if self.auto_accuracy == 1.0:
            raise ValueError(f"auto_accuracy={self.auto_accuracy!r} must be in (0, 1)")
        for name in (
            "auto_max_candidates",
            "num_candidates",
            "num_particles",
            "generation_chunk",
            "iterations",
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "lora_rank",
            "lora_alpha",
            "max_prompt_length",
        ):
            check_count(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")
        if not isinstance(self.gflownet_warm_start, bool):
            raise ValueError(f"gflownet_warm_start={self.gflownet_warm_start!r} must be a bool")
        if self.gflownet_warm_steps is not None and (
            isinstance(self.gflownet_warm_steps, bool)
            or not isinstance(self.gflownet_warm_steps, int)
            or self.gflownet_warm_steps < 0
        ):
            raise ValueError(
                f"gflownet_warm_steps={self.gflownet_warm_steps!r} must be an integer >= 0 or None"
            )
        if self.gflownet_warm_learning_rate is not None:
            _check_number(self, "gflownet_warm_learning_rate", 0.0, low_open=True)
        _check_probe(self)
        for name in ("max_new_tokens", "max_examples"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name))
        for name in ("model", "dataset", "messages_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}={value!r} must be a non-empty string or None")
        for name in ("dataset_split", "prompt_column", "response_column", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}={value!r} must be a non-empty string")
        if self.device is not None:
            check_device(self.device, "device")

    def resolved_sampler(self) -> str:
        """The sampler used for a geometric-mixture reference ("auto" at α < 1: the one a
        pilot picks at each iteration, :func:`selfplay.opponents.opponent_sampler`)."""
        if self.sampler != "auto":
            return self.sampler
        return "exact" if self.alpha in (0.0, 1.0) else "auto"

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (the nested GFlowNet config as a dict without the fields
        the run sets itself, tuples as lists), so that a config read back from a manifest
        compares equal to a fresh one and records only settings that are applied."""
        return json.loads(json.dumps(settings_as_applied(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AlphaSpinConfig:
        """The config saved by :meth:`to_dict`; unknown fields are refused by name."""
        return dataclass_from_dict(cls, values)


#: The values each ``Literal`` field of :class:`AlphaSpinConfig` allows.
_CHOICES = {
    name: get_args(hint)
    for name, hint in get_type_hints(AlphaSpinConfig).items()
    if getattr(hint, "__origin__", None) is Literal
}


def _check_number(
    config: AlphaSpinConfig, name: str, low: float, *, low_open: bool, high: float = math.inf
) -> None:
    value = getattr(config, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value <= high
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        upper = f" and < {high:g}" if high != math.inf else ""
        raise ValueError(f"{name}={value!r} must be a finite number {bound}{upper}")


def _check_probe(config: AlphaSpinConfig) -> None:
    """Refuse a bad opponent-probe setting (a count, and at least 2 of what gives an SE)."""
    value = config.probe_prompts
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"probe_prompts={value!r} must be an integer >= 0 (0: no probe)")
    check_count("probe_reference_particles", config.probe_reference_particles)
    for name in ("probe_reference_runs", "probe_draws", "probe_runs"):
        if check_count(name, getattr(config, name)) < 2:
            raise ValueError(f"{name}={getattr(config, name)} must be >= 2 (for a standard error)")


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one stochastic step, from the run seed and the step's name."""
    blob = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1
