"""gfn-spin: samplers for mixtures of language models and α-SPIN self-play fine-tuning.

The public names other code relies on (DESIGN §8) are importable from here.
"""

from gfn_spin.alpha_spin import AlphaSpinConfig, AlphaSpinTrainer
from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture, GeometricMixture, LocalProduct
from gfn_spin.policy import Policy
from gfn_spin.scores import TokenScores

__all__ = [
    "AlphaSpinConfig",
    "AlphaSpinTrainer",
    "ArithmeticMixture",
    "Density",
    "GeometricMixture",
    "LocalProduct",
    "Policy",
    "TokenScores",
]
__version__ = "0.1.0"
