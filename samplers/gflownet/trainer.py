"""The GFlowNet trainer: the fit loop, batches, losses and optimizer steps of a :class:`Parametrization`.

For the sampler (``GFlowNetSampler.fit`` hands it the encoded prompts and a checkpoint
callback) and for studies that drive training themselves. The fit is :meth:`GFlowNetTrainer.fit`,
its resumable state :meth:`GFlowNetTrainer.state_dict`. One step, top to bottom in
:meth:`GFlowNetTrainer.train_step`:

1. responses for a batch of prompts, under ``no_grad`` with the KV cache, from a batch source:
   :class:`RolloutSource` (the policy itself, tempered for exploration, or a per-prompt replay
   buffer of high-reward responses) or, for distillation, :class:`TeacherSource`;
2. the target's prefix-terminal log-densities ``log R(s_k⊤)``, by the parametrization's
   :meth:`~samplers.gflownet.parametrization.Parametrization.training_batch` (no-grad
   teacher-forced passes; the twist form reads the components' scores kept from the rollout);
3. the policy's token scores, by the parametrization's ``scores`` (one teacher-forced pass with
   gradients through the trainable part; the twist form runs only its head on the kept
   features);
4. the loss, one of :data:`samplers.gflownet.losses.OBJECTIVES` or any
   :data:`~samplers.gflownet.losses.LossFunction` (flows derived from the rewards);
5. an optimizer step with gradient clipping (the twist form adds ``twist_updates − 1`` head
   updates on stored batches, which keep token ids and rewards only and are scored again
   after a teacher-forced no-grad pass of the components).

Gradients never flow through sampling: the objectives are off-policy, so the no-grad rollout
followed by one teacher-forced pass is the same objective as the published token-by-token
rollout, and far cheaper (docs/gflownet.md).

Data parallel under ``accelerate launch`` (DDP, FSDP or DeepSpeed from ``accelerate config``):
every process draws the step's whole batch from the same seeded generators, so the batch, the
buffers, every random choice and every logged metric agree across processes and match one
process. A twist head update then backpropagates through its process's share of the rows
only (:meth:`GFlowNetTrainer.batch_loss`) and the prepared head averages the shares'
gradients; distillation, and the lora and residual forms (whose forward runs inside a Policy),
take the whole batch's gradient on every process.

Why one module over 400 lines: the fit, its step and the batch sources share one state (the
optimizer, generators, buffers and schedules that ``state_dict`` saves whole).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import GradientState, is_initialized
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from gfn_spin.density import Density
from gfn_spin.samples import Samples, ancestral_sample, pad_responses
from gfn_spin.schedules import lr_factor, lr_schedule
from gfn_spin.scores import TokenScores
from objectives.distill import distillation_loss
from samplers.gflownet.batches import BatchBuffer, TrainingBatch
from samplers.gflownet.config import LR_FLOOR, GFlowNetConfig
from samplers.gflownet.losses import OBJECTIVES, LossFunction
from samplers.gflownet.parametrization import Parametrization
from samplers.replay import ReplayBuffer


class StateRecorder:
    """An ``on_state`` callback of :func:`gfn_spin.samples.ancestral_sample` that keeps, for
    every output row and state s_k, the tensors ``read(state)`` returns (``[rows, ...]`` each),
    as ``values``: one ``[N, L+1, ...]`` tensor per read tensor, zero at states never visited
    (past a response's end, and s_L, whose stop is forced)."""

    def __init__(self, read: Callable[[Any], Sequence[torch.Tensor]], max_new_tokens: int) -> None:
        self.read = read
        self.width = max_new_tokens
        self.values: list[torch.Tensor] | None = None

    def __call__(self, step: int, rows: torch.Tensor, state: Any) -> None:
        parts = self.read(state)
        if self.values is None:
            # The first state holds every row; its width is the number of output rows.
            self.values = [p.new_zeros((len(rows), self.width + 1, *p.shape[1:])) for p in parts]
        for buffer, part in zip(self.values, parts, strict=True):
            buffer[rows, step] = part


@dataclass
class Batch:
    """Responses for one step: ``rows`` (the prompt of each), the draws, where they came from."""

    rows: list[list[int]]
    samples: Samples
    source: str


class RolloutSource:
    """On-policy rollouts: the policy, tempered with probability ``explore_prob``, or with
    probability ``replay_prob`` the replay buffer of the best responses found so far (it keeps
    ``replay_capacity`` responses per prompt)."""

    def __init__(self, replay_capacity: int) -> None:
        self.replay = ReplayBuffer(replay_capacity)

    def draw(
        self,
        config: GFlowNetConfig,
        policy: Density,
        prompt_ids: list[list[int]],
        rng: random.Random,
        generator: torch.Generator,
        recorder: StateRecorder | None = None,
    ) -> Batch:
        """Responses for one batch (``recorder`` sees a rollout's states; a replay has none)."""
        k = config.samples_per_prompt
        if config.replay_prob > 0 and rng.random() < config.replay_prob:
            stored = self.replay.prompts()
            if stored:
                chosen = [list(rng.choice(stored)) for _ in range(config.prompts_per_step)]
                responses = [r for p in chosen for r in self.replay.sample(p, k, rng)]
                rows = [p for p in chosen for _ in range(k)]
                ids, lengths = pad_responses(responses, config.max_new_tokens, policy.pad_token_id)
                device = policy.device
                replayed = Samples(
                    prompt_index=torch.arange(len(responses), device=device),
                    response_ids=ids.to(device),
                    lengths=lengths.to(device),
                    texts=[],
                )
                return Batch(rows, replayed, "replay")
        chosen = [rng.choice(prompt_ids) for _ in range(config.prompts_per_step)]
        temperature, source = 1.0, "policy"
        if rng.random() < config.explore_prob:
            temperature, source = rng.uniform(*config.explore_temperature), "explore"
        samples = ancestral_sample(
            policy,
            chosen,
            k,
            max_new_tokens=config.max_new_tokens,
            temperature=temperature,
            generator=generator,
            on_state=recorder,
        )
        return Batch([p for p in chosen for _ in range(k)], samples, source)

    def add(self, config: GFlowNetConfig, batch: Batch, final_log_reward: torch.Tensor) -> None:
        """Offer a rolled-out batch's responses to the replay buffer."""
        if batch.source != "replay" and config.replay_prob > 0:
            self.replay.add(batch.rows, batch.samples.responses(), final_log_reward.tolist())

    def state_dict(self) -> dict[str, Any]:
        return self.replay.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state)


class TeacherSource:
    """Draws of a normalized ``teacher`` density, with its log-probs at the states it visits
    (for distillation)."""

    def __init__(self, teacher: Density) -> None:
        self.teacher = teacher

    def draw(
        self,
        config: GFlowNetConfig,
        prompt_ids: list[list[int]],
        rng: random.Random,
        generator: torch.Generator,
    ) -> tuple[Batch, torch.Tensor]:
        """A batch and the teacher's step log-probs ``[B, L+1, V]`` along it."""
        chosen = [rng.choice(prompt_ids) for _ in range(config.prompts_per_step)]
        rows = [p for p in chosen for _ in range(config.samples_per_prompt)]
        recorder = StateRecorder(lambda state: [state.next_logprobs], config.max_new_tokens)
        with torch.no_grad():
            samples = ancestral_sample(
                self.teacher,
                chosen,
                config.samples_per_prompt,
                max_new_tokens=config.max_new_tokens,
                generator=generator,
                on_state=recorder,
            )
        (teacher_steps,) = recorder.values
        return Batch(rows, samples, "teacher"), teacher_steps


@dataclass
class TrainState:
    """The fit's position: optimizer steps taken and the metrics logged so far."""

    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


class GFlowNetTrainer:
    """Fits a :class:`Parametrization` toward ``target`` with a pluggable loss and source.

    The trainer owns the fit: the config, the optimizer, the schedules, the random generators,
    the batch source and buffers, and the loop (:meth:`fit`); :meth:`state_dict` and
    :meth:`load_state_dict` hold everything a resumed fit needs besides the trainable weights
    (those are the parametrization's).

    Args:
        target: the density to sample.
        parametrization: the trainable policy.
        config: the training settings (the trainer's own; :meth:`set_peak_learning_rate`
            changes it).
        loss: the objective (default: ``OBJECTIVES[config.loss]``).
        source: the batch source of :meth:`train_step` (default: a :class:`RolloutSource`).
        accelerator: where the optimizer steps run (default: :func:`default_accelerator`).
    """

    def __init__(
        self,
        target: Density,
        parametrization: Parametrization,
        config: GFlowNetConfig,
        *,
        loss: LossFunction | None = None,
        source: RolloutSource | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.target = target
        self.parametrization = parametrization
        self.policy = parametrization.policy
        self.config = config
        self.loss = OBJECTIVES[config.loss] if loss is None else loss
        self.source = RolloutSource(config.replay_capacity) if source is None else source
        optimizer = make_optimizer(parametrization.trainable_parameters, config)
        if accelerator is None:
            accelerator = default_accelerator(parametrization.init.device)
        self.accelerator = accelerator
        # Gradients are averaged only through a forward of the prepared module: a form whose
        # trainable part is one module (the twist head) is computed through the prepared one;
        # the others run theirs inside a Policy.
        self.module = parametrization.trainable_module()
        if self.module is not None:
            self.module, self.optimizer = accelerator.prepare(self.module, optimizer)
            parametrization.use_prepared(self.module)
        else:
            self.optimizer = accelerator.prepare(optimizer)
        self.batches = BatchBuffer(config.twist_buffer)
        self.state = TrainState()
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(device=parametrization.init.device).manual_seed(
            config.seed
        )

    def set_peak_learning_rate(self, learning_rate: float) -> None:
        """Make ``learning_rate`` the fit's peak rate, reached without warmup (recorded in
        ``config``); before the fit starts."""
        if not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate} must be > 0")
        self.config = replace(self.config, learning_rate=learning_rate, warmup_steps=0)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate

    # -- the fit -----------------------------------------------------------------------------

    def check_fit(
        self, steps: int | None, schedule_steps: int | None, teacher: Density | None
    ) -> tuple[int, int]:
        """The fit's steps and schedule length (defaults resolved), refused when negative, a
        schedule shorter than the fit, or a teacher that cannot be distilled."""
        total = self.config.steps if steps is None else steps
        horizon = total if schedule_steps is None else schedule_steps
        for name, value in (("steps", total), ("schedule_steps", horizon)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if horizon < total:
            raise ValueError(
                f"schedule_steps={schedule_steps} must be at least the fit's steps ({total})"
            )
        if teacher is not None and (
            not teacher.normalized
            or teacher.vocab_size != self.target.vocab_size
            or teacher.eos_token_id != self.target.eos_token_id
        ):
            raise ValueError(
                "teacher must be a normalized density (e.g. another GFlowNetSampler's .policy) "
                "over the target's vocabulary and EOS token"
            )
        return total, horizon

    def fit(
        self,
        prompt_ids: list[list[int]],
        steps: int | None = None,
        *,
        schedule_steps: int | None = None,
        teacher: Density | None = None,
        evaluate: Callable[[list[list[int]], int], float] | None = None,
        checkpoint: Callable[[], None] | None = None,
        progress: bool = True,
        log_every: int = 10,
    ) -> list[dict[str, Any]]:
        """Train on ``prompt_ids`` until ``steps`` optimizer steps are done (default
        ``config.steps``; a resumed trainer continues from its step). Returns the metrics log.

        ``schedule_steps``: the length the learning-rate and reward-temperature schedules span
        (default ``steps``). ``teacher``: distill it instead of stepping toward the target.
        ``evaluate(prompts, num_samples)``: the ESS/N logged every ``config.eval_every``
        steps, on the first ``eval_prompts`` prompts. ``checkpoint()``: called every
        ``config.checkpoint_every`` steps and at the end.
        """
        total, horizon = self.check_fit(steps, schedule_steps, teacher)
        cfg = self.config
        source = None if teacher is None else TeacherSource(teacher)
        eval_prompts = prompt_ids[: cfg.eval_prompts]
        scheduler = self.scheduler(horizon)
        bar = tqdm(
            total=total, initial=self.state.step, disable=not progress, desc="gflownet", leave=False
        )
        started = time.perf_counter()
        while self.state.step < total:
            step = self.state.step
            lr = self.optimizer.param_groups[0]["lr"]
            temp = self.reward_temperature(step, horizon)
            try:
                if source is None:
                    record = self.train_step(prompt_ids, temp)
                else:
                    record = self.distill_step(prompt_ids, source)
            except FloatingPointError as error:  # the batch's draw from q already diverged
                self.diverged(step, total, lr, str(error))
            self.check_finite(record["loss"], step + 1, total, lr)
            scheduler.step()
            self.state.step += 1
            done = self.state.step
            if (
                evaluate is not None
                and cfg.eval_every
                and (done % cfg.eval_every == 0 or done == total)
            ):
                record["ess_fraction"] = evaluate(eval_prompts, cfg.eval_samples)
            if done % log_every == 0 or done == total or "ess_fraction" in record:
                record.update(
                    step=done,
                    lr=lr,
                    reward_temperature=temp,
                    seconds=time.perf_counter() - started,
                )
                self.state.metrics.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3g}")
            bar.update(1)
            if checkpoint is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                checkpoint()
        bar.close()
        if checkpoint is not None:
            checkpoint()
        return self.state.metrics

    def check_finite(self, loss: float, step: int, total: int, lr: float) -> None:
        """Stop a diverged fit at the step it diverged, before anything of it is saved or
        sampled: a NaN or inf loss, or trainable weights that are no longer finite (a loss can
        stay finite for a step after the weights turn NaN)."""
        params = self.parametrization.trainable_parameters
        # One reduction per tensor and one host sync per step.
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in params])
        if math.isfinite(loss) and bool(finite.all()):
            return
        bad = int((~finite).sum())
        what = f"loss {loss:.4g}; {bad} of {len(params)} trainable tensors hold NaN or inf"
        self.diverged(step, total, lr, what)

    @staticmethod
    def diverged(step: int, total: int, lr: float, what: str) -> None:
        """Raise the FloatingPointError of a fit that diverged after ``step`` steps."""
        raise FloatingPointError(
            f"the GFlowNet fit is not finite after step {step} of {total} ({what}); nothing "
            f"of it is saved from here on. Lower learning_rate (the step ran at {lr:.3g}), "
            "raise the reward temperatures, or clip gradients with max_grad_norm"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs besides the trainable weights: the optimizer, both random
        generators, the batch source's and the batch buffer's contents, the step and the
        metrics. Tensors and plain values only (read back with ``weights_only=True``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": self.generator.get_state(),
            "python_rng": self.rng.getstate(),
            "replay": self.source.state_dict(),
            "batches": self.batches.state_dict(),
            "step": self.state.step,
            "metrics": self.state.metrics,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["torch_rng"])
        self.rng.setstate(state["python_rng"])
        self.source.load_state_dict(state["replay"])
        self.batches.load_state_dict(state["batches"])
        self.state = TrainState(step=int(state["step"]), metrics=list(state["metrics"]))

    # -- schedules ---------------------------------------------------------------------------

    def lr_factor(self, step: int, total: int) -> float:
        """Learning rate at ``step`` of ``total`` over the peak (:func:`gfn_spin.schedules.lr_factor`):
        linear warmup over ``warmup_steps`` from 1/warmup at step 0, then ``lr_decay`` to
        ``LR_FLOOR`` of the peak."""
        cfg = self.config
        return lr_factor(
            step,
            total,
            warmup_steps=cfg.warmup_steps,
            decay=cfg.lr_decay,
            min_lr_ratio=LR_FLOOR,
            warmup_from_zero=False,
        )

    def scheduler(self, total: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The LR schedule of a fit of ``total`` steps, positioned at the current step (call
        its ``step()`` after each training step)."""
        cfg = self.config
        return lr_schedule(
            self.optimizer,
            total,
            warmup_steps=cfg.warmup_steps,
            decay=cfg.lr_decay,
            min_lr_ratio=LR_FLOOR,
            warmup_from_zero=False,
            start_step=self.state.step,
        )

    def reward_temperature(self, step: int, total: int) -> float:
        """Linear schedule from ``reward_temperature_start`` to ``reward_temperature_end``."""
        cfg = self.config
        frac = step / max(total - 1, 1)
        return cfg.reward_temperature_start + frac * (
            cfg.reward_temperature_end - cfg.reward_temperature_start
        )

    # -- steps -------------------------------------------------------------------------------

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into the trainable weights and take one clipped optimizer step
        (also for other objectives on this policy, such as a maximum-likelihood oracle)."""
        accelerator = self.accelerator
        # One step is one whole accumulation cycle, whatever another user of the process's
        # shared accelerate state (an alpha-SPIN run around this fit) accumulates over.
        kept = accelerator.gradient_accumulation_steps
        accelerator.gradient_accumulation_steps = 1
        try:
            with accelerator.accumulate(*([self.module] if self.module is not None else [])):
                self.optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if self.config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(
                        self.parametrization.trainable_parameters, self.config.max_grad_norm
                    )
                self.optimizer.step()
        finally:
            accelerator.gradient_accumulation_steps = kept

    def distill_step(self, prompt_ids: list[list[int]], source: TeacherSource) -> dict[str, Any]:
        """One step of token-level distillation (KL(teacher ‖ policy)) on the teacher's draws."""
        batch, teacher_steps = source.draw(self.config, prompt_ids, self.rng, self.generator)
        ids, lengths = batch.samples.response_ids, batch.samples.lengths
        student_steps = self.policy.step_logprobs(batch.rows, ids, lengths)
        loss = distillation_loss(teacher_steps, student_steps, lengths)
        self.optimizer_step(loss)
        return {
            "loss": float(loss.detach()),
            "empty_fraction": float((lengths == 0).double().mean()),
            "source": batch.source,
        }

    def train_step(
        self, prompt_ids: list[list[int]], reward_temperature: float = 1.0
    ) -> dict[str, Any]:
        """One batch and its update(s) toward the target; returns its metrics."""
        cfg, form = self.config, self.parametrization
        read = form.rollout_reader()
        recorder = None if read is None else StateRecorder(read, cfg.max_new_tokens)
        batch = self.source.draw(cfg, self.policy, prompt_ids, self.rng, self.generator, recorder)
        rows, ids, lengths = batch.rows, batch.samples.response_ids, batch.samples.lengths
        keys: dict[tuple[int, ...], int] = {}
        group = torch.tensor([keys.setdefault(tuple(r), len(keys)) for r in rows])
        recorded = None if recorder is None else recorder.values
        scored = form.training_batch(self.target, rows, ids, lengths, group, recorded)
        log_reward = scored.log_reward
        if form.reuses_batches:
            self.batches.add(form.kept(scored))
        loss = self._update(scored, reward_temperature)
        # The rollout's vocabulary-sized tensors live for the fresh batch's update only.
        del recorder, recorded, scored
        if form.reuses_batches:
            for _ in range(cfg.twist_updates - 1):
                stored = self.batches.sample(self.rng)
                self._update(form.restored(stored), reward_temperature)
        final = log_reward.gather(1, lengths.to(log_reward.device)[:, None]).squeeze(1)
        self.source.add(cfg, batch, final)
        finite = final[torch.isfinite(final)]
        return {
            "loss": float(loss.detach()),
            "log_reward": float(finite.mean()) if len(finite) else float("-inf"),
            "empty_fraction": float((lengths == 0).double().mean()),
            "source": batch.source,
        }

    def _update(self, batch: TrainingBatch, reward_temperature: float) -> torch.Tensor:
        """One optimizer step on a fresh (or stored) batch; returns its loss."""
        loss, share = self.batch_loss(batch, reward_temperature)
        self.optimizer_step(share)
        return loss

    def batch_loss(
        self, batch: TrainingBatch, reward_temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a batch, and the loss this process backpropagates: with several
        processes and a prepared trainable module, the loss through this process's share of
        the rows times their count, so that the module's average of the processes' gradients
        is the whole batch's gradient."""
        scores = self._scores(batch)
        device = scores.token_logprobs.device
        loss = self.loss(
            self.config,
            scores,
            batch.log_reward.to(device),
            batch.group.to(device),
            reward_temperature,
        )
        processes = self.accelerator.num_processes
        return loss, (loss if processes == 1 or self.module is None else loss * processes)

    def _scores(self, batch: TrainingBatch) -> TokenScores:
        """The policy's scores of a batch; with several processes and a prepared module,
        gradients flow only through this process's contiguous share of the rows (the others'
        rows enter as constants, so the loss is still the whole batch's)."""
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        form = self.parametrization
        if processes == 1 or self.module is None:
            return form.scores(batch)
        count = len(batch.lengths)
        mine = slice(count * rank // processes, count * (rank + 1) // processes)
        with torch.no_grad():
            whole = form.scores(batch)
        part = form.scores(batch.select(mine))

        def splice(constant: torch.Tensor, tracked: torch.Tensor) -> torch.Tensor:
            return torch.cat([constant[: mine.start], tracked, constant[mine.stop :]])

        return TokenScores(
            splice(whole.token_logprobs, part.token_logprobs),
            splice(whole.eos_logprobs, part.eos_logprobs),
            whole.lengths,
        )


def make_optimizer(
    parameters: list[torch.nn.Parameter], config: GFlowNetConfig
) -> torch.optim.Optimizer:
    """The fit's optimizer (``config.optimizer``), at ``config.learning_rate``, which the
    schedule then scales."""
    if config.optimizer == "adafactor":
        # Adafactor's own relative step and parameter scaling are off: the toolkit's schedule
        # sets the rate, as for AdamW. beta1=None keeps no first moment, so its whole state is
        # the factored second moments.
        return Adafactor(
            parameters,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            beta1=None,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def default_accelerator(device: torch.device) -> Accelerator:
    """The ``Accelerator`` of a fit on ``device`` when the caller gives none: gloo between CPU
    processes, the weights left where they are, and the gradient accumulation of the process's
    shared accelerate state (an alpha-SPIN run's, say) left as it is."""
    return Accelerator(
        cpu=device.type == "cpu" and not is_initialized(),
        device_placement=False,
        gradient_accumulation_steps=GradientState().num_steps,
    )
