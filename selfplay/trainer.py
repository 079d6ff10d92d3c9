"""α-SPIN: self-play fine-tuning against a KL-regularized reference, top to bottom
(docs/alpha_spin.md).

For alignment researchers running SPIN, α-SPIN or fictitious play on an HF model and a
``datasets`` source (or a world's base and SFT data, e.g. the tiny world's). Iterates π_0 (the base), π_1, ..., π_t are
named LoRA adapters on one set of base weights (or full copies with ``finetuning="full"``).
Iteration t, in :meth:`AlphaSpinTrainer.train`:

1. :func:`selfplay.reference.build_reference`: ``π_ref ∝ π_0^{1-α} · M_h^α``.
2. the opponent factory (:func:`selfplay.opponents.opponent_sampler` by default) +
   :func:`selfplay.generation.make_iteration_data`:
   one y' per example, and the reference log-probs of y and y' computed once and stored with
   the data (parquet), so training keeps only the policy in memory. A GFlowNet opponent is
   saved in ``opponents/`` and warm-starts the next iteration's fit. With
   ``probe_prompts > 0`` (α < 1), :mod:`selfplay.probe` measures the opponent's KL to π_ref
   (or, for SIR and SMC, an upper bound on it) on a few prompts.
3. :func:`selfplay.iterates.new_iterate` + :func:`selfplay.iterate_training.train_iterate`: π_{t+1}
   starts from π_t and minimizes ``objectives.spin.spin_loss``.
4. evaluate, save the iterate and record the metrics; every step is atomic and listed in a
   manifest (:class:`selfplay.run_directory.RunDirectory`), so a killed run restarted with the
   same command ends with the same results.

Data parallel under ``accelerate launch``: generation is split in seeded chunks and gathered,
training goes through ``accelerate.Accelerator``; every process ends with the same weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from gfn_spin.data import check_no_special_tokens
from gfn_spin.density import Density
from gfn_spin.devices import check_device, resolve_device
from gfn_spin.io import write_json_atomic
from gfn_spin.policy import Policy
from samplers.base import Sampler
from selfplay.config import RUN_RESUMABLE_FIELDS, AlphaSpinConfig, derive_seed
from selfplay.generation import make_iteration_data, opponent_metrics
from selfplay.iterate_training import train_iterate
from selfplay.iterates import freeze, iterate_name, load_iterate, new_iterate, save_iterate
from selfplay.iteration_data import encode_examples, read_iteration_data, write_iteration_data
from selfplay.opponents import OpponentFactory, opponent_sampler
from selfplay.pairs import load_pairs, pairs_fingerprint
from selfplay.probe import opponent_probe
from selfplay.reference import build_reference
from selfplay.run_directory import DATA_HASH, RunDirectory


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def make_accelerator(config: AlphaSpinConfig) -> Accelerator:
    """The run's ``Accelerator``: gloo when the launcher started several CPU processes (or
    ``config.device`` is the CPU), the config's accumulation steps, and the policy left on
    the device it was loaded on."""
    return Accelerator(
        cpu=resolve_device(config.device).type == "cpu",
        device_placement=False,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


class World(Protocol):
    """What the trainer reads of a world whose base policy or SFT data it uses (for example
    ``worlds.toy.ToyWorld``); the trainer names no world, so worlds may sit above it."""

    sft_data: Any

    @property
    def max_new_tokens(self) -> int: ...

    def load_policy(self, name: str = "base", **kwargs: Any) -> Policy: ...

    def key(self) -> str: ...

    def evaluator(self) -> Callable[[Density], dict[str, float]]: ...


def check_context_fits(
    prompt_ids: Sequence[Sequence[int]],
    context: int | None,
    max_new_tokens: int,
    max_prompt_length: int,
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
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompts of up to {longest} tokens (max_prompt_length={max_prompt_length}) "
            f"plus max_new_tokens={max_new_tokens} exceed the model's context of {context} "
            f"tokens; lower --max-prompt-length to {context - max_new_tokens} or less (longer "
            "prompts keep their last tokens), or lower --max-new-tokens"
        )


def check_example_count(config: AlphaSpinConfig, examples: int, processes: int) -> None:
    """Refuse, before any work, too few examples for one optimizer step or for the probe's
    prompts, and a batch that leaves a process without rows; the message names the setting."""
    rows_per_step = config.batch_size * config.gradient_accumulation_steps
    if examples < rows_per_step:
        raise ValueError(
            f"{examples} examples are fewer than one optimizer step "
            f"(batch_size × gradient_accumulation_steps = {rows_per_step}); lower batch_size"
        )
    if config.probe_prompts > examples:
        raise ValueError(
            f"probe_prompts={config.probe_prompts} exceeds the {examples} examples whose "
            "prompts it would measure the opponent on; lower probe_prompts"
        )
    if config.batch_size < processes:
        raise ValueError(
            f"batch_size={config.batch_size} gives some of the {processes} processes no rows; "
            "raise batch_size"
        )


class AlphaSpinTrainer:
    """Runs α-SPIN iterations for a config; resumable from ``config.output_dir``.

    Args:
        config: the run's :class:`~selfplay.config.AlphaSpinConfig`.
        policy: the base π_0 (reading its base weights); default: ``config.model`` loaded with
            ``Policy.from_pretrained``, or the world's base. The trainer adds adapters to
            its model.
        dataset: (prompt, response) pairs (a ``datasets.Dataset`` or a source for
            :func:`selfplay.pairs.load_pairs`); default: ``config.dataset`` or the world's SFT
            data.
        world: the world (a :class:`World`, e.g. ``worlds.toy.build_world()``) whose base or
            SFT data is used when no model or no data is given; required then.
        evaluate: ``policy -> {name: float}`` run on π_0 and every new iterate (main process);
            default on a world: its ``evaluator()`` (the tiny world's exact KLs).
        opponents: builds iteration t's opponent sampler
            (:class:`~selfplay.opponents.OpponentFactory`); default:
            :func:`selfplay.opponents.opponent_sampler`, the sampler ``config.sampler`` names.

    ``train()`` returns one record per iterate: ``{"iteration": t, "metrics": {...},
    "seconds": {...}}`` (iteration 0 is the base).
    """

    def __init__(
        self,
        config: AlphaSpinConfig,
        *,
        policy: Policy | None = None,
        dataset: Any = None,
        world: World | None = None,
        evaluate: Callable[[Density], dict[str, float]] | None = None,
        opponents: OpponentFactory = opponent_sampler,
    ) -> None:
        config.validate()
        self.config = config
        self.opponents = opponents
        self.accelerator = make_accelerator(config)
        uses_world = policy is None and config.model is None
        uses_world = uses_world or (dataset is None and config.dataset is None)
        if uses_world and world is None:
            raise ValueError(
                "no model or no dataset is given and no world to take them from: give model and "
                "dataset, or world= (e.g. worlds.toy.build_world())"
            )
        self.world = world if uses_world else None
        device = check_device(config.device) if config.device else self.accelerator.device
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
            pairs = load_pairs(world.sft_data, max_examples=config.max_examples)
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
            pad_token_id=policy.pad_token_id,
        )
        check_context_fits(
            self.examples.prompt_ids,
            policy.max_context,
            self.max_new_tokens,
            config.max_prompt_length,
        )
        check_example_count(config, len(self.examples), self.accelerator.num_processes)
        if evaluate is None and self.world is not None and policy.allowed_token_ids is not None:
            evaluate = self.world.evaluator()
        self.evaluate = evaluate
        identity = {"config": comparable_config(config), DATA_HASH: pairs_fingerprint(pairs)}
        if self.world is not None:
            identity["world"] = self.world.key()
        self.identity = identity

    def _show(self) -> bool:
        return self.config.progress and self.accelerator.is_main_process

    def _evaluate(self, policy: Density) -> dict[str, float]:
        main = self.accelerator.is_main_process
        metrics = [self.evaluate(policy) if (self.evaluate and main) else {}]
        return broadcast_object_list(metrics)[0]

    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) all iterations; returns the per-iterate records.

        The run folder is locked for the whole call: a second run on the same ``output_dir``
        is refused with :class:`gfn_spin.io.DirectoryInUseError`.
        """
        run = RunDirectory(
            self.config.output_dir, self.identity, self.accelerator, RUN_RESUMABLE_FIELDS
        )
        try:
            return self._train(run)
        finally:
            run.close()

    def _train(self, run: RunDirectory) -> list[dict[str, Any]]:
        cfg, accelerator = self.config, self.accelerator
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
                self._draw_data(run, t, reference, iterates, timer)
            data = read_iteration_data(
                run.data_path(t),
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.base.pad_token_id,
            )
            started = time.perf_counter()
            policy, parameters = new_iterate(iterates, cfg, t)
            metrics = train_iterate(
                policy, parameters, data, cfg, iteration=t, accelerator=accelerator
            )
            freeze(policy, parameters)
            timer.add("train", started)
            if _opponent_path(run, t).is_file():
                metrics.update(json.loads(_opponent_path(run, t).read_text(encoding="utf-8")))
            if accelerator.is_main_process:
                save_iterate(policy, run.iterate_path(t + 1))
            started = time.perf_counter()
            metrics.update(self._evaluate(policy))
            timer.add("eval", started)
            iterates.append(policy)
            record = {"iteration": t + 1, "metrics": metrics, "seconds": timer.seconds}
            run.complete(f"train_{iterate_name(t + 1)}", record)
        return [r for r in run.records if r["iteration"] <= cfg.iterations]

    def _draw_data(
        self,
        run: RunDirectory,
        t: int,
        reference: Density,
        iterates: Sequence[Policy],
        timer: _Timer,
    ) -> None:
        """Iteration t's step ``data_t``: the opponent's y' and the reference log-probs
        (parquet), and what the opponent and the probe measured, kept beside the data."""
        cfg, accelerator = self.config, self.accelerator
        started = time.perf_counter()
        previous = None if t == 0 else run.opponent_path(t - 1)
        chunk_stats = []
        sampler = self.opponents(
            cfg,
            reference,
            iterates,
            max_new_tokens=self.max_new_tokens,
            iteration=t,
            fit_prompts=self.examples.prompt_ids,
            warm_start_from=previous if previous and previous.is_dir() else None,
            save_to=run.opponent_path(t) if accelerator.is_main_process else None,
        )
        data = make_iteration_data(
            sampler,
            reference,
            self.examples,
            max_new_tokens=self.max_new_tokens,
            chunk=cfg.generation_chunk,
            seed=derive_seed(cfg.seed, "generate", t),
            state=accelerator,
            progress=self._show(),
            on_stats=chunk_stats.append,
        )
        opponent = opponent_metrics(chunk_stats, accelerator)
        timer.add("generate", started)
        if cfg.probe_prompts > 0 and cfg.alpha < 1.0:
            started = time.perf_counter()
            opponent.update(self._probe(sampler, reference, t))
            timer.add("probe", started)
        started = time.perf_counter()
        if accelerator.is_main_process:
            write_iteration_data(data, self.examples, self.base.tokenizer, run.data_path(t))
            # Kept beside the data, so that a run resumed after it still records them.
            write_json_atomic(opponent, _opponent_path(run, t))
        timer.add("generate", started)
        run.complete(f"data_{t}")

    def _probe(self, sampler: Sampler, reference: Density, t: int) -> dict[str, float]:
        """:func:`selfplay.probe.opponent_probe` of iteration t's opponent on the first
        ``probe_prompts`` prompts, on the main process, broadcast to the others. The reference
        SMC decodes at most ``generation_chunk × num_particles`` particles at once, the SMC
        opponent's own batch."""
        cfg = self.config
        metrics: list[dict[str, float]] = [{}]
        if self.accelerator.is_main_process:
            metrics[0] = opponent_probe(
                sampler,
                reference,
                self.examples.prompt_ids[: cfg.probe_prompts],
                reference_particles=cfg.probe_reference_particles,
                reference_runs=cfg.probe_reference_runs,
                draws=cfg.probe_draws,
                runs=cfg.probe_runs,
                max_new_tokens=self.max_new_tokens,
                seed=derive_seed(cfg.seed, "probe", t),
                batch_size=cfg.generation_chunk * cfg.num_particles,
            )
        return broadcast_object_list(metrics)[0]


def _opponent_path(run: RunDirectory, t: int) -> Path:
    """Where iteration t's opponent metrics (:func:`selfplay.generation.opponent_metrics`) go."""
    return run.data_path(t).with_suffix(".opponent.json")


def comparable_config(config: AlphaSpinConfig) -> dict[str, Any]:
    """The config a resume must match: its JSON values without the resumable fields."""
    return {k: v for k, v in config.to_dict().items() if k not in RUN_RESUMABLE_FIELDS}
