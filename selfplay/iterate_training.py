"""Training one iterate π_(t+1) on its iteration's data with the SPIN loss, through
``accelerate``.

The policy is scored by :class:`PairScorer`, the module ``Accelerator.prepare`` wraps (DDP on
several processes; the configuration from ``accelerate config`` applies). Each global
micro-batch of ``batch_size`` rows is split across processes; one teacher-forced pass per
micro-batch scores y and y' together. The loss is scaled so that the update is the mean over
the global batch whatever the number of processes, and every process ends with the same
weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from gfn_spin.policy import Policy
from gfn_spin.schedules import lr_schedule
from objectives.spin import spin_loss, spin_metrics
from selfplay.config import AlphaSpinConfig, derive_seed
from selfplay.iteration_data import IterationData

#: spin_metrics keys averaged over an iteration's training rows, and the names they report.
METRICS = {
    "rewards/real": "train/rewards_real",
    "rewards/generated": "train/rewards_generated",
    "rewards/margins": "train/margin",
    "rewards/accuracies": "train/accuracy",
}


class PairScorer(torch.nn.Module):
    """``log p_θ`` of responses under a policy, as a module ``Accelerator.prepare`` can wrap."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.model = policy.model  # registered, so that the wrapper sees the trainable weights

    def forward(
        self, prompts: Sequence[Sequence[int]], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        return self.policy.log_prob(prompts, response_ids, lengths)


def make_optimizer(
    config: AlphaSpinConfig, parameters: Sequence[torch.nn.Parameter], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A fresh optimizer for one iteration, and its learning-rate schedule over its steps."""
    cls = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
    optimizer = cls[config.optimizer](
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # No warmup with a constant rate, as transformers' "constant" (which runs kept).
    warmup = 0 if config.lr_decay == "constant" else int(config.warmup_ratio * total_steps)
    scheduler = lr_schedule(optimizer, total_steps, warmup_steps=warmup, decay=config.lr_decay)
    return optimizer, scheduler


def batch_loss(
    scorer: torch.nn.Module, data: IterationData, rows: torch.Tensor, config: AlphaSpinConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-row SPIN losses ``[B]`` of ``rows`` and their spin_metrics, from one teacher-forced
    pass over the real and generated responses together."""
    prompts = [data.prompt_ids[i] for i in rows.tolist()]
    logps = scorer(
        prompts + prompts,
        torch.cat([data.real_ids[rows], data.generated_ids[rows]]),
        torch.cat([data.real_lengths[rows], data.generated_lengths[rows]]),
    )
    policy_real, policy_generated = logps[: len(rows)], logps[len(rows) :]
    ref_real = data.ref_real_logps[rows].to(logps.device)
    ref_generated = data.ref_generated_logps[rows].to(logps.device)
    losses = spin_loss(
        policy_real,
        policy_generated,
        ref_real,
        ref_generated,
        beta=config.beta,
        loss_type=config.loss_type,
        real_lengths=data.real_lengths[rows].to(logps.device),
        generated_lengths=data.generated_lengths[rows].to(logps.device),
    )
    metrics = spin_metrics(policy_real, policy_generated, ref_real, ref_generated, beta=config.beta)
    return losses, metrics


@dataclass
class StepParts:
    """What every micro-batch of one iterate's training uses: the prepared scorer and
    optimizer, the trainable weights, the accelerator, the config and the loss scale."""

    scorer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    parameters: Sequence[torch.nn.Parameter]
    accelerator: Accelerator
    config: AlphaSpinConfig
    scale: float


def micro_batch_step(
    parts: StepParts,
    data: IterationData,
    rows: torch.Tensor,
    totals: torch.Tensor,
    iterate: str,
    where: str,
) -> None:
    """One micro-batch of ``rows``: its SPIN loss backpropagated (the optimizer steps at the
    end of an accumulation cycle), and its loss, metrics and row count added to ``totals``."""
    accelerator, config = parts.accelerator, parts.config
    with accelerator.accumulate(parts.scorer):
        losses, metrics = batch_loss(parts.scorer, data, rows, config)
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(
                f"the SPIN loss of {iterate} is not finite at {where}. Lower "
                "learning_rate or beta, or set max_grad_norm"
            )
        accelerator.backward(losses.sum() * parts.scale)
        if accelerator.sync_gradients and config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(parts.parameters, config.max_grad_norm)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
    totals += torch.tensor(
        [float(losses.detach().double().sum())]
        + [metrics[key] * len(rows) for key in METRICS]
        + [float(len(rows))],
        dtype=torch.float64,
    )


def train_iterate(
    policy: Policy,
    parameters: Sequence[torch.nn.Parameter],
    data: IterationData,
    config: AlphaSpinConfig,
    *,
    iteration: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Minimize the SPIN loss of ``policy`` on an iteration's data; returns training metrics
    (means over the iteration's rows, every process's included).

    Raises:
        ValueError: fewer examples than one optimizer step.
        FloatingPointError: a non-finite loss or weights (nothing of the iteration is kept).
    """
    rows_per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = len(data) // rows_per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(data)} examples are fewer than one optimizer step of batch_size × "
            f"gradient_accumulation_steps = {rows_per_step}; lower batch_size"
        )
    total_steps = steps_per_epoch * config.epochs
    optimizer, scheduler = make_optimizer(config, parameters, total_steps)
    # The schedule stays unprepared: it advances once per optimizer step on every process.
    scorer, optimizer = accelerator.prepare(PairScorer(policy), optimizer)
    rank, size = accelerator.process_index, accelerator.num_processes
    # Each process's loss is its rows' sum over the global micro-batch size, times the process
    # count (the wrapper averages gradients over processes; accelerate divides by the
    # accumulation steps): the update is the global-batch mean.
    scale = size / config.batch_size
    totals = torch.zeros(2 + len(METRICS), dtype=torch.float64)  # loss, metrics, rows
    step_parts = StepParts(scorer, optimizer, parameters, accelerator, config, scale)
    policy.model.train()
    bar = tqdm(
        total=total_steps,
        desc=f"train π_{iteration + 1}",
        disable=not (config.progress and accelerator.is_main_process),
        leave=False,
    )
    for epoch in range(config.epochs):
        seed = derive_seed(config.seed, "order", iteration, epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        for step in range(steps_per_epoch):
            where = (
                f"optimizer step {epoch * steps_per_epoch + step + 1} of {total_steps} (epoch "
                f"{epoch + 1}); nothing of this iteration is saved"
            )
            first = step * rows_per_step
            for start in range(first, first + rows_per_step, config.batch_size):
                rows = order[start : start + config.batch_size][rank::size]
                micro_batch_step(step_parts, data, rows, totals, f"π_{iteration + 1}", where)
            scheduler.step()
            with torch.no_grad():
                finite = all(bool(torch.isfinite(p).all()) for p in parameters)
            if not finite:
                raise FloatingPointError(
                    f"the weights of π_{iteration + 1} became non-finite at {where}. Lower "
                    "learning_rate, or set max_grad_norm"
                )
            bar.update(1)
    bar.close()
    policy.model.eval()
    totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    count = float(totals[-1])
    result = {"train/loss": float(totals[0]) / count}
    result.update({name: float(totals[1 + i]) / count for i, name in enumerate(METRICS.values())})
    result["train/steps"] = total_steps
    return result
