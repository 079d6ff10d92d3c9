"""Samplers for mixtures of language models behind one interface (DESIGN §5).

Which to use:

- :class:`AncestralSampler`: any autoregressive model; exact, one model token per token.
- :class:`ArithmeticMixtureSampler`: ``Σ w_c π_c`` exactly (cost: one token per component).
- :class:`ExactSampler`: enumerate and draw; the reference on small worlds only.
"""

from samplers.ancestral import AncestralSampler, ArithmeticMixtureSampler
from samplers.base import Sampler, Samples

__all__ = ["AncestralSampler", "ArithmeticMixtureSampler", "Sampler", "Samples"]
