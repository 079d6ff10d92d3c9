"""The GFlowNet's parametrization: the trainable density q and where its weights live.

For the sampler and its trainer: :func:`build_parametrization` turns a target, an init policy
and a config into a :class:`Parametrization` (the policy q, its trainable parameters, and how
to write and read them). The forms and the ``auto`` choice are described in docs/gflownet.md:

- ``"twist"``: :class:`gfn_spin.twist.TwistedLocalProduct`, the local product times a learned
  twist read from the components' hidden states; one pass per component per token.
- ``"residual"``: :class:`gfn_spin.residual.ResidualLocalProduct`, the local product times a
  LoRA correction; one pass per component plus one per token.
- ``"lora"``: a LoRA adapter on the init policy's weights; one model pass per token, saved as a
  standard peft adapter (``Policy.from_pretrained(base, adapter=dir)`` loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from gfn_spin import adapters
from gfn_spin.density import Density
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from gfn_spin.residual import ResidualLocalProduct
from gfn_spin.twist import TwistedLocalProduct, TwistHead
from samplers.gflownet.config import GFlowNetConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TWIST_WEIGHTS = "twist_head.safetensors"


def auto_parametrization(target: Density) -> str:
    """twist for a geometric mixture of policies (it reads their hidden states), residual for
    one over other densities, lora for any other target."""
    if not isinstance(target, GeometricMixture):
        return "lora"
    if TwistedLocalProduct.supports(target.components):
        return "twist"
    return "residual"


@dataclass
class Parametrization:
    """The trainable policy q of a GFlowNet and its weights.

    Attributes:
        name: "lora", "residual" or "twist".
        policy: q, a normalized density (score it, sample it, enumerate it).
        trainable_parameters: what the optimizer updates (LoRA weights or the twist head).
        init: the policy the adapter sits on (its other weights stay frozen).
        adapter_name: the peft adapter's name ("lora", "residual").
        head: the twist head ("twist"), else None.
        adapter_policy: ``init`` read through the adapter ("lora", "residual"), else None.
    """

    name: str
    policy: Density
    trainable_parameters: list[torch.nn.Parameter]
    init: Policy
    adapter_name: str
    head: TwistHead | None = None
    adapter_policy: Policy | None = None

    @property
    def weights_file(self) -> str:
        """The safetensors file holding the trainable tensors."""
        return TWIST_WEIGHTS if self.head is not None else ADAPTER_WEIGHTS

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name: the head's state, or the adapter's peft state dict
        (keys without the adapter's name, so they load under another name)."""
        if self.head is not None:
            return self.head.state_dict()
        return get_peft_model_state_dict(
            self.init.model, adapter_name=self.adapter_name, save_embedding_layers=False
        )

    def mismatches(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Names of the tensors that ``state`` lacks, adds, or holds in another shape."""
        mine = self.state_dict()
        return sorted(
            k
            for k in set(mine) | set(state)
            if k not in state or k not in mine or state[k].shape != mine[k].shape
        )

    def write(self, directory: Path) -> None:
        """Write the trainable tensors (and the peft adapter config) into ``directory``."""
        if self.head is None:
            self.init.model.peft_config[self.adapter_name].save_pretrained(str(directory))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(directory / self.weights_file),
        )

    def read_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The saved trainable tensors, refused when missing, unreadable or not finite."""
        path = directory / self.weights_file
        check_files(directory, (self.weights_file,))
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError on bad headers
            raise corrupted(path, error) from error
        bad = [name for name, value in state.items() if not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(
                f"{str(path)!r} holds non-finite values (NaN or inf) in {bad[:3]}: the fit that "
                "wrote it diverged; retrain (e.g. with a lower learning_rate) instead of loading it"
            )
        return state

    def load(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Load tensors read by :meth:`read_weights`; refuses ones of another shape."""
        if self.head is not None:
            wrong = self.mismatches(state)
            if wrong:
                raise ValueError(
                    f"twist head weights in {directory} do not match this config: {wrong[:3]}"
                )
            self.head.load_state_dict(state)
            return
        result = set_peft_model_state_dict(self.init.model, state, adapter_name=self.adapter_name)
        unexpected = [k for k in result.unexpected_keys if "lora" in k]
        if unexpected:
            raise ValueError(f"adapter weights in {directory} do not match: {unexpected[:3]}")


def build_parametrization(target: Density, init: Policy, config: GFlowNetConfig) -> Parametrization:
    """The policy q of ``config.parametrization`` (``"auto"`` resolved for ``target``).

    Initial weights are drawn under ``config.seed``, so a run is reproducible from its config
    (and a resumed run continues the same trajectory), without touching the global RNG.
    """
    name = config.parametrization
    if name == "auto":
        name = auto_parametrization(target)
    if name in ("residual", "twist") and not isinstance(target, GeometricMixture):
        raise ValueError(
            f"parametrization={name!r} needs a GeometricMixture target (its local product is "
            "the starting point); use parametrization='lora' for other targets"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if name == "twist":
            local = target.local_product()
            head = TwistHead(
                TwistedLocalProduct.in_features(local),
                target.vocab_size,
                width=config.twist_width,
                depth=config.twist_depth,
            ).to(init.device)
            return Parametrization(
                name,
                TwistedLocalProduct(local, head),
                list(head.parameters()),
                init,
                config.adapter_name,
                head=head,
            )
        adapter_policy = init.add_adapter(config.adapter_name, _lora_config(init, config))
        policy: Density = adapter_policy
        if name == "residual":
            policy = ResidualLocalProduct(target.local_product(), adapter_policy, init)
        return Parametrization(
            name,
            policy,
            _adapter_parameters(init, config.adapter_name),
            init,
            config.adapter_name,
            adapter_policy=adapter_policy,
        )


def _lora_config(init: Policy, config: GFlowNetConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=adapters.lora_target_modules(init.model, config.lora_output_layer),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _adapter_parameters(init: Policy, adapter_name: str) -> list[torch.nn.Parameter]:
    marker = f".{adapter_name}."
    params = [p for n, p in init.model.named_parameters() if marker in n]
    for param in params:
        param.requires_grad_(True)
    if not params:
        raise RuntimeError(f"adapter {adapter_name!r} has no parameters")
    return params


def check_files(directory: Path, names: tuple[str, ...]) -> None:
    """Raise FileNotFoundError naming the missing files of a saved sampler or checkpoint."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(directory)!r} lacks {missing}: give a directory written by "
            "GFlowNetSampler.save or a checkpoint_dir's step_NNNNNNN folder"
        )


def corrupted(path: Path, error: Exception) -> ValueError:
    """The error for a saved file that cannot be read, with the fix."""
    return ValueError(
        f"{str(path)!r} is corrupted or truncated ({type(error).__name__}: {error}); delete "
        "that folder (a fit then resumes from scratch) or save the sampler again"
    )
