"""gfn-spin's density core: policies, token scores, mixtures of language models.

The public names other code relies on (docs/layering.md) are importable from here; the
samplers live in :mod:`samplers` and α-SPIN self-play in :mod:`selfplay`.
"""

from gfn_spin.density import Density
from gfn_spin.mixtures import ArithmeticMixture, GeometricMixture, LocalProduct
from gfn_spin.policy import Policy
from gfn_spin.scores import TokenScores

__all__ = [
    "ArithmeticMixture",
    "Density",
    "GeometricMixture",
    "LocalProduct",
    "Policy",
    "TokenScores",
]
__version__ = "0.1.0"
