"""α-SPIN: self-play fine-tuning against a KL-regularized reference (DESIGN §3), top to bottom.

For alignment researchers running SPIN, α-SPIN or fictitious play on an HF model and a
``datasets`` source (the tiny world by default). Iterates π_0 (the base), π_1, ..., π_t are
named LoRA adapters on one set of base weights (or full copies with ``finetuning="full"``).
Iteration t, in :meth:`AlphaSpinTrainer.train`:

1. :func:`build_reference`: ``π_ref ∝ π_0^{1-α} · M_h^α`` with ``M_h = (1/h) Σ_{i<h} π_{t-i}``
   (h capped by the iterates that exist, "all" = π_0..π_t). α = 1 → ``M_h`` itself, an
   arithmetic mixture sampled exactly; α < 1 → a :class:`~gfn_spin.GeometricMixture`.
2. :func:`opponent_sampler` + :func:`make_iteration_data`: one y' per example from the chosen
   sampler, and the reference log-probs of y and y' computed once and stored with the data
   (parquet, :mod:`gfn_spin.data`), so training keeps only the policy in memory.
3. :func:`new_iterate` + :func:`train_iterate`: π_{t+1} starts from π_t (its adapter weights
   copied into a new adapter; a fresh adapter on the base at t = 0) and minimizes
   ``objectives.spin.spin_loss`` with one teacher-forced pass per batch (y and y' together).
4. evaluate, save the iterate and record the metrics; every step is atomic and listed in a
   manifest, so a killed run restarted with the same command ends with the same results.

Data parallel under ``accelerate launch``: generation is split in fixed chunks (each seeded by
its index, so samples do not depend on the number of processes) and gathered; training splits
each global batch across processes and sums gradients (each process's loss is its share of the
global mean), so every process applies the same update and ends with identical weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gfn_spin import adapters
from gfn_spin.data import (
    chat_messages,
    check_no_special_tokens,
    encode_example,
    load_pairs,
    load_parquet,
    pairs_fingerprint,
    write_parquet,
)
from gfn_spin.density import Density
from gfn_spin.devices import check_device
from gfn_spin.distributed import Distributed
from gfn_spin.io import atomic_directory, dataclass_from_dict
from gfn_spin.mixtures import ArithmeticMixture, GeometricMixture
from gfn_spin.policy import Policy
from gfn_spin.run_folder import DATA_HASH, RunDirectory, iterate_name
from gfn_spin.run_folder import MANIFEST as MANIFEST  # the run folder's names, re-exported
from gfn_spin.samples import pad_responses
from gfn_spin.toyworld import ToyWorldEvaluator
from objectives.spin import LOSS_TYPES, spin_loss

SAMPLERS = ("auto", "exact", "ancestral", "importance", "smc", "gflownet")
PROPOSALS = ("history", "local", "current")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")
LR_SCHEDULERS = ("constant", "linear", "cosine")
FINETUNING = ("lora", "full")
#: Config fields that may differ when a run is resumed (they do not change its results).
RESUMABLE_FIELDS = ("output_dir", "iterations", "progress")


@dataclass
class AlphaSpinConfig:
    """Every setting of an α-SPIN run (saved in the run's manifest).

    The defaults are chosen for the tiny world (a 0.1M-parameter model, L = 7): SPIN's own
    defaults (β = 0.1, RMSProp, lr 5e-7 then 1e-7, batch 64) are for 7B models and would not
    move a tiny model within a CPU minute. Here: AdamW, lr 1e-3, LoRA r = 16, batch 32,
    2 epochs per iteration, and β = 2. Why β ≥ 1: with unlimited data the sigmoid loss is
    minimized by π ∝ π_ref^(1-1/β) · p_data^(1/β), so β = 1 jumps to p_data in one iteration
    whatever the reference (α and h would not matter), β < 1 overshoots past p_data, and
    β = 2 moves halfway (geometrically) from π_ref toward p_data, which is where the
    reference's regularization shows.
    """

    # -- model and data ---------------------------------------------------------------------
    model: str | None = None
    """HF model name or local directory of the base π_0; None: the tiny world's SFT base."""
    dataset: str | None = None
    """`datasets` source of (prompt, real response) pairs: a hub name or a local
    json/jsonl/parquet/csv file or folder; None: the tiny world's SFT data."""
    dataset_split: str = "train"
    """Split of `dataset` to read."""
    prompt_column: str = "prompt"
    """Column of `dataset` holding the prompts."""
    response_column: str = "response"
    """Column of `dataset` holding the real responses."""
    messages_column: str | None = None
    """Read a chat column instead (e.g. "real" of the SPIN data): first user turn = prompt,
    last assistant turn = response."""
    max_examples: int | None = None
    """Use only the first this many examples (None: all)."""
    max_prompt_length: int = 64
    """Prompts longer than this keep their last tokens."""
    max_new_tokens: int | None = None
    """Length cap L of responses (generation and training); None: the tiny world's L (7),
    else 256."""

    # -- self-play -------------------------------------------------------------------------
    alpha: float = 0.95
    """α in π_ref ∝ π_0^(1-α)·M_h^α; 1 = no regularization toward the base (SPIN, FP)."""
    history: int | str = 2
    """h, the number of latest iterates averaged in M_h (capped by those that exist), or
    "all" for fictitious play over π_0..π_t."""
    sampler: str = "auto"
    """Opponent sampler: "exact" (α = 1: the arithmetic mixture sampled exactly), "ancestral"
    (y' ~ π_t, the cheap baseline for α < 1), "importance" (SIR), "smc", "gflownet";
    "auto" = "exact" when α = 1, else "importance". Whenever π_ref is a normalized model (α = 1,
    or t = 0 where π_ref = π_0) it is sampled exactly, whatever this says."""
    proposal: str = "history"
    """Proposal of the importance sampler: "history" (M_h), "local" (the local product
    q_loc(v|s) ∝ π_0^(1-α)·M_h^α per token), "current" (π_t)."""
    num_candidates: int = 16
    """K, proposals per draw of the importance sampler."""
    num_particles: int = 16
    """N, particles per draw of the SMC sampler (proposal: the local product)."""
    gflownet_steps: int = 200
    """Training steps of the GFlowNet sampler at every iteration (fitted on the prompts)."""
    gflownet_lr: float = 2e-3
    """Learning rate of the GFlowNet sampler."""
    generation_chunk: int = 64
    """Prompts per generation call; each chunk is seeded by its index (the unit of data
    parallelism, so results do not depend on the number of processes)."""

    # -- loss and optimization -------------------------------------------------------------
    beta: float = 2.0
    """β, the reward scale of the SPIN loss (SPIN: 0.1 for 7B models)."""
    loss_type: str = "sigmoid"
    """"sigmoid" (SPIN/DPO), "hinge" or "ipo"."""
    iterations: int = 3
    """Self-play iterations (iterates π_1..π_iterations); may be raised when resuming."""
    epochs: int = 2
    """Passes over the iteration's data when training π_(t+1) (SPIN: 2)."""
    optimizer: str = "adamw"
    """"adamw", "rmsprop" (SPIN's) or "sgd"; a fresh optimizer every iteration."""
    learning_rate: float = 1e-3
    """Peak learning rate (SPIN: 5e-7 for 7B models)."""
    lr_scheduler: str = "constant"
    """"constant", "linear" or "cosine" decay over each iteration's steps (after warmup)."""
    warmup_ratio: float = 0.0
    """Fraction of each iteration's steps with linear warmup (SPIN: 0.1)."""
    weight_decay: float = 0.0
    """Weight decay of the optimizer."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm (None: no clipping)."""
    batch_size: int = 32
    """Examples per micro-batch, over all processes together (each takes an equal share)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size × this)."""
    finetuning: str = "lora"
    """"lora": iterates are LoRA adapters on one base; "full": full copies of the model."""
    lora_rank: int = 16
    """LoRA rank r of the iterates."""
    lora_alpha: int = 16
    """LoRA scaling numerator of the iterates (not the α of α-SPIN)."""

    # -- run -------------------------------------------------------------------------------
    seed: int = 0
    """Seed of everything stochastic (adapter init, generation chunks, batch order)."""
    output_dir: str = "runs/alpha_spin"
    """Where the manifest, data, iterates and metrics go (a run resumes from here)."""
    device: str | None = None
    """"cpu", "cuda", ...; None: the accelerate process's device (CUDA when present)."""
    progress: bool = True
    """Show progress bars (main process only)."""

    def __post_init__(self) -> None:
        if isinstance(self.history, str) and self.history.strip().isdigit():
            self.history = int(self.history)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the bad setting and the fix (before any model work)."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

        if not (isinstance(self.alpha, int | float) and 0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        if self.history != "all" and (
            isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1
        ):
            raise ValueError(f"history={self.history!r} must be a positive integer or 'all'")
        for name, value, allowed in (
            ("sampler", self.sampler, SAMPLERS),
            ("proposal", self.proposal, PROPOSALS),
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("finetuning", self.finetuning, FINETUNING),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {allowed}")
        if self.sampler == "exact" and self.alpha not in (0.0, 1.0):
            raise ValueError(
                f"sampler='exact' needs alpha=1 (π_ref is then an arithmetic mixture); with "
                f"alpha={self.alpha} π_ref is a geometric mixture: use sampler='importance', "
                "'smc', 'gflownet' or the 'ancestral' baseline"
            )

        def number(name: str, low: float, *, low_open: bool, high: float = math.inf) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and value <= high
            ok = ok and (value > low if low_open else value >= low)
            if not ok:
                bound = f"> {low:g}" if low_open else f">= {low:g}"
                upper = f" and < {high:g}" if high != math.inf else ""
                raise ValueError(f"{name}={value!r} must be a finite number {bound}{upper}")

        number("beta", 0.0, low_open=True)
        number("learning_rate", 0.0, low_open=True)
        number("gflownet_lr", 0.0, low_open=True)
        number("weight_decay", 0.0, low_open=False)
        number("warmup_ratio", 0.0, low_open=False, high=1.0)
        if self.warmup_ratio == 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0.0, low_open=True)
        for name in (
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
            positive(name)
        if (
            isinstance(self.gflownet_steps, bool)
            or not isinstance(self.gflownet_steps, int)
            or self.gflownet_steps < 0
        ):
            raise ValueError(f"gflownet_steps={self.gflownet_steps!r} must be an integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")
        if self.max_new_tokens is not None:
            positive("max_new_tokens")
        if self.max_examples is not None:
            positive("max_examples")
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
        """The sampler actually used for a geometric-mixture reference."""
        if self.sampler != "auto":
            return self.sampler
        return "exact" if self.alpha in (0.0, 1.0) else "importance"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AlphaSpinConfig:
        return dataclass_from_dict(cls, values)


# -- 1. the reference ------------------------------------------------------------------------


def history_indices(t: int, history: int | str) -> list[int]:
    """Indices of the iterates averaged in M_h at iteration t, newest first."""
    if history == "all":
        return list(range(t, -1, -1))
    return list(range(t, max(t - int(history), -1), -1))


def history_mixture(iterates: Sequence[Density], history: int | str) -> Density:
    """``M_h = (1/h) Σ_{i<h} π_{t-i}`` (the iterate itself when h = 1), t = len(iterates) - 1."""
    members = [iterates[i] for i in history_indices(len(iterates) - 1, history)]
    if len(members) == 1:
        return members[0]
    return ArithmeticMixture(members, [1.0 / len(members)] * len(members))


def build_reference(iterates: Sequence[Density], alpha: float, history: int | str) -> Density:
    """The opponent ``π_ref ∝ π_0^{1-α} · M_h^α`` from ``iterates = [π_0, ..., π_t]``.

    α = 1 returns ``M_h`` itself (π_t when h = 1: plain SPIN), a normalized density. When M_h
    is π_0 alone (t = 0), π_ref = π_0 for every α. Otherwise a GeometricMixture
    ``[π_0, M_h]`` with weights ``[1-α, α]`` (unnormalized; its normalizer cancels in the loss).
    """
    mixture = history_mixture(iterates, history)
    if alpha == 1.0 or mixture is iterates[0]:
        return mixture
    if alpha == 0.0:
        return iterates[0]
    return GeometricMixture([iterates[0], mixture], [1.0 - alpha, alpha])


def opponent_sampler(
    config: AlphaSpinConfig,
    reference: Density,
    iterates: Sequence[Policy],
    *,
    max_new_tokens: int,
    iteration: int,
    fit_prompts: Sequence[Sequence[int]] | None = None,
) -> Any:
    """The sampler drawing y' for iteration t (``iterates = [π_0, ..., π_t]``).

    A normalized reference (α = 1, or π_0 at t = 0) is always sampled exactly. Otherwise:
    "ancestral" draws from π_t (reference log-probs still come from π_ref), "importance"
    resamples K proposals (M_h, the local product or π_t), "smc" runs N particles from the
    local product, "gflownet" fits a GFlowNet adapter on ``fit_prompts`` first.
    """
    # Submodules, not the package: an editable install made before samplers/__init__.py
    # existed maps ``samplers`` to a namespace package outside the repository root.
    from samplers.ancestral import AncestralSampler, ArithmeticMixtureSampler

    kind = config.resolved_sampler()
    if reference.normalized:
        if isinstance(reference, ArithmeticMixture):
            return ArithmeticMixtureSampler(
                reference.components, reference.weights, max_new_tokens=max_new_tokens
            )
        return AncestralSampler(reference, max_new_tokens=max_new_tokens)
    if kind == "ancestral":
        return AncestralSampler(iterates[-1], max_new_tokens=max_new_tokens, target=reference)
    if kind == "importance":
        proposal = {
            "history": lambda: history_mixture(iterates, config.history),
            "local": lambda: reference.local_product(),
            "current": lambda: iterates[-1],
        }[config.proposal]()
        from samplers.importance import ImportanceResampler

        return ImportanceResampler(
            reference, proposal, config.num_candidates, max_new_tokens=max_new_tokens
        )
    if kind == "smc":
        from samplers.smc import SMCSampler

        return SMCSampler(reference, config.num_particles, max_new_tokens=max_new_tokens)
    if kind == "gflownet":
        from samplers.gflownet import GFlowNetSampler

        sampler = GFlowNetSampler(
            reference,
            iterates[-1],  # a LoRA iterate carries the GFlowNet's adapter stacked on its own
            max_new_tokens=max_new_tokens,
            steps=config.gflownet_steps,
            learning_rate=config.gflownet_lr,
            adapter_name=f"gflownet_{iteration}",
            seed=derive_seed(config.seed, "gflownet", iteration),
        )
        sampler.fit(list(fit_prompts or []), progress=False)
        return sampler
    raise ValueError(f"sampler={kind!r} cannot sample a geometric-mixture reference")


# -- 2. the iteration's data -----------------------------------------------------------------


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed for one stochastic step, from the run seed and the step's name."""
    blob = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


@dataclass
class Examples:
    """The encoded (prompt, real response) pairs of a run, in dataset order."""

    prompts: list[str]
    responses: list[str]
    prompt_ids: list[list[int]]
    real_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


def encode_examples(
    pairs: Any, tokenizer: Any, *, max_prompt_length: int, max_new_tokens: int
) -> Examples:
    """Token ids of every pair through :func:`gfn_spin.data.encode_example`."""
    prompt_ids, real_ids = [], []
    for prompt, response in zip(pairs["prompt"], pairs["response"], strict=True):
        p, r = encode_example(
            tokenizer,
            prompt,
            response,
            max_prompt_length=max_prompt_length,
            max_new_tokens=max_new_tokens,
        )
        prompt_ids.append(p)
        real_ids.append(r)
    return Examples(list(pairs["prompt"]), list(pairs["response"]), prompt_ids, real_ids)


def check_context_fits(
    examples: Examples, context: int | None, config: AlphaSpinConfig, max_new_tokens: int
) -> None:
    """Refuse, before any work, prompts plus responses that do not fit the model's context.

    The message names the setting to change: ``max_new_tokens`` when responses alone fill
    the context, else ``max_prompt_length`` (the longest prompt keeps its last tokens).
    """
    if context is None:
        return
    if max_new_tokens >= context:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of {context} tokens; lower --max-new-tokens below {context}"
        )
    longest = max(len(p) for p in examples.prompt_ids)
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompts of up to {longest} tokens (max_prompt_length={config.max_prompt_length}) "
            f"plus max_new_tokens={max_new_tokens} exceed the model's context of {context} "
            f"tokens; lower --max-prompt-length to {context - max_new_tokens} or less (longer "
            "prompts keep their last tokens), or lower --max-new-tokens"
        )


@torch.no_grad()
def reference_logps(
    reference: Density,
    prompt_ids: Sequence[Sequence[int]],
    real_ids: Sequence[Sequence[int]],
    generated_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_token_id: int,
) -> tuple[list[float], list[float]]:
    """``log π̃_ref`` of the real and generated responses, one pass (both stacked)."""
    ids, lengths = pad_responses(list(real_ids) + list(generated_ids), max_new_tokens, pad_token_id)
    logps = reference.log_prob(list(prompt_ids) * 2, ids, lengths).double().cpu()
    return logps[: len(real_ids)].tolist(), logps[len(real_ids) :].tolist()


def make_iteration_data(
    sampler: Any,
    reference: Density,
    examples: Examples,
    *,
    tokenizer: Any,
    max_new_tokens: int,
    chunk: int,
    seed: int,
    dist: Distributed,
    progress: bool = False,
) -> dict[str, list[Any]]:
    """One y' per example, and the reference log-probs of y and y', as parquet columns.

    Chunks of ``chunk`` examples go round-robin to the processes; chunk c is drawn with seed
    ``derive_seed(seed, c)``, so the result does not depend on the number of processes.
    """
    pad = reference.pad_token_id
    starts = list(range(0, len(examples), chunk))
    mine: dict[int, tuple[list[list[int]], list[float], list[float]]] = {}
    for start in tqdm(starts[dist.rank :: dist.size], desc="opponent", disable=not progress):
        part = slice(start, start + chunk)
        prompts = examples.prompt_ids[part]
        samples = sampler.sample(prompts, 1, generator=derive_seed(seed, start))
        generated = [list(r) for r in samples.responses()]
        ref_real, ref_generated = reference_logps(
            reference,
            prompts,
            examples.real_ids[part],
            generated,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        mine[start] = (generated, ref_real, ref_generated)
    merged: dict[int, Any] = {}
    for part in dist.gather_objects(mine):
        merged.update(part)
    generated_ids, ref_real, ref_generated = [], [], []
    for start in starts:
        generated_ids += merged[start][0]
        ref_real += merged[start][1]
        ref_generated += merged[start][2]
    generated_texts = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)
    return {
        "prompt": examples.prompts,
        "real": [
            chat_messages(p, r) for p, r in zip(examples.prompts, examples.responses, strict=True)
        ],
        "generated": [
            chat_messages(p, g) for p, g in zip(examples.prompts, generated_texts, strict=True)
        ],
        "prompt_ids": examples.prompt_ids,
        "real_ids": examples.real_ids,
        "generated_ids": generated_ids,
        "ref_real_logps": ref_real,
        "ref_generated_logps": ref_generated,
    }


# -- 3. the new iterate and its training -----------------------------------------------------


def lora_config(config: AlphaSpinConfig) -> Any:
    return adapters.default_lora_config(rank=config.lora_rank, alpha=config.lora_alpha)


def new_iterate(
    iterates: Sequence[Policy], config: AlphaSpinConfig, t: int
) -> tuple[Policy, list[torch.nn.Parameter]]:
    """π_{t+1}, trainable, equal to π_t; and its trainable parameters.

    LoRA: a new adapter ``iter_{t+1}`` on the base, its weights copied from π_t's adapter (a
    fresh adapter, equal to the base, at t = 0). Full: a deep copy of π_t's model.
    """
    torch.manual_seed(derive_seed(config.seed, "init", t))
    base, current = iterates[0], iterates[-1]
    if config.finetuning == "full":
        model = copy.deepcopy(current.model)
        model.requires_grad_(True)
        policy = Policy(model, current.tokenizer, allowed_token_ids=current.allowed_token_ids)
        return policy, list(model.parameters())
    name = iterate_name(t + 1)
    policy = base.add_adapter(name, lora_config(config))
    named = dict(policy.model.named_parameters())
    if current.adapter is not None:
        source = f".{current.adapter}."
        with torch.no_grad():
            for param_name, param in named.items():
                if source in param_name:
                    named[param_name.replace(source, f".{name}.")].copy_(param)
    marker = f".{name}."
    trainable = []
    for param_name, param in named.items():
        param.requires_grad_(marker in param_name)
        if marker in param_name:
            trainable.append(param)
    return policy, trainable


def freeze(policy: Policy, parameters: Sequence[torch.nn.Parameter]) -> None:
    for param in parameters:
        param.requires_grad_(False)
    policy.model.eval()


def make_optimizer(
    config: AlphaSpinConfig, parameters: Sequence[torch.nn.Parameter], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    from transformers import get_scheduler

    cls = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
    optimizer = cls[config.optimizer](
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


def train_iterate(
    policy: Policy,
    parameters: Sequence[torch.nn.Parameter],
    data: Any,
    config: AlphaSpinConfig,
    *,
    iteration: int,
    max_new_tokens: int,
    dist: Distributed,
) -> dict[str, float]:
    """Minimize the SPIN loss of ``policy`` on an iteration's data; returns training metrics.

    Each global micro-batch of ``batch_size`` rows is split across processes; each process's
    loss is the sum over its rows divided by the global row count, and gradients are summed
    across processes, so the update is the global-batch mean wherever it runs. One
    teacher-forced pass per micro-batch scores y and y' together.
    """
    pad = policy.pad_token_id
    real_ids, real_lengths = pad_responses(data["real_ids"], max_new_tokens, pad)
    generated_ids, generated_lengths = pad_responses(data["generated_ids"], max_new_tokens, pad)
    ref_real = torch.tensor(data["ref_real_logps"], dtype=torch.float64)
    ref_generated = torch.tensor(data["ref_generated_logps"], dtype=torch.float64)
    prompt_ids = [list(p) for p in data["prompt_ids"]]
    rows_per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = len(prompt_ids) // rows_per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(prompt_ids)} examples are fewer than one optimizer step of batch_size × "
            f"gradient_accumulation_steps = {rows_per_step}; lower batch_size"
        )
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = make_optimizer(config, parameters, total_steps)
    totals = torch.zeros(5, dtype=torch.float64)  # loss, real reward, generated reward, wins, rows
    policy.model.train()
    bar = tqdm(
        total=steps_per_epoch * config.epochs,
        desc=f"train π_{iteration + 1}",
        disable=not (config.progress and dist.is_main),
        leave=False,
    )
    for epoch in range(config.epochs):
        order = torch.randperm(
            len(prompt_ids),
            generator=torch.Generator().manual_seed(
                derive_seed(config.seed, "order", iteration, epoch)
            ),
        )
        for step in range(steps_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            for micro in range(config.gradient_accumulation_steps):
                start = (step * config.gradient_accumulation_steps + micro) * config.batch_size
                rows = order[start : start + config.batch_size][dist.rank :: dist.size]
                if len(rows) == 0:
                    continue
                prompts = [prompt_ids[i] for i in rows.tolist()]
                logps = policy.log_prob(
                    prompts + prompts,
                    torch.cat([real_ids[rows], generated_ids[rows]]),
                    torch.cat([real_lengths[rows], generated_lengths[rows]]),
                )
                policy_real, policy_generated = logps[: len(rows)], logps[len(rows) :]
                ref_r, ref_g = ref_real[rows].to(logps.device), ref_generated[rows].to(logps.device)
                losses = spin_loss(
                    policy_real,
                    policy_generated,
                    ref_r,
                    ref_g,
                    beta=config.beta,
                    loss_type=config.loss_type,
                )
                if not bool(torch.isfinite(losses).all()):
                    raise FloatingPointError(
                        f"the SPIN loss of π_{iteration + 1} is not finite at optimizer step "
                        f"{epoch * steps_per_epoch + step + 1} of {total_steps} (epoch "
                        f"{epoch + 1}); nothing of this iteration is saved. Lower "
                        "learning_rate or beta, or set max_grad_norm"
                    )
                (losses.sum() / rows_per_step).backward()
                with torch.no_grad():
                    reward_real = config.beta * (policy_real.double() - ref_r)
                    reward_generated = config.beta * (policy_generated.double() - ref_g)
                    totals += torch.stack(
                        [
                            losses.detach().double().sum(),
                            reward_real.sum(),
                            reward_generated.sum(),
                            (reward_real > reward_generated).double().sum(),
                            torch.tensor(float(len(rows)), dtype=torch.float64),
                        ]
                    ).cpu()
            dist.sum_gradients(parameters)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                finite = all(bool(torch.isfinite(p).all()) for p in parameters)
            if not finite:
                raise FloatingPointError(
                    f"the weights of π_{iteration + 1} became non-finite at optimizer step "
                    f"{epoch * steps_per_epoch + step + 1} of {total_steps} (epoch {epoch + 1}); "
                    "nothing of this iteration is saved. Lower learning_rate, or set "
                    "max_grad_norm"
                )
            bar.update(1)
    bar.close()
    policy.model.eval()
    totals = dist.sum_tensor(totals)
    count = float(totals[4])
    return {
        "train/loss": float(totals[0]) / count,
        "train/rewards_real": float(totals[1]) / count,
        "train/rewards_generated": float(totals[2]) / count,
        "train/margin": float(totals[1] - totals[2]) / count,
        "train/accuracy": float(totals[3]) / count,
        "train/steps": steps_per_epoch * config.epochs,
    }


# -- 4. the run directory: atomic steps listed in a manifest ---------------------------------


def comparable_config(config: AlphaSpinConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in RESUMABLE_FIELDS}


def save_iterate(policy: Policy, target: Path) -> None:
    """Write the iterate into a temporary folder, then rename it into place."""
    with atomic_directory(target) as tmp:
        policy.save_pretrained(tmp)


def _adapter_folder(directory: Path) -> Path:
    """Where ``adapter_config.json`` is (peft nests non-"default" adapters in a subfolder)."""
    found = sorted(directory.rglob("adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"no adapter_config.json under {directory}")
    return found[0].parent


def load_iterate(
    iterates: Sequence[Policy], directory: Path, t: int, config: AlphaSpinConfig
) -> Policy:
    """π_t from its saved folder, frozen (a named adapter on the base, or a full model)."""
    base = iterates[0]
    if config.finetuning == "full":
        policy = Policy.from_pretrained(
            directory,
            device=base.device,
            dtype=next(base.model.parameters()).dtype,
            allowed_token_ids=base.allowed_token_ids,
        )
        policy.model.requires_grad_(False)
        return policy
    policy = base.load_adapter(_adapter_folder(directory), iterate_name(t))
    return policy


# -- the trainer -----------------------------------------------------------------------------


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class AlphaSpinTrainer:
    """Runs α-SPIN iterations for a config; resumable from ``config.output_dir``.

    Args:
        config: the run's :class:`AlphaSpinConfig`.
        policy: the base π_0 (reading its base weights); default: ``config.model`` loaded with
            ``Policy.from_pretrained``, or the tiny world's base. The trainer adds adapters to
            its model.
        dataset: (prompt, response) pairs (a ``datasets.Dataset`` or a source for
            :func:`gfn_spin.data.load_pairs`); default: ``config.dataset`` or the tiny
            world's SFT data.
        world: the tiny world to use when the model or data come from it (default: built with
            :func:`gfn_spin.toyworld.build_world`).
        evaluate: ``policy -> {name: float}`` run on π_0 and every new iterate (main process);
            default on the tiny world: :class:`ToyWorldEvaluator` (exact KLs).

    ``train()`` returns one record per iterate: ``{"iteration": t, "metrics": {...},
    "seconds": {...}}`` (iteration 0 is the base).
    """

    def __init__(
        self,
        config: AlphaSpinConfig,
        *,
        policy: Policy | None = None,
        dataset: Any = None,
        world: Any = None,
        evaluate: Callable[[Density], dict[str, float]] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.dist = Distributed(config.device)
        uses_world = policy is None and config.model is None
        uses_world = uses_world or (dataset is None and config.dataset is None)
        if uses_world and world is None:
            from gfn_spin.toyworld import build_world

            world = build_world(device="cpu")
        self.world = world if uses_world else None
        device = torch.device(config.device) if config.device else self.dist.device
        if policy is None:
            if config.model is None:
                policy = world.load_policy("base", device=device, dtype=torch.float32)
            else:
                policy = Policy.from_pretrained(config.model, device=device)
        if policy.adapter is not None:
            raise ValueError(
                f"policy reads adapter {policy.adapter!r}; give the base policy (adapter=None)"
            )
        self.base = policy
        self.max_new_tokens = config.max_new_tokens or (
            world.max_new_tokens if self.world is not None else 256
        )
        if dataset is None and config.dataset is None:
            pairs = load_pairs(
                world.sft_dataset.select_columns(["prompt", "response"]),
                max_examples=config.max_examples,
            )
        else:
            pairs = load_pairs(
                dataset if dataset is not None else config.dataset,
                split=config.dataset_split,
                prompt_column=config.prompt_column,
                response_column=config.response_column,
                messages_column=config.messages_column,
                max_examples=config.max_examples,
            )
        check_no_special_tokens(policy.tokenizer, pairs["prompt"], "the dataset's prompts")
        check_no_special_tokens(policy.tokenizer, pairs["response"], "the dataset's responses")
        self.examples = encode_examples(
            pairs,
            policy.tokenizer,
            max_prompt_length=config.max_prompt_length,
            max_new_tokens=self.max_new_tokens,
        )
        check_context_fits(self.examples, policy.max_context, config, self.max_new_tokens)
        if len(self.examples) < config.batch_size * config.gradient_accumulation_steps:
            raise ValueError(
                f"{len(self.examples)} examples are fewer than one optimizer step "
                f"(batch_size × gradient_accumulation_steps = "
                f"{config.batch_size * config.gradient_accumulation_steps}); lower batch_size"
            )
        if evaluate is None and self.world is not None and policy.allowed_token_ids is not None:
            evaluate = ToyWorldEvaluator(self.world)
        self.evaluate = evaluate
        identity = {"config": comparable_config(config), DATA_HASH: pairs_fingerprint(pairs)}
        if self.world is not None:
            identity["world"] = self.world.config.key()
        self.identity = identity

    def _show(self) -> bool:
        return self.config.progress and self.dist.is_main

    def _evaluate(self, policy: Density) -> dict[str, float]:
        metrics = self.evaluate(policy) if (self.evaluate and self.dist.is_main) else {}
        return self.dist.broadcast_object(metrics)

    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) all iterations; returns the per-iterate records.

        The run folder is locked for the whole call: a second run on the same ``output_dir``
        is refused with :class:`gfn_spin.io.DirectoryInUseError`.
        """
        run = RunDirectory(self.config.output_dir, self.identity, self.dist, RESUMABLE_FIELDS)
        try:
            return self._train(run)
        finally:
            run.close()

    def _train(self, run: RunDirectory) -> list[dict[str, Any]]:
        cfg, dist = self.config, self.dist
        iterates: list[Policy] = [self.base]
        if not run.done("eval_0"):
            started = time.perf_counter()
            metrics = self._evaluate(self.base)
            record = {"iteration": 0, "metrics": metrics}
            record["seconds"] = {"eval": time.perf_counter() - started}
            run.complete("eval_0", record)
        for t in tqdm(range(cfg.iterations), desc="α-SPIN", disable=not self._show()):
            if run.done(f"train_{iterate_name(t + 1)}"):
                iterates.append(load_iterate(iterates, run.iterate_path(t + 1), t + 1, cfg))
                continue
            timer = _Timer()
            reference = build_reference(iterates, cfg.alpha, cfg.history)
            if not run.done(f"data_{t}"):
                started = time.perf_counter()
                sampler = opponent_sampler(
                    cfg,
                    reference,
                    iterates,
                    max_new_tokens=self.max_new_tokens,
                    iteration=t,
                    fit_prompts=self.examples.prompt_ids,
                )
                columns = make_iteration_data(
                    sampler,
                    reference,
                    self.examples,
                    tokenizer=self.base.tokenizer,
                    max_new_tokens=self.max_new_tokens,
                    chunk=cfg.generation_chunk,
                    seed=derive_seed(cfg.seed, "generate", t),
                    dist=dist,
                    progress=self._show(),
                )
                if dist.is_main:
                    write_parquet(columns, run.data_path(t))
                timer.add("generate", started)
                run.complete(f"data_{t}")
            data = load_parquet(run.data_path(t))
            started = time.perf_counter()
            policy, parameters = new_iterate(iterates, cfg, t)
            metrics = train_iterate(
                policy,
                parameters,
                data,
                cfg,
                iteration=t,
                max_new_tokens=self.max_new_tokens,
                dist=dist,
            )
            freeze(policy, parameters)
            timer.add("train", started)
            if dist.is_main:
                save_iterate(policy, run.iterate_path(t + 1))
            started = time.perf_counter()
            metrics.update(self._evaluate(policy))
            timer.add("eval", started)
            iterates.append(policy)
            record = {"iteration": t + 1, "metrics": metrics, "seconds": timer.seconds}
            run.complete(f"train_{iterate_name(t + 1)}", record)
        return [r for r in run.records if r["iteration"] <= cfg.iterations]
