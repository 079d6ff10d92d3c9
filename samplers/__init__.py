"""Samplers for mixtures of language models behind one interface (docs/samplers.md).

Every sampler has ``sample(prompts, num_samples=1, *, generator=None) -> Samples`` and counts
the model tokens it spent in ``stats["tokens"]``. Which to use:

- :class:`AncestralSampler`: any autoregressive model (a policy, a local product, a trained
  GFlowNet); exact, ``log_q`` exact. Cost per draw: one model token per component per
  generated token (plus the prompt).
- :class:`ArithmeticMixtureSampler`: ``Σ w_c π_c`` exactly (α = 1 in α-SPIN); same cost, one
  token per component.
- :class:`ImportanceResampler`: a geometric mixture (or any unnormalized target) from a
  proposal that is already close (local product, π_t at α near 1, a GFlowNet). No training;
  reports ESS and ``log Ẑ``. Biased at finite K (first order ``ρ/K`` in TV). Cost per draw: K
  proposal samples plus one teacher-forced target pass over them.
- :class:`SMCSampler`: a geometric mixture when the local product drifts over long responses;
  resampling keeps particles on prefixes the target likes; unbiased ``Ẑ``. Cost per draw: N
  particles × proposal components (× target components too for a proposal other than the
  local product), no scoring pass. With a trained GFlowNet: ``proposal=gfn.policy,
  twist="flow"`` (its prefix flow as the look-ahead potential).
- :class:`GFlowNetSampler`: a geometric mixture sampled many times (α-SPIN iterations): a
  policy trained once with SubTB (``.fit``): the local product times a learned twist head
  (the default for a mixture of policies), or a LoRA correction on it, or a LoRA adapter on
  one policy; afterwards plain ancestral sampling with ``log_q`` exact, at the cost of the
  local product (twist), one pass more (residual) or one model token per generated token
  (lora); also the best SIR/SMC proposal.
- :class:`ExactSampler`: enumerate and draw; the reference on small worlds only (refuses
  large enumerations before any model work). Cost: the whole prefix tree once per prompt.

Rule of thumb: α = 1 → ArithmeticMixtureSampler; ESS/K of SIR with the local product above
~0.5 → ImportanceResampler with small K; otherwise SMCSampler, or train a GFlowNet and use it
as the proposal.
"""

from samplers.ancestral import AncestralSampler, ArithmeticMixtureSampler
from samplers.base import Sampler, Samples
from samplers.enumerated import ExactSampler
from samplers.gflownet import GFlowNetSampler
from samplers.importance import ImportanceResampler
from samplers.smc import SMCSampler
from samplers.smc_twists import Twist, TwistInputs, flow_twist

__all__ = [
    "AncestralSampler",
    "ArithmeticMixtureSampler",
    "ExactSampler",
    "GFlowNetSampler",
    "ImportanceResampler",
    "SMCSampler",
    "Sampler",
    "Samples",
    "Twist",
    "TwistInputs",
    "flow_twist",
]
