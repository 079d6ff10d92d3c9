"""The GFlowNet sampler: a policy trained with modified SubTB (or TB, or VarGrad) toward any target.

For users who need samples from an intractable product of LM densities (the geometric
mixture ``π_0^{1-α} π_t^α`` of α-SPIN, a KL-regularized target) with an exact ``log_q``:
once fitted, sampling is plain ancestral sampling and the sampler's error to the target can be
measured exactly on small problems, or estimated (ESS, ELBO gap) on large ones. One fit is
amortized over many prompts and generalizes to unseen ones. The math, the parametrizations and
the objectives are in docs/gflownet.md; the policy is built in
:mod:`samplers.gflownet.parametrization`, trained in :mod:`samplers.gflownet.trainer`, and
checkpointed with :class:`gfn_spin.checkpoint.CheckpointDirectory`.

Why one module over 400 lines: it is one class whose fit, draws, saves and loads share one
state (policy, optimizer, checkpoint folder), so they stay side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from pickle import UnpicklingError  # the error class only: nothing is unpickled here
from typing import Any

import torch
from accelerate.utils import broadcast

from gfn_spin.checkpoint import CheckpointDirectory, check_identity, read_step_log
from gfn_spin.checkpoint import latest_checkpoint as latest_in
from gfn_spin.density import Density, PromptLike
from gfn_spin.io import atomic_directory
from gfn_spin.policy import Policy
from gfn_spin.samples import ancestral_sample
from gfn_spin.twisted_local_product import TwistHead
from samplers.base import Draws, Sampler, encode_checked
from samplers.gflownet.config import RESUMABLE_FIELDS, GFlowNetConfig
from samplers.gflownet.parametrization import (
    Parametrization,
    build_parametrization,
    check_files,
    corrupted,
)
from samplers.gflownet.trainer import GFlowNetTrainer, TrainState
from samplers.smc import SMCSampler
from samplers.weighting import is_residual_on_local_product_of

CONFIG_FILE = "gflownet_config.json"
TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
#: What a checkpoint's trainer state holds (the trainer's state_dict less step and metrics).
TRAINER_STATE_KEYS = ("optimizer", "torch_rng", "python_rng", "replay", "batches")
#: The tool named in a GFlowNet checkpoint folder's marker.
CHECKPOINT_TOOL = "samplers.GFlowNetSampler"


class GFlowNetSampler(Sampler):
    """Samples from ``target`` with a policy fitted by modified SubTB (or TB, or VarGrad).

    Args:
        target: any density (typically a :class:`gfn_spin.GeometricMixture`).
        init: the policy the adapter starts from (typically π_t); it may itself be a
            component of ``target``, since it never reads the new adapter, so scoring the
            target is never affected by the adapter being trained. When ``init`` reads LoRA
            adapters (a self-play iterate on shared base weights), the GFlowNet's adapter is
            stacked on top of them; they stay frozen.
        config: a :class:`GFlowNetConfig`; keyword arguments override its fields
            (``max_new_tokens`` is required one way or the other).

    After :meth:`fit`, ``.policy`` is the trained normalized density (score it, sample it,
    enumerate it, or use it as the proposal of ImportanceResampler / SMCSampler).

    ``sample``'s ``stats``: ``ess`` ``[P]`` (absolute ESS of the weights G̃/q over the prompt's
    draws), ``ess_fraction`` (it over ``num_samples``), ``log_z`` (``log mean(G̃/q)``, a lower
    bound in expectation) and ``elbo`` per prompt; ``tokens`` counts the policy's passes, not
    the target scoring of ``log_target``.
    """

    def __init__(
        self,
        target: Density,
        init: Policy,
        config: GFlowNetConfig | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = GFlowNetConfig(**overrides)
        elif overrides:
            config = GFlowNetConfig(**{**asdict(config), **overrides})
        if not isinstance(init, Policy):
            raise TypeError(f"init must be a gfn_spin.Policy, got {type(init).__name__}")
        if target.eos_token_id != init.eos_token_id or target.vocab_size != init.vocab_size:
            raise ValueError("target and init must share the vocabulary and EOS token")
        self.target = target
        self.init = init
        self.max_new_tokens = config.max_new_tokens
        self.weights: Parametrization = build_parametrization(target, init, config)
        self.parametrization = self.weights.name
        self.policy: Density = self.weights.policy
        self.trainer = GFlowNetTrainer(target, self.weights, config)

    # -- what studies and tests read -----------------------------------------------------------

    @property
    def config(self) -> GFlowNetConfig:
        """The settings (the trainer's: it is their one owner)."""
        return self.trainer.config

    @property
    def head(self) -> TwistHead | None:
        """The twist head ("twist"), else None."""
        return getattr(self.weights, "head", None)

    @property
    def adapter_policy(self) -> Policy | None:
        """``init`` read through the LoRA adapter ("lora", "residual"), else None."""
        return getattr(self.weights, "adapter_policy", None)

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates."""
        return self.weights.trainable_parameters

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def state(self) -> TrainState:
        return self.trainer.state

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per logged step: step, loss, log_reward, reward_temperature, lr, (ess_fraction)."""
        return self.trainer.state.metrics

    def train_step(self, prompt_ids: list[list[int]], reward_temperature: float = 1.0) -> dict:
        """One training step toward the target (see :meth:`GFlowNetTrainer.train_step`)."""
        return self.trainer.train_step(prompt_ids, reward_temperature)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """One clipped optimizer step on ``loss`` (see :meth:`GFlowNetTrainer.optimizer_step`)."""
        self.trainer.optimizer_step(loss)

    def learning_rate(self, step: int, total: int) -> float:
        """The scheduled learning rate at ``step`` of a ``total``-step fit."""
        return self.config.learning_rate * self.trainer.lr_factor(step, total)

    # -- training ------------------------------------------------------------------------------

    def warm_start(
        self, source: GFlowNetSampler | str | os.PathLike, *, learning_rate: float | None = None
    ) -> None:
        """Start this fit from another fit's trainable weights instead of the fresh ones.

        ``source`` is a sampler or a folder written by :meth:`save` (or a checkpoint folder).
        What carries over is the correction the GFlowNet learned, for any target whose
        components have the same shapes: the twist head for "twist" (same hidden sizes and
        component count, so the same feature width, and the same head width and depth), the
        LoRA adapter for "lora" and "residual" (same target modules and rank). Only the
        weights are copied; the optimizer, schedules and batch RNG start afresh, as in a
        cold fit under this sampler's seed.

        ``learning_rate``, when given, becomes the fit's peak rate, reached without warmup
        (it is recorded in ``config``): a warm start is already close, and a cold fit's
        peak rate moves it away before it comes back.

        Raises:
            ValueError: naming why it is impossible (a fit already started, another
                parametrization, tensors of other names or shapes); nothing is changed then.
            FileNotFoundError: ``source`` is a folder without a saved GFlowNet.
        """
        if self.state.step:
            raise ValueError(f"a warm start must precede the fit (at step {self.state.step})")
        if isinstance(source, GFlowNetSampler):
            theirs, state = source.parametrization, source.weights.state_dict()
        else:
            directory = Path(source)
            check_files(directory, (CONFIG_FILE,))
            theirs = _read_config(directory)["parametrization"]
            if theirs == self.config.parametrization:
                theirs = self.parametrization  # "auto" then resolves alike on this target
            state = self.weights.read(directory)
        if theirs != self.parametrization:
            raise ValueError(
                f"source parametrization {theirs!r} differs from this sampler's "
                f"{self.parametrization!r}"
            )
        wrong = self.weights.mismatches(state)
        if wrong:
            raise ValueError(
                f"{self.parametrization} weights differ in name or shape from the source's: "
                f"{wrong[:3]}"
            )
        if learning_rate is not None and not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate} must be > 0")
        with torch.no_grad():
            mine = self.weights.state_dict()
            for name, value in state.items():
                mine[name].copy_(value)
        if learning_rate is not None:
            self.trainer.set_peak_learning_rate(learning_rate)

    def refine(
        self, prompts: Sequence[PromptLike], steps: int | None = None, *, progress: bool = False
    ) -> GFlowNetSampler:
        """Semi-amortized refinement: a new sampler, started from this one's weights and fitted
        on ``prompts`` (the prompts about to be served) for ``steps`` (default
        ``config.refine_steps``) steps; this sampler is left as it is.

        An amortized fit carries an error of its own on prompts it saw rarely or never; a few
        steps on those prompts remove most of it at a small share of the fit's cost
        (docs/gflownet.md, "Which prompts to fit on"). The refinement's model tokens are part
        of the cost of the draws it serves: they show in ``model_tokens`` of the new sampler's
        policies, as any fit's.
        """
        config = asdict(self.config)
        config["adapter_name"] = f"{self.config.adapter_name}_refined"
        refined = GFlowNetSampler(self.target, self.init, GFlowNetConfig.from_dict(config))
        refined.warm_start(self)
        refined.fit(
            prompts, self.config.refine_steps if steps is None else steps, progress=progress
        )
        return refined

    def fit(
        self,
        prompts: Sequence[PromptLike],
        steps: int | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        progress: bool = True,
        log_every: int = 10,
        teacher: Density | None = None,
        schedule_steps: int | None = None,
    ) -> list[dict[str, Any]]:
        """Train on ``prompts`` for ``steps`` optimizer steps (default ``config.steps``).

        The learning-rate and reward-temperature schedules span ``schedule_steps`` (default:
        the fit's own ``steps``). To fit in chunks, measuring between them, give every chunk
        the whole fit's length here: the chunks then follow the trajectory of one fit.

        Without ``teacher`` each step is a step of the configured loss toward the target. With
        ``teacher`` (a normalized density over the same vocabulary, typically a more exact but
        costlier GFlowNet policy such as the twisted form), each step distills it instead: the
        sequence-level KL(teacher ‖ policy) on the teacher's draws, token by token.

        With ``checkpoint_dir``, checkpoints (weights, optimizer, RNG, replay buffer, metrics)
        are written atomically every ``config.checkpoint_every`` steps and at the end; with
        ``resume=True`` training continues from the latest one found there (an interrupted
        fit resumes where it stopped). Returns the metrics log.
        """
        prompt_ids = encode_checked(self.init, prompts, self.max_new_tokens)
        # Refuse bad arguments before a checkpoint folder is claimed.
        self.trainer.check_fit(steps, schedule_steps, teacher)
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where checkpoints were written)")
        # Under several processes only the main one claims the folder and writes; every
        # process reads the checkpoint it resumes from.
        folder = None if checkpoint_dir is None else self._claim(checkpoint_dir)
        try:
            latest = None if checkpoint_dir is None else latest_checkpoint(checkpoint_dir)
            if latest is not None and not resume and self.state.step == 0:
                # Starting afresh would replace that fit's checkpoints: never without being asked.
                raise ValueError(
                    f"checkpoint_dir={str(checkpoint_dir)!r} already holds a GFlowNet fit "
                    f"({latest.name}); pass resume=True (--resume) to continue it, or give an "
                    "empty or new checkpoint_dir to start afresh"
                )
            if resume and latest is not None:
                check_identity(
                    checkpoint_dir, _read_config(latest), self._config_json(), RESUMABLE_FIELDS
                )
                self._load_checkpoint(latest)
            self.trainer.fit(
                prompt_ids,
                steps,
                schedule_steps=schedule_steps,
                teacher=teacher,
                evaluate=self.ess,
                checkpoint=None if checkpoint_dir is None else partial(self._save_step, folder),
                progress=progress,
                log_every=log_every,
            )
        finally:
            if folder is not None:
                folder.close()
        return self.state.metrics

    def _claim(self, checkpoint_dir: str | os.PathLike) -> CheckpointDirectory | None:
        """The main process claims ``checkpoint_dir`` (None on the others). Every process learns
        whether it could, so that a refused folder stops them all, instead of leaving the
        others waiting for the main process at the first checkpoint."""
        accelerator = self.trainer.accelerator
        folder, refusal = None, None
        if accelerator.is_main_process:
            try:
                folder = self._checkpoints(checkpoint_dir)
            except Exception as error:  # raised again below, once the others know of it
                refusal = error
        if accelerator.num_processes > 1:
            refused = torch.tensor([int(refusal is not None)], device=accelerator.device)
            if bool(broadcast(refused, from_process=0)) and refusal is None:
                raise RuntimeError(
                    f"the main process could not claim checkpoint_dir={str(checkpoint_dir)!r} "
                    "(its error says why); this process stops with it"
                )
        if refusal is not None:
            raise refusal
        return folder

    def _save_step(self, folder: CheckpointDirectory | None) -> None:
        """Write a checkpoint into ``folder`` (the main process's; None on the others), then
        hold every process until it is written."""
        if folder is not None:
            self._save_into(folder)
        self.trainer.accelerator.wait_for_everyone()

    @torch.no_grad()
    def ess(self, prompts: Sequence[PromptLike], num_samples: int) -> float:
        """Mean over prompts of ESS/N of the weights G̃/q on fresh policy samples."""
        samples = self.sample(prompts, num_samples, generator=self.trainer.generator)
        return float(samples.stats.ess_fraction.mean())

    # -- sampling ------------------------------------------------------------------------------

    @property
    def model(self) -> Density:
        return self.policy

    def draw(
        self, prompt_ids: list[list[int]], num_samples: int, generator: torch.Generator | None
    ) -> Draws:
        """Ancestral samples from the trained policy; ``log_q`` exact.

        A policy whose states carry the target's component states (the twist, prompt-twist and
        residual forms) is decoded as SMC with one particle that never resamples: the same
        ancestral draw, with ``log G̃`` accumulated from those states on the way, so that
        :meth:`Sampler.sample` does not score every draw again in a teacher-forced pass of the
        components (about half of a draw's model tokens). ``log q = log G̃ − log w``."""
        if is_residual_on_local_product_of(self.policy, self.target):
            one = SMCSampler(
                self.target,
                1,
                proposal=self.policy,
                ess_threshold=0.0,
                max_new_tokens=self.max_new_tokens,
            ).populations(prompt_ids, num_samples, generator)
            log_w = one.stats["log_z_populations"].flatten().to(one.log_target.device)
            log_q = (one.log_target.double() - log_w).to(one.log_target.dtype)
            return Draws(one.response_ids, one.lengths, log_q=log_q, log_target=one.log_target)
        samples = ancestral_sample(
            self.policy,
            prompt_ids,
            num_samples,
            max_new_tokens=self.max_new_tokens,
            generator=generator,
        )
        return Draws(samples.response_ids, samples.lengths, log_q=samples.log_q)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the weights (a peft adapter for "lora") and the config JSON, atomically."""
        with atomic_directory(directory) as tmp:
            self._write(tmp)
        return Path(directory)

    @classmethod
    def load(
        cls, directory: str | os.PathLike, target: Density, init: Policy, **overrides: Any
    ) -> GFlowNetSampler:
        """A sampler with the config and weights saved by :meth:`save` (or a checkpoint)."""
        directory = Path(directory)
        check_files(directory, (CONFIG_FILE,))
        config = GFlowNetConfig.from_dict({**_read_config(directory), **overrides})
        sampler = cls(target, init, config)
        sampler.weights.load_state_dict(sampler.weights.read(directory), str(directory))
        return sampler

    def save_checkpoint(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write ``step_NNNNNNN/`` into ``checkpoint_dir`` atomically; keep only the latest."""
        with self._checkpoints(checkpoint_dir) as folder:
            return self._save_into(folder)

    def _checkpoints(self, checkpoint_dir: str | os.PathLike) -> CheckpointDirectory:
        required = (CONFIG_FILE, TRAINER_STATE)
        return CheckpointDirectory(checkpoint_dir, tool=CHECKPOINT_TOOL, required=required)

    def _config_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self.config)))  # tuples as lists, like the file

    def _write(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        self.weights.write(directory)

    def _save_into(self, folder: CheckpointDirectory) -> Path:
        state = self.trainer.state_dict()
        log = {"step": state.pop("step"), "metrics": state.pop("metrics")}

        def write(directory: Path) -> None:
            self._write(directory)
            torch.save(state, directory / TRAINER_STATE)
            (directory / METRICS_FILE).write_text(json.dumps(log))

        return folder.save(log["step"], write)

    def _load_checkpoint(self, directory: Path) -> None:
        check_files(
            directory, (CONFIG_FILE, self.weights.weights_file, TRAINER_STATE, METRICS_FILE)
        )
        # Read every file before changing anything, so a bad checkpoint leaves the sampler as is.
        # weights_only: a checkpoint is a file a user can hand us, and unpickling runs code.
        try:
            state = torch.load(directory / TRAINER_STATE, weights_only=True)
        except UnpicklingError as error:
            raise ValueError(
                f"{str(directory / TRAINER_STATE)!r} holds objects other than tensors and plain "
                "values; they were not loaded, because loading them could run code. Delete that "
                "checkpoint folder (the fit then resumes from an earlier one or from scratch)"
            ) from error
        except Exception as error:
            raise corrupted(directory / TRAINER_STATE, error) from error
        missing = sorted(set(TRAINER_STATE_KEYS) - set(state if isinstance(state, dict) else ()))
        if missing:
            error = ValueError(f"it lacks {missing}")
            raise corrupted(directory / TRAINER_STATE, error) from None
        step, metrics = read_step_log(directory / METRICS_FILE)  # the step its folder names
        weights = self.weights.read(directory)
        self.weights.check_shapes(weights, str(directory))
        try:
            self.trainer.load_state_dict({**state, "step": step, "metrics": metrics})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            raise corrupted(directory / TRAINER_STATE, error) from error
        self.weights.load_state_dict(weights, str(directory))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete GFlowNet checkpoint with the highest step in ``checkpoint_dir`` (or None)."""
    return latest_in(checkpoint_dir, (TRAINER_STATE, CONFIG_FILE))


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as error:
        raise corrupted(directory / CONFIG_FILE, error) from error
