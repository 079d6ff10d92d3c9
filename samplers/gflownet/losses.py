"""The GFlowNet objectives the trainer can use, as functions of one scored batch.

For the trainer and for users who plug in their own objective: a :data:`LossFunction` maps the
config, the policy's token scores, the target's prefix-terminal log-densities and the prompt of
each row to a scalar loss. The tensor math lives in :mod:`objectives.subtb`; these adapters
only pick the arguments each objective reads (docs/gflownet.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gfn_spin.scores import TokenScores
from objectives.subtb import log_variance_loss, modified_subtb_loss, trajectory_balance_loss
from samplers.gflownet.config import GFlowNetConfig

#: A GFlowNet objective on one scored batch: (config, policy scores, ``log R [B, L+1]``,
#: ``group [B]`` the prompt of each row, reward temperature) -> scalar loss.
LossFunction = Callable[
    [GFlowNetConfig, TokenScores, torch.Tensor, torch.Tensor, float], torch.Tensor
]


def subtb_objective(
    config: GFlowNetConfig,
    scores: TokenScores,
    log_reward: torch.Tensor,
    group: torch.Tensor,
    reward_temperature: float,
) -> torch.Tensor:
    """Modified sub-trajectory balance over every window."""
    return modified_subtb_loss(
        scores.token_logprobs,
        scores.eos_logprobs,
        log_reward,
        scores.lengths,
        subtb_lambda=config.subtb_lambda,
        weighting=config.weighting,
        reward_temperature=reward_temperature,
        termination_gradient=config.termination_gradient,
    )


def tb_objective(
    config: GFlowNetConfig,
    scores: TokenScores,
    log_reward: torch.Tensor,
    group: torch.Tensor,
    reward_temperature: float,
) -> torch.Tensor:
    """Trajectory balance with log Z the flow derived at s_0: log R(s_0⊤)/T − log q(⊤|s_0)."""
    log_z = log_reward[:, 0] / reward_temperature - scores.eos_logprobs[:, 0]
    return trajectory_balance_loss(
        scores.token_logprobs,
        scores.eos_logprobs,
        log_reward,
        scores.lengths,
        log_z,
        reward_temperature=reward_temperature,
    )


def log_variance_objective(
    config: GFlowNetConfig,
    scores: TokenScores,
    log_reward: torch.Tensor,
    group: torch.Tensor,
    reward_temperature: float,
) -> torch.Tensor:
    """VarGrad: the variance of log R − log q among one prompt's responses."""
    return log_variance_loss(
        scores.token_logprobs,
        scores.eos_logprobs,
        log_reward,
        scores.lengths,
        group,
        reward_temperature=reward_temperature,
    )


#: The objectives ``GFlowNetConfig.loss`` names.
OBJECTIVES: dict[str, LossFunction] = {
    "subtb": subtb_objective,
    "tb": tb_objective,
    "log_variance": log_variance_objective,
}
