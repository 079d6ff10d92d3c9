"""α-SPIN self-play fine-tuning: the config, the reference, the opponent's data, the training
loop (through ``accelerate``) and the resumable run directory (docs/alpha_spin.md).

Above the samplers and the density core in the package layers (docs/layering.md).
"""

from selfplay.config import AlphaSpinConfig
from selfplay.trainer import AlphaSpinTrainer

__all__ = ["AlphaSpinConfig", "AlphaSpinTrainer"]
