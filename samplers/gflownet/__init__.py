"""The GFlowNet sampler, in parts: its config, the parametrizations (one class per form of the
trainable density, registered by name), the objectives, the trainer (the fit loop, with a
pluggable loss and batch source), and the sampler that fits, samples and checkpoints them
(docs/gflownet.md)."""

from samplers.gflownet.batches import TrainingBatch
from samplers.gflownet.config import LOSSES, GFlowNetConfig
from samplers.gflownet.losses import OBJECTIVES, LossFunction
from samplers.gflownet.parametrization import Parametrization, build_parametrization
from samplers.gflownet.registry import PARAMETRIZATIONS, register
from samplers.gflownet.sampler import (
    CONFIG_FILE,
    TRAINER_STATE,
    GFlowNetSampler,
    latest_checkpoint,
)
from samplers.gflownet.trainer import (
    GFlowNetTrainer,
    RolloutSource,
    StateRecorder,
    TeacherSource,
)

__all__ = [
    "CONFIG_FILE",
    "LOSSES",
    "OBJECTIVES",
    "PARAMETRIZATIONS",
    "TRAINER_STATE",
    "GFlowNetConfig",
    "GFlowNetSampler",
    "GFlowNetTrainer",
    "LossFunction",
    "Parametrization",
    "RolloutSource",
    "StateRecorder",
    "TeacherSource",
    "TrainingBatch",
    "build_parametrization",
    "latest_checkpoint",
    "register",
]
