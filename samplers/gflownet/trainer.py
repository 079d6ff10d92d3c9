"""The GFlowNet trainer: batches, losses and optimizer steps for a :class:`Parametrization`.

For the sampler (``GFlowNetSampler.fit``) and for studies that drive training themselves. One
step, top to bottom in :meth:`GFlowNetTrainer.train_step`:

1. responses for a batch of prompts, under ``no_grad`` with the KV cache, from a batch source:
   :class:`RolloutSource` (the policy itself, tempered for exploration, or a per-prompt replay
   buffer of high-reward responses) or, for distillation, :class:`TeacherSource`;
2. the target's prefix-terminal log-densities ``log R(s_k⊤)`` (no-grad teacher-forced passes;
   the twist form keeps the components' scores from the rollout instead);
3. the policy's token scores (one teacher-forced pass with gradients through the trainable
   part; the twist form runs only its head, on the components' features from the rollout);
4. the loss, one of :data:`samplers.gflownet.losses.OBJECTIVES` or any
   :data:`~samplers.gflownet.losses.LossFunction` (flows derived from the rewards);
5. an optimizer step with gradient clipping (the twist form adds ``twist_updates − 1`` head
   updates on stored batches).

Gradients never flow through sampling: the objectives are off-policy, so the no-grad rollout
followed by one teacher-forced pass is the same objective as the published token-by-token
rollout, and far cheaper (docs/gflownet.md).

Data parallel under ``accelerate launch`` (DDP, FSDP or DeepSpeed from ``accelerate config``):
every process draws the step's whole batch from the same seeded generators, so the batch, the
buffers, every random choice and every logged metric agree across processes and match one
process. A twist head update then backpropagates through its process's share of the rows
only (:meth:`GFlowNetTrainer.twist_loss`) and the prepared head averages the shares'
gradients; distillation, and the lora and residual forms (whose forward runs inside a Policy),
take the whole batch's gradient on every process.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import GradientState, is_initialized

from gfn_spin.density import Density, scores_from_steps
from gfn_spin.residual import ResidualLocalProduct
from gfn_spin.samples import Samples, ancestral_sample, pad_responses
from gfn_spin.schedules import lr_factor, lr_schedule
from gfn_spin.scores import TokenScores, weighted_logsum
from gfn_spin.twist import TwistedLocalProduct
from objectives.distill import distillation_loss
from samplers.gflownet.config import LR_FLOOR, GFlowNetConfig
from samplers.gflownet.losses import OBJECTIVES, LossFunction
from samplers.gflownet.parametrization import Parametrization
from samplers.replay import FeatureBuffer, ReplayBuffer


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
    probability ``replay_prob`` the replay buffer of the best responses found so far."""

    def __init__(self, config: GFlowNetConfig) -> None:
        self.config = config
        self.replay = ReplayBuffer(config.replay_capacity)

    def draw(
        self,
        policy: Density,
        prompt_ids: list[list[int]],
        rng: random.Random,
        generator: torch.Generator,
        recorder: StateRecorder | None = None,
    ) -> Batch:
        """Responses for one batch (``recorder`` sees a rollout's states; a replay has none)."""
        cfg = self.config
        k = cfg.samples_per_prompt
        if cfg.replay_prob > 0 and rng.random() < cfg.replay_prob:
            stored = self.replay.prompts()
            if stored:
                chosen = [list(rng.choice(stored)) for _ in range(cfg.prompts_per_step)]
                responses = [r for p in chosen for r in self.replay.sample(p, k, rng)]
                rows = [p for p in chosen for _ in range(k)]
                ids, lengths = pad_responses(responses, cfg.max_new_tokens, policy.pad_token_id)
                device = policy.device
                replayed = Samples(
                    prompt_index=torch.arange(len(responses), device=device),
                    response_ids=ids.to(device),
                    lengths=lengths.to(device),
                    texts=[],
                )
                return Batch(rows, replayed, "replay")
        chosen = [rng.choice(prompt_ids) for _ in range(cfg.prompts_per_step)]
        temperature, source = 1.0, "policy"
        if rng.random() < cfg.explore_prob:
            temperature, source = rng.uniform(*cfg.explore_temperature), "explore"
        samples = ancestral_sample(
            policy,
            chosen,
            k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=temperature,
            generator=generator,
            on_state=recorder,
        )
        return Batch([p for p in chosen for _ in range(k)], samples, source)

    def add(self, batch: Batch, final_log_reward: torch.Tensor) -> None:
        """Offer a rolled-out batch's responses to the replay buffer."""
        if batch.source != "replay" and self.config.replay_prob > 0:
            self.replay.add(batch.rows, batch.samples.responses(), final_log_reward.tolist())


class TeacherSource:
    """Draws of a normalized ``teacher`` density, with its log-probs at the states it visits
    (for distillation)."""

    def __init__(self, teacher: Density, config: GFlowNetConfig) -> None:
        self.teacher = teacher
        self.config = config

    def draw(
        self, prompt_ids: list[list[int]], rng: random.Random, generator: torch.Generator
    ) -> tuple[Batch, torch.Tensor]:
        """A batch and the teacher's step log-probs ``[B, L+1, V]`` along it."""
        cfg = self.config
        chosen = [rng.choice(prompt_ids) for _ in range(cfg.prompts_per_step)]
        rows = [p for p in chosen for _ in range(cfg.samples_per_prompt)]
        recorder = StateRecorder(lambda state: [state.next_logprobs], cfg.max_new_tokens)
        with torch.no_grad():
            samples = ancestral_sample(
                self.teacher,
                chosen,
                cfg.samples_per_prompt,
                max_new_tokens=cfg.max_new_tokens,
                generator=generator,
                on_state=recorder,
            )
        (teacher_steps,) = recorder.values
        return Batch(rows, samples, "teacher"), teacher_steps


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights and the optimizer."""

    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


class GFlowNetTrainer:
    """Trains a :class:`Parametrization` toward ``target`` with a pluggable loss and source.

    Args:
        target: the density to sample.
        parametrization: the trainable policy.
        config: the training settings.
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
        self.source = RolloutSource(config) if source is None else source
        optimizer = torch.optim.AdamW(
            parametrization.trainable_parameters,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        if accelerator is None:
            accelerator = default_accelerator(parametrization.init.device)
        self.accelerator = accelerator
        # Gradients are averaged only through a forward of the prepared module: the twist
        # head's can be put in its place; the other forms run theirs inside a Policy.
        self.module: torch.nn.Module | None = None
        if parametrization.head is not None:
            self.module, self.optimizer = accelerator.prepare(parametrization.head, optimizer)
            self.policy.head = self.module
        else:
            self.optimizer = accelerator.prepare(optimizer)
        self.features = FeatureBuffer(config.twist_buffer)
        self.state = TrainState()
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator(device=parametrization.init.device).manual_seed(
            config.seed
        )

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
        batch, teacher_steps = source.draw(prompt_ids, self.rng, self.generator)
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
        cfg = self.config
        twist = isinstance(self.policy, TwistedLocalProduct)
        # The twist form keeps what the rollout computed (every component's step scores and
        # features at each state) instead of running the components again.
        recorder = None
        if twist:
            recorder = StateRecorder(lambda state: state.component_outputs(), cfg.max_new_tokens)
        batch = self.source.draw(self.policy, prompt_ids, self.rng, self.generator, recorder)
        rows, ids, lengths = batch.rows, batch.samples.response_ids, batch.samples.lengths
        keys: dict[tuple[int, ...], int] = {}
        group = torch.tensor([keys.setdefault(tuple(r), len(keys)) for r in rows])
        if twist:
            if recorder.values is None:  # a replayed batch: no rollout to read from
                steps, features = self.policy.component_outputs(rows, ids, lengths)
            else:
                count = len(self.target.components)
                steps, features = recorder.values[:count], recorder.values[count:]
            log_reward = self._log_reward(steps, ids, lengths)
            stored = {
                "steps": list(steps),
                "features": list(features),
                "response_ids": ids,
                "lengths": lengths,
                "log_reward": log_reward,
                "group": group,
            }
            self.features.add(stored)
            loss = self._twist_update(stored, reward_temperature)
            for _ in range(cfg.twist_updates - 1):
                self._twist_update(self.features.sample(self.rng), reward_temperature)
        else:
            log_reward, scores = self._scores(rows, ids, lengths)
            loss = self._loss(scores, log_reward, group, reward_temperature)
            self.optimizer_step(loss)
        final = log_reward.gather(1, lengths.to(log_reward.device)[:, None]).squeeze(1)
        self.source.add(batch, final)
        finite = final[torch.isfinite(final)]
        return {
            "loss": float(loss.detach()),
            "log_reward": float(finite.mean()) if len(finite) else float("-inf"),
            "empty_fraction": float((lengths == 0).double().mean()),
            "source": batch.source,
        }

    def _loss(
        self,
        scores: TokenScores,
        log_reward: torch.Tensor,
        group: torch.Tensor,
        reward_temperature: float,
    ) -> torch.Tensor:
        device = scores.token_logprobs.device
        return self.loss(
            self.config, scores, log_reward.to(device), group.to(device), reward_temperature
        )

    def _scores(
        self, rows: list[list[int]], ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, TokenScores]:
        """Target prefix-terminal log-densities (no grad) and the policy's scores (with grad)."""
        if isinstance(self.policy, ResidualLocalProduct):
            # The residual policy needs every component's step scores, which are also the
            # target's: one no-grad pass per component serves both.
            with torch.no_grad():
                steps = [c.step_logprobs(rows, ids, lengths) for c in self.target.components]
            log_reward = self._log_reward(steps, ids, lengths)
            return log_reward, self.policy.score(rows, ids, lengths, component_steps=steps)
        with torch.no_grad():
            log_reward = self.target.score(rows, ids, lengths).prefix_terminal_logprobs()
        return log_reward, self.policy.score(rows, ids, lengths)

    def _log_reward(
        self, steps: list[torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """The target's prefix-terminal log-densities ``[B, L+1]`` from its components' steps."""
        combined = weighted_logsum([s.detach() for s in steps], self.target.weights)
        device = combined.device
        return scores_from_steps(
            combined, ids.to(device), lengths.to(device), self.target.eos_token_id
        ).prefix_terminal_logprobs()

    def _twist_update(self, batch: dict[str, Any], reward_temperature: float) -> torch.Tensor:
        """One head update on a stored (or fresh) batch of component outputs."""
        loss, share = self.twist_loss(batch, reward_temperature)
        self.optimizer_step(share)
        return loss

    def twist_loss(
        self, batch: dict[str, Any], reward_temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of a stored (or fresh) batch of component outputs, and the loss this
        process backpropagates: with several processes, the loss through this process's share
        of the rows times their count, so that the prepared head's average of the processes'
        gradients is the whole batch's gradient."""
        outputs = (batch["steps"], batch["features"])
        scores = self._twist_scores(outputs, batch["response_ids"], batch["lengths"])
        loss = self._loss(scores, batch["log_reward"], batch["group"], reward_temperature)
        processes = self.accelerator.num_processes
        return loss, (loss if processes == 1 else loss * processes)

    def _twist_scores(
        self,
        outputs: tuple[list[torch.Tensor], list[torch.Tensor]],
        ids: torch.Tensor,
        lengths: torch.Tensor,
    ) -> TokenScores:
        """The twist policy's scores of a batch from its components' outputs; with several
        processes, gradients flow only through this process's contiguous share of the rows
        (the others' rows enter as constants, so the loss is still the whole batch's)."""
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        if processes == 1:
            return self.policy.scores_from_outputs(outputs, ids, lengths)
        count = len(lengths)
        mine = slice(count * rank // processes, count * (rank + 1) // processes)
        with torch.no_grad():
            whole = self.policy.scores_from_outputs(outputs, ids, lengths)
        steps, features = outputs
        share = ([s[mine] for s in steps], [f[mine] for f in features])
        part = self.policy.scores_from_outputs(share, ids[mine], lengths[mine])

        def splice(constant: torch.Tensor, tracked: torch.Tensor) -> torch.Tensor:
            return torch.cat([constant[: mine.start], tracked, constant[mine.stop :]])

        return TokenScores(
            splice(whole.token_logprobs, part.token_logprobs),
            splice(whole.eos_logprobs, part.eos_logprobs),
            whole.lengths,
        )


def default_accelerator(device: torch.device) -> Accelerator:
    """The ``Accelerator`` of a fit on ``device`` when the caller gives none: gloo between CPU
    processes, the weights left where they are, and the gradient accumulation of the process's
    shared accelerate state (an alpha-SPIN run's, say) left as it is."""
    return Accelerator(
        cpu=device.type == "cpu" and not is_initialized(),
        device_placement=False,
        gradient_accumulation_steps=GradientState().num_steps,
    )
