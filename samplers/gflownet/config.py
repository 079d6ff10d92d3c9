"""``GFlowNetConfig``: every setting of the GFlowNet sampler and its training.

For users and for command-line front ends: each field carries its help text in
``metadata["help"]`` and choices as ``typing.Literal`` types, so a parser built from the
dataclass (``transformers.HfArgumentParser``) shows the same documentation. The config is saved
as JSON beside the weights and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gfn_spin.adapters import check_adapter_name
from gfn_spin.io import dataclass_from_dict
from gfn_spin.options import option
from gfn_spin.samples import check_count
from gfn_spin.schedules import LR_DECAYS, LrDecay
from objectives.subtb import TERMINATION_GRADIENTS, WEIGHTINGS
from samplers.gflownet.registry import PARAMETRIZATIONS

Loss = Literal["subtb", "tb", "log_variance"]
Weighting = Literal["batch", "geometric_within"]
TerminationGradient = Literal["all", "anchor"]
Optimizer = Literal["adamw", "adafactor"]

LOSSES: tuple[str, ...] = get_args(Loss)
assert get_args(Weighting) == WEIGHTINGS and get_args(TerminationGradient) == TERMINATION_GRADIENTS

#: Config fields a resumed fit may change (they do not change the trajectory of the steps done).
RESUMABLE_FIELDS = ("steps", "checkpoint_every")
#: Fields a run that fits GFlowNets sets itself (its length cap, one adapter name and seed per
#: fit): a study's or α-SPIN's nested GFlowNet config offers no flag for them and records none.
RUN_DERIVED_FIELDS = ("max_new_tokens", "adapter_name", "seed")


#: What 0 means for the count fields that may be 0.
_ZERO = {
    "steps": "no training",
    "warmup_steps": "no warmup",
    "eval_every": "never",
    "checkpoint_every": "only at the end",
}


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_real(name: str, value: Any, low: float, open_low: bool) -> None:
    """Refuse a setting that is not a finite number above ``low`` (or at least ``low``)."""
    if not (_is_real(value) and (value > low if open_low else value >= low)):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")


#: Where the "cosine" and "linear" decays of a GFlowNet fit end, as a fraction of the peak.
LR_FLOOR = 0.05


@dataclass
class GFlowNetConfig:
    """Every setting of the GFlowNet sampler and its training (saved with the weights)."""

    max_new_tokens: int = option(7, "Length cap L of responses (the stop at L is forced).")
    parametrization: str = option(
        "auto",
        '"twist": local product × a twist head on the components\' hidden states (needs a '
        'GeometricMixture of policies); "residual": local product × a LoRA correction (needs a '
        'GeometricMixture); "lora": LoRA on the init policy\'s weights, one model pass per '
        'token; "auto": twist, else residual, else lora, whichever the target allows; or the '
        "name of a registered samplers.gflownet.Parametrization (docs/gflownet.md).",
    )
    twist_width: int = option(256, '"twist": hidden width of the twist head (an MLP).')
    twist_depth: int = option(2, '"twist": hidden layers of the twist head.')
    prompt_attention: int = option(
        64,
        "\"prompt_twist\": width of the head's attention over the prompt's hidden states (4 "
        "heads).",
    )
    lora_rank: int = option(32, "LoRA rank r (the published LM recipe uses 64).")
    lora_alpha: float = option(
        32.0, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank)."
    )
    lora_output_layer: bool = option(
        True,
        "Also put LoRA on the output (LM head) layer, besides every attention and MLP projection.",
    )
    steps: int = option(1000, "Optimizer steps of `fit` (when `fit` is not given `steps`).")
    refine_steps: int = option(
        50,
        "Steps of `refine`: a semi-amortized fit on the prompts about to be served, started "
        "from the amortized weights.",
    )
    optimizer: Optimizer = option(
        "adamw",
        '"adamw" (torch), or "adafactor" (transformers\' Adafactor, no first moment, factored '
        "second moments, a fixed learning rate): its state is a row and a column per weight "
        "matrix, so a checkpoint is about the size of the trainable weights, against 3x with "
        "AdamW's two moments (a twist head on a 49k vocabulary: 50 MB against 150 MB).",
    )
    learning_rate: float = option(
        2e-3, "Peak learning rate (the published 1e-4 is for GPT-2-size models)."
    )
    warmup_steps: int = option(20, "Linear learning-rate warmup steps.")
    lr_decay: LrDecay = option(
        "cosine",
        'Learning-rate decay after warmup (gfn_spin.schedules): "cosine", "linear" (both to 5% '
        'of the peak) or "constant".',
    )
    weight_decay: float = option(0.0, "Weight decay on the trainable weights (decoupled).")
    prompts_per_step: int = option(
        16, "Prompts in one training batch (drawn uniformly from the fit prompts)."
    )
    samples_per_prompt: int = option(4, "Responses per prompt in one training batch.")
    loss: Loss = option(
        "subtb",
        'Training objective: "subtb" (modified sub-trajectory balance over every window), "tb" '
        '(trajectory balance, log Z the derived flow at s_0) or "log_variance" (VarGrad: the '
        "variance of log R − log q among one prompt's responses, a per-prompt batch log Z).",
    )
    subtb_lambda: float = option(
        1.0, "SubTB λ: weight λ^(j-i-1) of the sub-trajectory from s_i to s_j."
    )
    termination_gradient: TerminationGradient = option(
        "all",
        '"all", or "anchor": stop log-probs get gradient from the full-trajectory window only '
        "(guards against shifting the stop logits to shrink many windows at once; same loss "
        "value).",
    )
    twist_updates: int = option(
        8,
        '"twist": head updates per rollout; the first uses the fresh batch, the others stored '
        "batches, whose component scores are recomputed from their stored features through "
        "each component's LM head (the components are frozen, so they are exact).",
    )
    twist_buffer: int = option(
        64,
        '"twist": training batches kept for the extra head updates (token ids, lengths, '
        "rewards and features: nothing that scales with the vocabulary).",
    )
    weighting: Weighting = option(
        "batch", 'SubTB normalization: "batch" (published LM recipe) or "geometric_within".'
    )
    explore_prob: float = option(
        0.667, "Fraction of on-policy batches sampled at a random temperature (exploration)."
    )
    explore_temperature: tuple[float, float] = option(
        (0.5, 2.0), "Range of the uniform exploration temperature."
    )
    replay_prob: float = option(
        0.0, "Fraction of batches drawn from the replay buffer of high-reward responses."
    )
    replay_capacity: int = option(
        32, "Responses kept per prompt in the replay buffer (the highest log-reward ones)."
    )
    reward_temperature_start: float = option(
        1.0, "Reward temperature T at the first step (the loss targets R^(1/T))."
    )
    reward_temperature_end: float = option(
        1.0, "Reward temperature at the last step (linear schedule); 1.0 targets R itself."
    )
    max_grad_norm: float | None = option(1.0, "Gradient clipping norm (None: no clipping).")
    eval_every: int = option(
        0,
        "Every this many steps, log the ESS/N of target/policy weights on fresh samples "
        "(0: never).",
    )
    eval_prompts: int = option(8, "Prompts (the first of the fit prompts) for the periodic ESS.")
    eval_samples: int = option(64, "Fresh samples per prompt for the periodic ESS.")
    checkpoint_every: int = option(
        100,
        "Every this many steps, write a checkpoint when `fit` has a checkpoint_dir (0: only at "
        "the end), so an interrupted fit resumes close to where it stopped.",
    )
    adapter_name: str = option("gflownet", "Name of the peft adapter holding the LoRA weights.")
    seed: int = option(0, "Seed of the initial weights, training batches and exploration.")

    def __post_init__(self) -> None:
        self.explore_temperature = tuple(float(t) for t in self.explore_temperature)
        self.validate()

    def validate(self) -> None:
        """Raise a clear error on a bad setting (before any model work)."""
        for name in (
            "max_new_tokens",
            "lora_rank",
            "twist_width",
            "twist_depth",
            "prompt_attention",
            "refine_steps",
            "prompts_per_step",
            "samples_per_prompt",
            "replay_capacity",
            "twist_updates",
            "twist_buffer",
        ):
            check_count(name, getattr(self, name))
        for name, choices in (
            ("parametrization", ("auto", *PARAMETRIZATIONS)),
            ("loss", LOSSES),
            ("termination_gradient", TERMINATION_GRADIENTS),
            ("weighting", WEIGHTINGS),
            ("lr_decay", LR_DECAYS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name in ("steps", "warmup_steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0 (0: {_ZERO[name]})")
        for name in ("eval_prompts", "eval_samples"):
            check_count(name, getattr(self, name))
        # Finite and in range: a NaN or inf here ends in a diverged fit or in torch's
        # "probability tensor contains inf/nan" far from the setting that caused it.
        for name, low, open_low in (
            ("learning_rate", 0.0, True),
            ("lora_alpha", 0.0, True),  # 0 scales the update to nothing: nothing is trained
            ("weight_decay", 0.0, False),
            ("subtb_lambda", 0.0, False),
            ("reward_temperature_start", 0.0, True),
            ("reward_temperature_end", 0.0, True),
        ):
            _check_real(name, getattr(self, name), low, open_low)
        if self.max_grad_norm is not None and not (
            _is_real(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise ValueError(
                f"max_grad_norm={self.max_grad_norm!r} must be a finite number > 0, or None for "
                "no clipping"
            )
        for name in ("explore_prob", "replay_prob"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        low, high = self.explore_temperature
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(
                f"explore_temperature={self.explore_temperature} must be (low, high), finite, "
                "0 < low <= high"
            )
        check_adapter_name(self.adapter_name)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GFlowNetConfig:
        """A config from saved values (unknown fields refused by name)."""
        return dataclass_from_dict(cls, values)
