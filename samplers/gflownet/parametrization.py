"""The GFlowNet's parametrizations: the trainable density q, its weights, and its training data.

For the sampler and its trainer: one :class:`Parametrization` subclass per form, registered by
name in :data:`samplers.gflownet.registry.PARAMETRIZATIONS`; :func:`build_parametrization` turns a target, an init policy
and a config into one. The forms and the ``auto`` choice are described in docs/gflownet.md
(section "Adding a parametrization" shows a new one):

- ``"twist"``: :class:`TwistParametrization`, the local product times a learned twist read
  from the components' hidden states; one pass per component per token.
- ``"residual"``: :class:`ResidualParametrization`, the local product times a LoRA correction;
  one pass per component plus one per token.
- ``"lora"``: :class:`LoraParametrization`, a LoRA adapter on the init policy's weights; one
  model pass per token, saved as a standard peft adapter
  (``Policy.from_pretrained(base, adapter=dir)`` loads it).

Why one module over 400 lines: the forms implement one interface side by side, and two of them
share the adapter plumbing (``AdapterParametrization``, ``LoraAdapter``) and its file checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from gfn_spin import adapters
from gfn_spin.density import Density, scores_from_steps
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from gfn_spin.prompt_twist import PromptAttentionTwistHead, PromptTwistedLocalProduct
from gfn_spin.residual import ResidualLocalProduct
from gfn_spin.scores import TokenScores, weighted_logsum
from gfn_spin.twisted_local_product import TwistedLocalProduct, TwistHead
from samplers.gflownet.batches import TrainingBatch
from samplers.gflownet.config import GFlowNetConfig
from samplers.gflownet.registry import PARAMETRIZATIONS, register

ADAPTER_WEIGHTS = "adapter_model.safetensors"
TWIST_WEIGHTS = "twist_head.safetensors"


class Parametrization(ABC):
    """A trainable policy q of a GFlowNet: its density, its weights, and its training data.

    A subclass is one form. It sets :attr:`name` and :attr:`weights_file`, says which targets
    it can sample (:meth:`supports`), builds q in ``__init__(target, init, config)`` (under
    the config's seed), and implements :meth:`trainable_parameters`, :meth:`state_dict`,
    :meth:`load_state_dict`, :meth:`training_batch` and :meth:`scores`; :meth:`write` and
    :meth:`read` store the trainable tensors as safetensors. Decorate it with
    :func:`samplers.gflownet.registry.register` to make it a
    ``GFlowNetConfig.parametrization`` choice.

    Attributes:
        policy: q, a normalized density (score it, sample it, enumerate it).
        init: the policy the form is built on (its device holds the training generator).
    """

    #: The ``GFlowNetConfig.parametrization`` value that selects the form.
    name: ClassVar[str]
    #: The safetensors file (in a saved sampler or checkpoint) holding the trainable tensors.
    weights_file: ClassVar[str]
    #: True when a stored :class:`TrainingBatch` can be scored again exactly as the weights
    #: move (the trainable part reads frozen inputs), so one rollout feeds ``twist_updates``
    #: updates: the buffer keeps :meth:`kept`, an update uses :meth:`restored`.
    reuses_batches: ClassVar[bool] = False

    policy: Density
    init: Policy

    @abstractmethod
    def __init__(self, target: Density, init: Policy, config: GFlowNetConfig) -> None:
        """Build q for ``target`` from ``init``; raise naming why when the target is not
        supported."""

    @classmethod
    @abstractmethod
    def supports(cls, target: Density) -> bool:
        """Whether this form can sample ``target`` (``auto`` picks the first that can)."""

    @property
    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load tensors of :meth:`state_dict`'s names and shapes; refuse others, naming
        ``source`` (where they came from)."""

    @abstractmethod
    def training_batch(
        self,
        target: Density,
        rows: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        group: torch.Tensor,
        recorded: list[torch.Tensor] | None,
    ) -> TrainingBatch:
        """The batch with the target's rewards (no gradient) and what :meth:`scores` reads.

        ``recorded``: what :meth:`rollout_reader` kept from the rollout that drew the batch
        (``[B, L+1, ...]`` each), None when no rollout of q drew it (replayed responses).
        """

    @abstractmethod
    def scores(self, batch: TrainingBatch) -> TokenScores:
        """q's token scores of the batch, with gradients through the trainable weights."""

    def kept(self, batch: TrainingBatch) -> TrainingBatch:
        """What a buffer keeps of a batch across steps: nothing that scales with the
        vocabulary (the batch itself for a form that stores no inputs)."""
        return batch

    def restored(self, batch: TrainingBatch) -> TrainingBatch:
        """A kept batch, ready for :meth:`scores` again (its inputs recomputed)."""
        return batch

    def rollout_reader(self) -> Callable[[Any], Sequence[torch.Tensor]] | None:
        """What to keep from each decoding state of a rollout of q (``[rows, ...]`` tensors),
        for :meth:`training_batch`; None: nothing."""
        return None

    def trainable_module(self) -> torch.nn.Module | None:
        """The module whose forward holds every trainable weight, for ``accelerate`` to prepare
        (its forward then averages gradients across processes, and each process may
        backpropagate through its share of the rows only); None when the trainable part runs
        inside a :class:`Policy` (every process then takes the whole batch's gradient)."""
        return None

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Compute q through ``module``, the prepared :meth:`trainable_module` (a form that
        has one overrides this)."""
        raise NotImplementedError(f"{type(self).__name__} has no trainable module to replace")

    def mismatches(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Names of the tensors that ``state`` lacks, adds, or holds in another shape."""
        mine = self.state_dict()
        return sorted(
            k
            for k in set(mine) | set(state)
            if k not in state or k not in mine or state[k].shape != mine[k].shape
        )

    def check_shapes(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Refuse tensors of other names or shapes than this form's, naming ``source``, one
        tensor's shapes and the fix (before anything is loaded)."""
        wrong = self.mismatches(state)
        if not wrong:
            return
        mine = self.state_dict()
        name = wrong[0]
        found = list(state[name].shape) if name in state else "missing"
        wanted = list(mine[name].shape) if name in mine else "not a tensor of this form"
        raise ValueError(
            f"the {self.name} weights in {source} differ in name or shape from this sampler's: "
            f"{len(wrong)} tensor(s), e.g. {name} is {found} there but {wanted} here; they were "
            "saved with other settings (lora_rank, twist_width, ...) or for another model: load "
            "them with the settings they were saved with"
        )

    def write(self, directory: Path) -> None:
        """Write the trainable tensors into ``directory``."""
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(directory / self.weights_file),
        )

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The trainable tensors saved in ``directory``, refused when missing, unreadable or
        not finite (nothing is loaded: see :meth:`load_state_dict`)."""
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


def auto_parametrization(target: Density) -> str:
    """The first registered form that supports ``target``: twist for a geometric mixture of
    policies (it reads their hidden states), residual for one over other densities, lora for
    any other target."""
    return next(name for name, form in PARAMETRIZATIONS.items() if form.supports(target))


def build_parametrization(target: Density, init: Policy, config: GFlowNetConfig) -> Parametrization:
    """The policy q of ``config.parametrization`` (``"auto"`` resolved for ``target``).

    Initial weights are drawn under ``config.seed``, so a run is reproducible from its config
    (and a resumed run continues the same trajectory), without touching the global RNG.
    """
    name = config.parametrization
    if name == "auto":
        name = auto_parametrization(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return PARAMETRIZATIONS[name](target, init, config)


def geometric_mixture(target: Density, name: str) -> GeometricMixture:
    """``target``, checked to be a geometric mixture (forms built on its local product need
    one); raises naming the form ``name`` for any other target."""
    if not isinstance(target, GeometricMixture):
        raise ValueError(
            f"parametrization={name!r} needs a GeometricMixture target (its local product is "
            "the starting point); use parametrization='lora' for other targets"
        )
    return target


def log_reward_from_steps(
    target: Density, steps: Sequence[torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """A geometric mixture's prefix-terminal log-densities ``[B, L+1]`` from its components'
    step scores ``[B, L+1, V]`` (no model pass)."""
    combined = weighted_logsum([s.detach() for s in steps], target.weights)
    device = combined.device
    return scores_from_steps(
        combined, ids.to(device), lengths.to(device), target.eos_token_id
    ).prefix_terminal_logprobs()


@register
class TwistParametrization(Parametrization):
    """``"twist"``: the local product times a twist head on the components' hidden states.

    The head reads what the components computed at each state: a fresh batch's inputs are
    what its rollout computed (every component's step scores ``[B, L+1, V]`` and features
    ``[B, L+1, H_c]``). A stored batch keeps its token ids, lengths, rewards and features,
    never the step scores: when it is used again they are recomputed from the features
    through each component's LM head (exact, the components being frozen), or, for a model
    whose logits do not follow its last hidden state alone, by one teacher-forced no-grad
    pass per component.
    """

    name = "twist"
    weights_file = TWIST_WEIGHTS
    reuses_batches = True

    def __init__(self, target: Density, init: Policy, config: GFlowNetConfig) -> None:
        local = geometric_mixture(target, self.name).local_product()
        self.head = TwistHead(
            TwistedLocalProduct.in_features(local),
            target.vocab_size,
            width=config.twist_width,
            depth=config.twist_depth,
        ).to(init.device)
        self.policy: TwistedLocalProduct = TwistedLocalProduct(local, self.head)
        self.init = init

    @classmethod
    def supports(cls, target: Density) -> bool:
        return isinstance(target, GeometricMixture) and TwistedLocalProduct.supports(
            target.components
        )

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.check_shapes(state, source)
        self.head.load_state_dict(state)

    def rollout_reader(self) -> Callable[[Any], Sequence[torch.Tensor]]:
        return lambda state: state.component_outputs()

    def kept(self, batch: TrainingBatch) -> TrainingBatch:
        kept = batch.without_inputs()
        if self.policy.steps_follow_features:
            kept.inputs = {"features": list(batch.inputs["features"])}
        return kept

    def restored(self, batch: TrainingBatch) -> TrainingBatch:
        features = batch.inputs.get("features")
        if features is None:
            steps, features = self.policy.component_outputs(
                batch.rows, batch.response_ids, batch.lengths
            )
        else:
            # The components' features come first (a prompt-reading form adds its memory).
            steps = self.policy.component_steps(features[: len(self.policy.components)])
        restored = batch.without_inputs()
        restored.inputs = {"steps": list(steps), "features": list(features)}
        return restored

    def trainable_module(self) -> torch.nn.Module:
        return self.head

    def use_prepared(self, module: torch.nn.Module) -> None:
        self.policy.head = module

    def training_batch(
        self,
        target: Density,
        rows: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        group: torch.Tensor,
        recorded: list[torch.Tensor] | None,
    ) -> TrainingBatch:
        if recorded is None:
            steps, features = self.policy.component_outputs(rows, response_ids, lengths)
        else:
            count = len(self.policy.components)
            steps, features = recorded[:count], recorded[count:]
        log_reward = log_reward_from_steps(target, steps, response_ids, lengths)
        inputs = {"steps": list(steps), "features": list(features)}
        return TrainingBatch(rows, response_ids, lengths, log_reward, group, inputs)

    def scores(self, batch: TrainingBatch) -> TokenScores:
        outputs = (batch.inputs["steps"], batch.inputs["features"])
        return self.policy.scores_from_outputs(outputs, batch.response_ids, batch.lengths)


class AdapterParametrization(Parametrization):
    """A form whose trainable weights are a LoRA adapter on ``init`` (:class:`LoraAdapter`,
    set as ``self.adapter`` by ``__init__``), saved as a standard peft adapter."""

    weights_file = ADAPTER_WEIGHTS
    adapter: LoraAdapter

    @property
    def adapter_policy(self) -> Policy:
        """``init`` read through the LoRA adapter."""
        return self.adapter.policy

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.adapter.parameters

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.check_shapes(state, source)  # peft's own refusal is a size-mismatch dump
        self.adapter.load_state_dict(state, source)

    def write(self, directory: Path) -> None:
        self.adapter.write_config(directory)
        super().write(directory)


@register
class ResidualParametrization(AdapterParametrization):
    """``"residual"``: the local product times a LoRA correction on ``init``.

    The components' step scores serve twice per batch: as the target's rewards and as the
    local product inside q (one no-grad pass per component).
    """

    name = "residual"

    def __init__(self, target: Density, init: Policy, config: GFlowNetConfig) -> None:
        mixture = geometric_mixture(target, self.name)
        self.adapter = LoraAdapter(init, config)
        local = mixture.local_product()
        self.policy: ResidualLocalProduct = ResidualLocalProduct(local, self.adapter.policy, init)
        self.init = init

    @classmethod
    def supports(cls, target: Density) -> bool:
        return isinstance(target, GeometricMixture)

    def training_batch(
        self,
        target: Density,
        rows: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        group: torch.Tensor,
        recorded: list[torch.Tensor] | None,
    ) -> TrainingBatch:
        with torch.no_grad():
            steps = [c.step_logprobs(rows, response_ids, lengths) for c in target.components]
        log_reward = log_reward_from_steps(target, steps, response_ids, lengths)
        return TrainingBatch(rows, response_ids, lengths, log_reward, group, {"steps": steps})

    def scores(self, batch: TrainingBatch) -> TokenScores:
        return self.policy.score(
            batch.rows, batch.response_ids, batch.lengths, component_steps=batch.inputs["steps"]
        )


@register
class LoraParametrization(AdapterParametrization):
    """``"lora"``: a LoRA adapter on ``init``'s weights, for any target; one model pass per
    sampled token."""

    name = "lora"

    def __init__(self, target: Density, init: Policy, config: GFlowNetConfig) -> None:
        self.adapter = LoraAdapter(init, config)
        self.policy: Policy = self.adapter.policy
        self.init = init

    @classmethod
    def supports(cls, target: Density) -> bool:
        return True

    def training_batch(
        self,
        target: Density,
        rows: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        group: torch.Tensor,
        recorded: list[torch.Tensor] | None,
    ) -> TrainingBatch:
        with torch.no_grad():
            log_reward = target.score(rows, response_ids, lengths).prefix_terminal_logprobs()
        return TrainingBatch(rows, response_ids, lengths, log_reward, group)

    def scores(self, batch: TrainingBatch) -> TokenScores:
        return self.policy.score(batch.rows, batch.response_ids, batch.lengths)


class LoraAdapter:
    """A trainable peft LoRA adapter added to ``init`` under ``config.adapter_name`` (the
    part the lora and residual forms share): its parameters, its peft state dict (keys
    without the adapter's name, so they load under another name) and its peft config file."""

    def __init__(self, init: Policy, config: GFlowNetConfig) -> None:
        self.init = init
        self.name = config.adapter_name
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=adapters.lora_target_modules(init.model, config.lora_output_layer),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.policy = init.add_adapter(self.name, lora)
        marker = f".{self.name}."
        self.parameters = [p for n, p in init.model.named_parameters() if marker in n]
        for param in self.parameters:
            param.requires_grad_(True)
        if not self.parameters:
            raise RuntimeError(f"adapter {self.name!r} has no parameters")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(
            self.init.model, adapter_name=self.name, save_embedding_layers=False
        )

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        result = set_peft_model_state_dict(self.init.model, state, adapter_name=self.name)
        unexpected = [k for k in result.unexpected_keys if "lora" in k]
        if unexpected:
            raise ValueError(f"adapter weights in {source} do not match: {unexpected[:3]}")

    def write_config(self, directory: Path) -> None:
        """The peft ``adapter_config.json`` (so ``Policy.from_pretrained(base, adapter=dir)``
        loads the folder)."""
        self.init.model.peft_config[self.name].save_pretrained(str(directory))


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


@register
class PromptTwistParametrization(TwistParametrization):
    """``"prompt_twist"``: the twist head also attends over the prompt's hidden states
    (:mod:`gfn_spin.prompt_twist`), kept from the rollout's prefill; a batch stores each row's
    prompt memory once, not once per state."""

    name = "prompt_twist"
    weights_file = "prompt_twist_head.safetensors"

    def __init__(self, target: Density, init: Policy, config: GFlowNetConfig) -> None:
        local = geometric_mixture(target, self.name).local_product()
        self.head = PromptAttentionTwistHead(
            TwistedLocalProduct.in_features(local),
            target.vocab_size,
            width=config.twist_width,
            depth=config.twist_depth,
            attention=config.prompt_attention,
        ).to(init.device)
        self.policy = PromptTwistedLocalProduct(local, self.head)
        self.init = init

    def training_batch(
        self,
        target: Density,
        rows: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        group: torch.Tensor,
        recorded: list[torch.Tensor] | None,
    ) -> TrainingBatch:
        if recorded is not None:
            # The recorder stacks every output per state; the memory is the same at every
            # state of a row, and s_0 is the one state every row visits.
            recorded = recorded[:-2] + [r[:, 0] for r in recorded[-2:]]
        return super().training_batch(target, rows, response_ids, lengths, group, recorded)
