"""The GFlowNet sampler: a policy trained with modified SubTB (or TB, or VarGrad) toward any target.

For users who need samples from an intractable product of LM densities (the geometric
mixture ``π_0^{1-α} π_t^α`` of α-SPIN, a KL-regularized target) with an exact ``log_q``:
once fitted, sampling is plain ancestral sampling and the sampler's error to the target can be
measured exactly on small problems, or estimated (ESS, ELBO gap) on large ones. One fit is
amortized over many prompts and generalizes to unseen ones. The math, the parametrizations and
the objectives are in docs/gflownet.md.

The training step, top to bottom in :meth:`GFlowNetSampler.train_step`:

1. responses for a batch of prompts, under ``no_grad`` with the KV cache: from the policy
   itself, tempered (exploration), or from a per-prompt replay buffer of high-reward responses;
2. the target's prefix-terminal log-densities ``log R(s_k⊤)`` (no-grad teacher-forced passes;
   the twist form keeps the components' scores from the rollout instead);
3. the policy's token scores (one teacher-forced pass with gradients through the trainable
   part; the twist form runs only its head, on the components' features from the rollout);
4. the configured loss (``GFlowNetConfig.loss``), flows derived from the rewards;
5. an optimizer step with gradient clipping (the twist form adds ``twist_updates − 1`` head
   updates on stored batches).

Gradients never flow through sampling: the objectives are off-policy, so the no-grad rollout
followed by one teacher-forced pass is the same objective as the published token-by-token
rollout, and far cheaper. :meth:`GFlowNetSampler.fit` with ``teacher=`` distills another
density instead (how the one-pass ``lora`` form learns from the twisted form).

Parametrizations (``GFlowNetConfig.parametrization``):

- ``"twist"``: :class:`gfn_spin.twist.TwistedLocalProduct`, the local product times a learned
  twist read from the components' hidden states; one pass per component per token.
- ``"residual"``: :class:`gfn_spin.residual.ResidualLocalProduct`, the local product times a
  LoRA correction; one pass per component plus one per token.
- ``"lora"``: a LoRA adapter on the init policy's weights; **one** model pass per token, and
  :meth:`GFlowNetSampler.save` writes a standard peft adapter (``Policy.from_pretrained(base,
  adapter=dir)`` and HF ``generate`` load it).
- ``"auto"`` (default): twist for a geometric mixture of policies, residual for a geometric
  mixture over other densities, else lora.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # the error class only: nothing is unpickled here
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from gfn_spin import adapters
from gfn_spin.density import Density, PromptLike, scores_from_steps
from gfn_spin.io import atomic_directory, dataclass_from_dict, make_directory
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from gfn_spin.residual import ResidualLocalProduct
from gfn_spin.samples import Samples, ancestral_sample, check_count
from gfn_spin.scores import TokenScores, weighted_logsum
from gfn_spin.twist import TwistedLocalProduct, TwistHead
from objectives.distill import distillation_loss
from objectives.subtb import (
    TERMINATION_GRADIENTS,
    WEIGHTINGS,
    log_variance_loss,
    modified_subtb_loss,
    trajectory_balance_loss,
)
from samplers.base import Sampler, check_prompts
from samplers.replay import FeatureBuffer, ReplayBuffer

PARAMETRIZATIONS = ("auto", "lora", "residual", "twist")
LOSSES = ("subtb", "tb", "log_variance")
CONFIG_FILE = "gflownet_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TWIST_WEIGHTS = "twist_head.safetensors"
TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
#: Config fields a resumed fit may change (they do not change the trajectory of the steps done).
RESUMABLE_FIELDS = ("steps", "checkpoint_every")


@dataclass
class GFlowNetConfig:
    """Every setting of the GFlowNet sampler and its training (saved with the adapter)."""

    max_new_tokens: int = 7
    """Length cap L of responses (the stop at L is forced)."""
    parametrization: str = "auto"
    """"twist": local product × a twist head on the components' hidden states (needs a
    GeometricMixture of policies); "residual": local product × a LoRA correction (needs a
    GeometricMixture); "lora": LoRA on the init policy's weights, one model pass per token;
    "auto": twist, else residual, else lora, whichever the target allows (docs/gflownet.md)."""
    twist_width: int = 256
    """"twist": hidden width of the twist head (an MLP over the components' hidden states)."""
    twist_depth: int = 2
    """"twist": hidden layers of the twist head."""
    lora_rank: int = 32
    """LoRA rank r (the published LM recipe uses 64)."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."""
    lora_output_layer: bool = True
    """Also put LoRA on the output (LM head) layer, besides every attention and MLP projection."""
    steps: int = 1000
    """Optimizer steps of `fit` (when `fit` is not given `steps`)."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (the published 1e-4 is for GPT-2-size models)."""
    warmup_steps: int = 20
    """Linear learning-rate warmup steps."""
    lr_decay: str = "cosine"
    """Learning-rate decay after warmup: "cosine" (to 5% of the peak) or "constant"."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    prompts_per_step: int = 16
    """Prompts in one training batch (drawn uniformly from the fit prompts)."""
    samples_per_prompt: int = 4
    """Responses per prompt in one training batch."""
    loss: str = "subtb"
    """Training objective: "subtb" (modified sub-trajectory balance over every window), "tb"
    (trajectory balance, log Z the derived flow at s_0) or "log_variance" (VarGrad: the
    variance of log R − log q among one prompt's responses, a per-prompt batch log Z)."""
    subtb_lambda: float = 1.0
    """SubTB λ: weight λ^(j-i-1) of the sub-trajectory from s_i to s_j."""
    termination_gradient: str = "all"
    """"all", or "anchor": stop log-probs get gradient from the full-trajectory window only
    (guards against shifting the stop logits to shrink many windows at once; same loss value)."""
    twist_updates: int = 8
    """"twist": head updates per rollout; the first uses the fresh batch, the others stored
    batches (the components are frozen, so stored features stay exact)."""
    twist_buffer: int = 64
    """"twist": training batches kept for the extra head updates."""
    weighting: str = "batch"
    """SubTB normalization: "batch" (published LM recipe) or "geometric_within"."""
    explore_prob: float = 0.667
    """Fraction of on-policy batches sampled at a random temperature (exploration)."""
    explore_temperature: tuple[float, float] = (0.5, 2.0)
    """Range of the uniform exploration temperature."""
    replay_prob: float = 0.0
    """Fraction of batches drawn from the replay buffer of high-reward responses."""
    replay_capacity: int = 32
    """Responses kept per prompt in the replay buffer (the highest log-reward ones)."""
    reward_temperature_start: float = 1.0
    """Reward temperature T at the first step (the loss targets R^(1/T))."""
    reward_temperature_end: float = 1.0
    """Reward temperature at the last step (linear schedule); 1.0 targets R itself."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    eval_every: int = 0
    """Every this many steps, log the ESS of target/policy weights on fresh samples (0: never)."""
    eval_prompts: int = 8
    """Prompts (the first of the fit prompts) used for the periodic ESS."""
    eval_samples: int = 64
    """Fresh samples per prompt for the periodic ESS."""
    checkpoint_every: int = 100
    """Every this many steps, write a checkpoint when `fit` has a checkpoint_dir (0: only at
    the end), so an interrupted fit resumes close to where it stopped."""
    adapter_name: str = "gflownet"
    """Name of the peft adapter holding the GFlowNet weights."""
    seed: int = 0
    """Seed of the training batches, exploration temperatures and sampling."""

    def __post_init__(self) -> None:
        self.explore_temperature = tuple(float(t) for t in self.explore_temperature)
        self.validate()

    def validate(self) -> None:
        """Raise a clear error on a bad setting (before any model work)."""
        check_count("max_new_tokens", self.max_new_tokens)
        check_count("lora_rank", self.lora_rank)
        check_count("twist_width", self.twist_width)
        check_count("twist_depth", self.twist_depth)
        check_count("prompts_per_step", self.prompts_per_step)
        check_count("samples_per_prompt", self.samples_per_prompt)
        check_count("replay_capacity", self.replay_capacity)
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"parametrization={self.parametrization!r} must be one of {PARAMETRIZATIONS}"
            )
        check_count("twist_updates", self.twist_updates)
        check_count("twist_buffer", self.twist_buffer)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {LOSSES}")
        if self.termination_gradient not in TERMINATION_GRADIENTS:
            raise ValueError(
                f"termination_gradient={self.termination_gradient!r} must be one of "
                f"{TERMINATION_GRADIENTS}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {WEIGHTINGS}")
        if self.lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay={self.lr_decay!r} must be 'cosine' or 'constant'")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError("steps and warmup_steps must be >= 0")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        for name in ("explore_prob", "replay_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        low, high = self.explore_temperature
        if not 0 < low <= high:
            raise ValueError(
                f"explore_temperature={self.explore_temperature} must be (low, high), 0 < low <= high"
            )
        for name in ("reward_temperature_start", "reward_temperature_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GFlowNetConfig:
        return dataclass_from_dict(cls, values)


@dataclass
class _TrainState:
    """What a checkpoint restores besides the weights."""

    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


class GFlowNetSampler(Sampler):
    """Samples from ``target`` with a LoRA policy fitted by modified SubTB.

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
        self.parametrization = config.parametrization
        if self.parametrization == "auto":
            self.parametrization = _auto_parametrization(target)
        if self.parametrization in ("residual", "twist") and not isinstance(
            target, GeometricMixture
        ):
            raise ValueError(
                f"parametrization={self.parametrization!r} needs a GeometricMixture target (its "
                "local product is the starting point); use parametrization='lora' for other "
                "targets"
            )
        self.target = target
        self.init = init
        self.config = config
        self.max_new_tokens = config.max_new_tokens
        # Initial weights are drawn at random: seed them, so a run is reproducible from its
        # config (and a resumed run continues the same trajectory), without touching global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if self.parametrization == "twist":
                local = target.local_product()
                self.head: TwistHead | None = TwistHead(
                    TwistedLocalProduct.in_features(local),
                    target.vocab_size,
                    width=config.twist_width,
                    depth=config.twist_depth,
                ).to(init.device)
                self.policy: Density = TwistedLocalProduct(local, self.head)
                self.trainable_parameters = list(self.head.parameters())
            else:
                self.head = None
                self.adapter_policy = init.add_adapter(config.adapter_name, self._lora_config())
                self.policy = self.adapter_policy
                if self.parametrization == "residual":
                    self.policy = ResidualLocalProduct(
                        target.local_product(), self.adapter_policy, init
                    )
                self.trainable_parameters = self._adapter_parameters()
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.replay = ReplayBuffer(config.replay_capacity)
        self.features = FeatureBuffer(config.twist_buffer)
        self.state = _TrainState()
        self._rng = random.Random(config.seed)
        self._torch_rng = torch.Generator(device=init.device).manual_seed(config.seed)

    # -- weights -----------------------------------------------------------------------------

    def _lora_config(self) -> LoraConfig:
        cfg = self.config
        return LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=adapters.lora_target_modules(self.init.model, cfg.lora_output_layer),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def _adapter_parameters(self) -> list[torch.nn.Parameter]:
        marker = f".{self.config.adapter_name}."
        params = [p for n, p in self.init.model.named_parameters() if marker in n]
        for param in params:
            param.requires_grad_(True)
        if not params:
            raise RuntimeError(f"adapter {self.config.adapter_name!r} has no parameters")
        return params

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """One dict per logged step: step, loss, log_reward, reward_temperature, lr, (ess)."""
        return self.state.metrics

    # -- training -------------------------------------------------------------------------------

    def reward_temperature(self, step: int, total: int) -> float:
        """Linear schedule from ``reward_temperature_start`` to ``reward_temperature_end``."""
        cfg = self.config
        frac = step / max(total - 1, 1)
        return cfg.reward_temperature_start + frac * (
            cfg.reward_temperature_end - cfg.reward_temperature_start
        )

    def learning_rate(self, step: int, total: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        if cfg.lr_decay == "constant":
            return cfg.learning_rate
        frac = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
        floor = 0.05
        return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    def _batch(
        self, prompt_ids: list[list[int]], recorder: StateRecorder | None = None
    ) -> tuple[list[list[int]], Samples, str]:
        """Responses for one training batch (no gradients): policy, tempered policy, or replay
        (``recorder`` sees the rollout's decoding states; a replayed batch has none)."""
        cfg = self.config
        k = cfg.samples_per_prompt
        if cfg.replay_prob > 0 and self._rng.random() < cfg.replay_prob:
            stored = self.replay.prompts()
            if stored:
                chosen = [list(self._rng.choice(stored)) for _ in range(cfg.prompts_per_step)]
                responses = [r for p in chosen for r in self.replay.sample(p, k, self._rng)]
                rows = [p for p in chosen for _ in range(k)]
                return rows, _samples_from(responses, cfg.max_new_tokens, self.init), "replay"
        chosen = [self._rng.choice(prompt_ids) for _ in range(cfg.prompts_per_step)]
        temperature, source = 1.0, "policy"
        if self._rng.random() < cfg.explore_prob:
            temperature, source = self._rng.uniform(*cfg.explore_temperature), "explore"
        samples = ancestral_sample(
            self.policy,
            chosen,
            k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=temperature,
            generator=self._torch_rng,
            on_state=recorder,
        )
        rows = [p for p in chosen for _ in range(k)]
        return rows, samples, source

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

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into the adapter and take one clipped optimizer step (also for
        other objectives on this policy, such as the ablation's maximum-likelihood oracle)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.config.max_grad_norm)
        self.optimizer.step()

    def distill_step(self, prompt_ids: list[list[int]], teacher: Density) -> dict:
        """One step of token-level distillation from ``teacher`` on responses it draws."""
        cfg = self.config
        chosen = [self._rng.choice(prompt_ids) for _ in range(cfg.prompts_per_step)]
        rows = [p for p in chosen for _ in range(cfg.samples_per_prompt)]
        # The teacher's log-probs at the states it visits come from its own rollout.
        recorder = StateRecorder(lambda state: [state.next_logprobs], cfg.max_new_tokens)
        with torch.no_grad():
            samples = ancestral_sample(
                teacher,
                chosen,
                cfg.samples_per_prompt,
                max_new_tokens=cfg.max_new_tokens,
                generator=self._torch_rng,
                on_state=recorder,
            )
            ids, lengths = samples.response_ids, samples.lengths
            (teacher_steps,) = recorder.values
        student_steps = self.policy.step_logprobs(rows, ids, lengths)
        loss = distillation_loss(teacher_steps, student_steps, lengths)
        self.optimizer_step(loss)
        return {
            "loss": float(loss.detach()),
            "empty_fraction": float((lengths == 0).double().mean()),
            "source": "teacher",
        }

    def _loss(
        self,
        scores: TokenScores,
        log_reward: torch.Tensor,
        group: torch.Tensor,
        reward_temperature: float,
    ) -> torch.Tensor:
        """The configured objective on one scored batch (``group [B]``: prompt of each row)."""
        cfg = self.config
        device = scores.token_logprobs.device
        args = (scores.token_logprobs, scores.eos_logprobs, log_reward.to(device), scores.lengths)
        if cfg.loss == "log_variance":
            return log_variance_loss(*args, group.to(device), reward_temperature=reward_temperature)
        if cfg.loss == "tb":
            # log Z is the flow derived at s_0: log R(s_0⊤)/T − log q(⊤|s_0).
            log_z = log_reward[:, 0].to(device) / reward_temperature - scores.eos_logprobs[:, 0]
            return trajectory_balance_loss(*args, log_z, reward_temperature=reward_temperature)
        return modified_subtb_loss(
            *args,
            subtb_lambda=cfg.subtb_lambda,
            weighting=cfg.weighting,
            reward_temperature=reward_temperature,
            termination_gradient=cfg.termination_gradient,
        )

    def train_step(self, prompt_ids: list[list[int]], reward_temperature: float = 1.0) -> dict:
        """One rollout and its update(s) toward the target on a batch drawn for ``prompt_ids``;
        returns its metrics."""
        cfg = self.config
        twist = isinstance(self.policy, TwistedLocalProduct)
        # The twist form keeps what the rollout computed (every component's step scores and
        # features at each state) instead of running the components again.
        recorder = None
        if twist:
            recorder = StateRecorder(lambda state: state.component_outputs(), cfg.max_new_tokens)
        rows, samples, source = self._batch(prompt_ids, recorder)
        ids, lengths = samples.response_ids, samples.lengths
        keys: dict[tuple[int, ...], int] = {}
        group = torch.tensor([keys.setdefault(tuple(r), len(keys)) for r in rows])
        if twist:
            if recorder.values is None:  # a replayed batch: no rollout to read from
                steps, features = self.policy.component_outputs(rows, ids, lengths)
            else:
                count = len(self.target.components)
                steps, features = recorder.values[:count], recorder.values[count:]
            log_reward = self._log_reward(steps, ids, lengths)
            batch = {
                "steps": list(steps),
                "features": list(features),
                "response_ids": ids,
                "lengths": lengths,
                "log_reward": log_reward,
                "group": group,
            }
            self.features.add(batch)
            loss = self._twist_update(batch, reward_temperature)
            for _ in range(cfg.twist_updates - 1):
                self._twist_update(self.features.sample(self._rng), reward_temperature)
        else:
            log_reward, scores = self._scores(rows, ids, lengths)
            loss = self._loss(scores, log_reward, group, reward_temperature)
            self.optimizer_step(loss)
        final = log_reward.gather(1, lengths.to(log_reward.device)[:, None]).squeeze(1)
        if source != "replay" and cfg.replay_prob > 0:
            self.replay.add(rows, samples.responses(), final.tolist())
        finite = final[torch.isfinite(final)]
        return {
            "loss": float(loss.detach()),
            "log_reward": float(finite.mean()) if len(finite) else float("-inf"),
            "empty_fraction": float((lengths == 0).double().mean()),
            "source": source,
        }

    def _twist_update(
        self, batch: dict[str, torch.Tensor], reward_temperature: float
    ) -> torch.Tensor:
        """One head update on a stored (or fresh) batch of component outputs."""
        outputs = (batch["steps"], batch["features"])
        scores = self.policy.scores_from_outputs(outputs, batch["response_ids"], batch["lengths"])
        loss = self._loss(scores, batch["log_reward"], batch["group"], reward_temperature)
        self.optimizer_step(loss)
        return loss

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
    ) -> list[dict[str, Any]]:
        """Train on ``prompts`` for ``steps`` optimizer steps (default ``config.steps``).

        Without ``teacher`` each step is a SubTB step toward the target. With ``teacher`` (a
        normalized density over the same vocabulary, typically a more exact but costlier
        GFlowNet policy such as the twisted form), each step distills it instead: the
        sequence-level KL(teacher ‖ policy) on the teacher's draws, token by token.

        With ``checkpoint_dir``, checkpoints (adapter, optimizer, RNG, replay buffer, metrics)
        are written atomically every ``config.checkpoint_every`` steps and at the end; with
        ``resume=True`` training continues from the latest one found there (an interrupted
        fit resumes where it stopped). Returns the metrics log.
        """
        check_prompts(prompts)
        prompt_ids = self.init.encode_prompts(prompts)
        total = self.config.steps if steps is None else steps
        if total < 0:
            raise ValueError(f"steps={total} must be >= 0")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where checkpoints were written)")
        if teacher is not None and (
            not teacher.normalized
            or teacher.vocab_size != self.target.vocab_size
            or teacher.eos_token_id != self.target.eos_token_id
        ):
            raise ValueError(
                "teacher must be a normalized density (e.g. another GFlowNetSampler's .policy) "
                "over the target's vocabulary and EOS token"
            )
        if checkpoint_dir is not None:
            make_directory(checkpoint_dir, "checkpoint_dir")  # fail now, not after training
        latest = None if checkpoint_dir is None else latest_checkpoint(checkpoint_dir)
        if latest is not None and not resume and self.state.step == 0:
            # Starting afresh would replace that fit's checkpoints: never without being asked.
            raise ValueError(
                f"checkpoint_dir={str(checkpoint_dir)!r} already holds a GFlowNet fit "
                f"({latest.name}); pass resume=True (--resume) to continue it, or give an empty "
                "or new checkpoint_dir to start afresh"
            )
        if resume and latest is not None:
            self._check_resumable(latest)
            self._load_checkpoint(latest)
        eval_prompts = prompt_ids[: self.config.eval_prompts]
        bar = tqdm(
            total=total, initial=self.state.step, disable=not progress, desc="gflownet", leave=False
        )
        started = time.perf_counter()
        while self.state.step < total:
            step = self.state.step
            lr = self.learning_rate(step, total)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            temp = self.reward_temperature(step, total)
            if teacher is None:
                record = self.train_step(prompt_ids, temp)
            else:
                record = self.distill_step(prompt_ids, teacher)
            self.state.step += 1
            done = self.state.step
            cfg = self.config
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == total):
                record["ess"] = self.ess(eval_prompts, cfg.eval_samples)
            if done % log_every == 0 or done == total or "ess" in record:
                record.update(
                    step=done,
                    lr=lr,
                    reward_temperature=temp,
                    seconds=time.perf_counter() - started,
                )
                self.state.metrics.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3g}")
            bar.update(1)
            if (
                checkpoint_dir is not None
                and cfg.checkpoint_every
                and done % cfg.checkpoint_every == 0
            ):
                self.save_checkpoint(checkpoint_dir)
        bar.close()
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir)
        return self.state.metrics

    @torch.no_grad()
    def ess(self, prompts: Sequence[PromptLike], num_samples: int) -> float:
        """Mean over prompts of ESS/N of the weights G̃/q on fresh policy samples."""
        samples = self.sample(prompts, num_samples, generator=self._torch_rng)
        log_w = (samples.log_target - samples.log_q).view(len(prompts), num_samples)
        return float(ess_fraction(log_w).mean())

    # -- sampling ----------------------------------------------------------------------------

    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        *,
        generator: torch.Generator | int | None = None,
    ) -> Samples:
        """Ancestral samples from the trained policy; ``log_q`` exact, ``log_target`` scored.

        ``stats["ess"]`` is ESS/N of the weights G̃/q per prompt and ``stats["log_z"]`` the
        importance estimate log mean(G̃/q) per prompt (a lower bound in expectation).
        """
        check_prompts(prompts)
        check_count("num_samples", num_samples)
        prompt_ids = self.init.encode_prompts(prompts)
        started = time.perf_counter()
        tokens_before = self.policy.tokens_evaluated
        samples = ancestral_sample(
            self.policy,
            prompt_ids,
            num_samples,
            max_new_tokens=self.max_new_tokens,
            generator=generator,
        )
        samples.stats["tokens"] = self.policy.tokens_evaluated - tokens_before
        samples.log_target = self._score_target(prompt_ids, samples)
        log_w = (samples.log_target - samples.log_q).view(len(prompt_ids), num_samples)
        samples.stats["ess"] = ess_fraction(log_w).tolist()
        samples.stats["log_z"] = (torch.logsumexp(log_w, dim=1) - math.log(num_samples)).tolist()
        samples.stats["elbo"] = log_w.mean(dim=1).tolist()
        samples.stats["seconds"] = time.perf_counter() - started
        return samples

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the adapter (peft format) and the config JSON to ``directory``, atomically."""
        with atomic_directory(directory) as tmp:
            self._write_adapter(tmp)
        return Path(directory)

    def _write_adapter(self, directory: Path) -> None:
        from safetensors.torch import save_file

        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        if self.head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(directory / TWIST_WEIGHTS))
            return
        model = self.init.model
        name = self.config.adapter_name
        state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(directory / ADAPTER_WEIGHTS),
        )
        model.peft_config[name].save_pretrained(str(directory))

    def _check_resumable(self, checkpoint: Path) -> None:
        """Refuse to resume a checkpoint written with different settings (before loading it)."""
        saved = _read_config(checkpoint)
        mine = json.loads(json.dumps(asdict(self.config)))  # tuples as lists, like the file
        diff = sorted(
            k
            for k in set(saved) | set(mine)
            if k not in RESUMABLE_FIELDS and saved.get(k) != mine.get(k)
        )
        if diff:
            detail = ", ".join(
                f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff
            )
            raise ValueError(
                f"checkpoint_dir={str(checkpoint.parent)!r} holds a fit with a different "
                f"configuration ({detail}); resume with the original settings or choose a new "
                "checkpoint_dir"
            )

    @classmethod
    def load(
        cls, directory: str | os.PathLike, target: Density, init: Policy, **overrides: Any
    ) -> GFlowNetSampler:
        """A sampler with the config and weights saved by :meth:`save` (or a checkpoint)."""
        directory = Path(directory)
        _check_files(directory, (CONFIG_FILE,))
        config = GFlowNetConfig.from_dict({**_read_config(directory), **overrides})
        sampler = cls(target, init, config)
        sampler._read_adapter(directory)
        return sampler

    @property
    def _weights_file(self) -> str:
        return TWIST_WEIGHTS if self.head is not None else ADAPTER_WEIGHTS

    def _read_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The saved trainable tensors, refused when unreadable or not finite."""
        from safetensors.torch import load_file

        path = directory / self._weights_file
        _check_files(directory, (self._weights_file,))
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError on bad headers
            raise _corrupted(path, error) from error
        bad = [name for name, value in state.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(
                f"{str(path)!r} holds non-finite values (NaN or inf) in {bad[:3]}: the fit that "
                "wrote it diverged; retrain (e.g. with a lower learning_rate) instead of loading it"
            )
        return state

    def _read_adapter(self, directory: Path) -> None:
        state = self._read_weights(directory)
        if self.head is not None:
            mine = self.head.state_dict()
            wrong = sorted(
                k
                for k in set(mine) | set(state)
                if k not in state or k not in mine or state[k].shape != mine[k].shape
            )
            if wrong:
                raise ValueError(
                    f"twist head weights in {directory} do not match this config: {wrong[:3]}"
                )
            self.head.load_state_dict(state)
            return
        result = set_peft_model_state_dict(
            self.init.model, state, adapter_name=self.config.adapter_name
        )
        unexpected = [k for k in result.unexpected_keys if "lora" in k]
        if unexpected:
            raise ValueError(f"adapter weights in {directory} do not match: {unexpected[:3]}")

    def save_checkpoint(self, checkpoint_dir: str | os.PathLike) -> Path:
        """Write ``step_NNNNNNN/`` atomically (temp dir, then rename); keep only the latest."""
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = checkpoint_dir / f"step_{self.state.step:07d}"

        def write(directory: Path) -> None:
            self._write_adapter(directory)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "torch_rng": self._torch_rng.get_state(),
                    "python_rng": self._rng.getstate(),
                    "replay": self.replay.state_dict(),
                    "features": self.features.state_dict(),
                },
                directory / TRAINER_STATE,
            )
            (directory / METRICS_FILE).write_text(
                json.dumps({"step": self.state.step, "metrics": self.state.metrics})
            )

        with atomic_directory(final) as tmp:
            write(tmp)
        for old in _checkpoints(checkpoint_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, directory: Path) -> None:
        _check_files(directory, (CONFIG_FILE, self._weights_file, TRAINER_STATE, METRICS_FILE))
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
            raise _corrupted(directory / TRAINER_STATE, error) from error
        try:
            log = json.loads((directory / METRICS_FILE).read_text())
        except ValueError as error:
            raise _corrupted(directory / METRICS_FILE, error) from error
        self._read_adapter(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self._torch_rng.set_state(state["torch_rng"])
        self._rng.setstate(state["python_rng"])
        self.replay.load_state_dict(state["replay"])
        self.features.load_state_dict(state["features"])
        self.state = _TrainState(step=int(log["step"]), metrics=list(log["metrics"]))


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


def _auto_parametrization(target: Density) -> str:
    """twist for a geometric mixture of policies (it reads their hidden states), residual for
    one over other densities, lora for any other target."""
    if not isinstance(target, GeometricMixture):
        return "lora"
    if TwistedLocalProduct.supports(target.components):
        return "twist"
    return "residual"


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoint_dir`` (None if none)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = [
        p
        for p in _checkpoints(checkpoint_dir)
        if (p / TRAINER_STATE).is_file() and (p / CONFIG_FILE).is_file()
    ]
    return max(found, key=lambda p: p.name) if found else None


def _check_files(directory: Path, names: Sequence[str]) -> None:
    """Raise FileNotFoundError naming the missing files of a saved sampler or checkpoint."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(directory)!r} lacks {missing}: give a directory written by "
            "GFlowNetSampler.save or a checkpoint_dir's step_NNNNNNN folder"
        )


def _corrupted(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{str(path)!r} is corrupted or truncated ({type(error).__name__}: {error}); delete "
        "that folder (a fit then resumes from scratch) or save the sampler again"
    )


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as error:
        raise _corrupted(directory / CONFIG_FILE, error) from error


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished ``step_NNNNNNN`` folders (temporary siblings of an interrupted write excluded)."""
    return [p for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]


def ess_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS/N = (Σw)² / (N Σw²) along the last axis, from log-weights (-inf allowed)."""
    log_weights = log_weights.double()
    count = log_weights.shape[-1]
    log_ess = 2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)
    return (log_ess.exp() / count).nan_to_num(0.0)


def _samples_from(
    responses: Sequence[tuple[int, ...]], max_new_tokens: int, policy: Policy
) -> Samples:
    """Pack replayed responses as a Samples batch (no log_q: they were not sampled now)."""
    ids = torch.full((len(responses), max_new_tokens), policy.pad_token_id, dtype=torch.long)
    for row, response in enumerate(responses):
        ids[row, : len(response)] = torch.tensor(response, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    device = policy.device
    return Samples(
        prompt_index=torch.arange(len(responses), device=device),
        response_ids=ids.to(device),
        lengths=lengths.to(device),
        texts=[],
    )
