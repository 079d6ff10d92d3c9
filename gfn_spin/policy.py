"""A policy: any Hugging Face causal LM with its tokenizer, optionally read through a LoRA adapter.

For alignment code that needs exact token scores (docs/conventions.md) in one teacher-forced pass, and
ancestral sampling with the KV cache. Several policies can share one set of weights: each
names the peft adapter it reads (``adapter=None`` reads the bare base weights), so self-play
iterates and a GFlowNet adapter cost one model in memory.

Why one module over 400 lines: :class:`Policy` is one object, an HF model read as a density;
its scoring, KV-cache sampling steps, adapter views and saving share the adapter routing and
the context checks, so splitting the class would spread one invariant over several files. The
adapter file checks stand next to it: only its loaders use them.
"""

from __future__ import annotations

import copy
import operator
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # the error class only: nothing is unpickled here
from typing import Any

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from gfn_spin import adapters
from gfn_spin.data import check_no_special_tokens, encode_prompt, is_blank, uses_chat_template
from gfn_spin.density import Density, PromptLike, scores_from_steps
from gfn_spin.devices import default_device, default_dtype
from gfn_spin.io import make_directory
from gfn_spin.samples import Samples, ancestral_sample
from gfn_spin.scores import TokenScores, position_mask


def check_saved_adapter(path: str | os.PathLike, argument: str = "adapter") -> None:
    """Refuse a saved LoRA adapter that is missing, truncated or holds non-finite weights.

    Read before peft loads it (no code runs), so a corrupted adapter never changes a model:
    ``adapter_model.safetensors`` with safetensors; a folder with only ``adapter_model.bin``
    (a pickle) with ``torch.load(weights_only=True)``, refused for safety when the pickle holds
    anything but tensors.
    """
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{argument}={str(path)!r} holds no adapter_config.json; give a folder written by "
            "Policy.save_pretrained for a policy that reads an adapter"
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        weights = folder / "adapter_model.bin"
        if not weights.is_file():
            return
    tensors = _read_adapter_weights(weights)
    if not tensors or not all(t.is_floating_point() for t in tensors.values()):
        kinds = sorted({str(t.dtype) for t in tensors.values()})
        raise ValueError(
            f"{str(weights)!r} holds no LoRA weights ({len(tensors)} tensors of {kinds or 'no'} "
            "dtype); loading it would leave the adapter at its initial, untrained values: "
            "give the adapter saved for this model"
        )
    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        raise ValueError(
            f"{str(weights)!r} holds non-finite (NaN or inf) weights in {len(bad)} tensors "
            f"({bad[0]}, ...); the adapter is corrupted or was saved from a diverged run: "
            "retrain or restore it"
        )


def _read_adapter_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter's weights file, read without running any code in it."""
    from safetensors.torch import load_file

    try:
        if weights.suffix == ".safetensors":
            tensors = load_file(str(weights))
        else:
            tensors = torch.load(weights, weights_only=True, map_location="cpu")
    except UnpicklingError as error:
        raise ValueError(
            f"{str(weights)!r} is not a plain tensor file: it holds Python objects that could "
            "run code when loaded, so it was refused for safety and nothing in it was loaded. "
            "Use an adapter saved as adapter_model.safetensors (Policy.save_pretrained)"
        ) from error
    except Exception as error:
        raise ValueError(
            f"{str(weights)!r} is corrupted or truncated ({type(error).__name__}: "
            f"{str(error)[:200]}); save the adapter again"
        ) from error
    if not isinstance(tensors, dict) or not all(
        isinstance(t, torch.Tensor) for t in tensors.values()
    ):
        raise ValueError(f"{str(weights)!r} does not hold tensors by name; save the adapter again")
    return tensors


#: peft's (torch's) report of one tensor of another shape.
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) "
    r"from checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))"
)


def _adapter_error(argument: str, path: str | os.PathLike, error: BaseException) -> ValueError:
    mismatches = _SIZE_MISMATCH.findall(str(error))
    if mismatches:
        name, saved, expected = mismatches[0]
        return ValueError(
            f"{argument}={str(path)!r} holds LoRA tensors shaped for another model or rank: "
            f"{len(mismatches)} tensor(s) differ, e.g. {name} is {list(_size(saved))} in "
            f"the file but {list(_size(expected))} in this model. Give the adapter saved "
            "for this base model (with the same lora rank)"
        )
    return ValueError(
        f"{argument}={str(path)!r} could not be loaded as a LoRA adapter of this model "
        f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); it was saved for "
        "another model or is damaged: give the adapter saved for this base model"
    )


def _size(text: str) -> tuple[int, ...]:
    """``torch.Size([4, 64])`` (as torch prints it) → ``(4, 64)``."""
    return tuple(int(n) for n in re.findall(r"\d+", text))


def dequantized_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a plain model of its class, sharing ``model``'s tensors.

    A GGUF load is dequantized already but keeps a quantization entry in its config, for which
    ``save_pretrained`` refuses it. The copy is built without memory on the meta device and
    takes the loaded tensors as they are (no second copy of the weights), its config without
    that entry.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the state dict.
    for name, buffer in model.named_buffers():
        owner, _, attribute = name.rpartition(".")
        setattr(plain.get_submodule(owner), attribute, buffer)
    plain.tie_weights()
    return plain.eval()


@dataclass
class PolicyState:
    """Decoding state of a batch of prefixes: KV cache, mask, next positions, next log-probs,
    and (when asked for with ``start(..., features=True)``) the last hidden state ``[B, H]`` and
    the prompt's last hidden states ``[B, P, H]`` (left-padded as the first P columns of
    ``attention_mask``), kept from the prefill for heads that read the whole prompt."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    next_logprobs: torch.Tensor
    next_features: torch.Tensor | None = None
    prompt_features: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> PolicyState:
        cache = DynamicCache(ddp_cache_data=[(k[index], v[index]) for k, v, *_ in self.cache])
        return PolicyState(
            cache,
            self.attention_mask[index],
            self.next_position[index],
            self.next_logprobs[index],
            None if self.next_features is None else self.next_features[index],
            None if self.prompt_features is None else self.prompt_features[index],
        )


class Policy(Density):
    """An HF causal LM + tokenizer as a normalized density over responses.

    Args:
        model: a ``transformers`` causal LM, possibly a ``peft.PeftModel``.
        tokenizer: its tokenizer; must define an EOS token (PAD falls back to EOS).
        adapter: the peft adapter this policy reads; a tuple of names reads them stacked (their
            LoRA updates add up); ``None`` reads the base weights even when adapters are loaded.
        allowed_token_ids: if given, responses may only use these tokens (EOS is always
            allowed); other logits are masked before the softmax, so the policy is the LM
            renormalized on that vocabulary. Makes exact enumeration possible on small worlds.
        chat_template: whether string prompts go through the tokenizer's chat template as a
            user turn; ``None`` (default): whenever the tokenizer has one
            (:func:`gfn_spin.data.uses_chat_template`, the rule self-play's command line
            follows too). Token-id prompts are always used as given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        adapter: adapters.AdapterSpec = None,
        allowed_token_ids: Sequence[int] | None = None,
        chat_template: bool | None = None,
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "tokenizer has no EOS token: set tokenizer.eos_token (responses end with it)"
            )
        if tokenizer.pad_token_id is None:
            # Padding is only ever masked out, so EOS can stand in for a missing PAD token.
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self._tokenizer = tokenizer
        self.adapter = adapter
        self.chat_template = uses_chat_template(tokenizer, chat_template)
        self.allowed_token_ids = None if allowed_token_ids is None else list(allowed_token_ids)
        self._mask_cache: dict[torch.device, torch.Tensor] = {}
        self._tokens = 0

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        adapter: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        gguf_file: str | None = None,
        **kwargs: Any,
    ) -> Policy:
        """Load a model and tokenizer by hub name or local directory (``save_pretrained``).

        ``adapter`` is the path of a peft adapter to read through (loaded as "default").
        ``gguf_file`` names a GGUF file in ``name_or_path`` (needs the ``gguf`` package, the
        ``[real]`` extra): its weights are dequantized to ``dtype`` into a plain model, so the
        policy trains, takes adapters and saves like any other (``save_pretrained`` writes an
        HF folder that loads without ``gguf``). Other keyword arguments go to :class:`Policy`.
        """
        name_or_path = str(name_or_path)
        looks_local = name_or_path.startswith((".", "/", "~")) or os.path.isdir(name_or_path)
        if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
            raise FileNotFoundError(
                f"name_or_path={name_or_path!r} is not a directory; give a directory written "
                "by save_pretrained or a hub model name"
            )
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        try:
            # Never run code from a model folder: no remote code, and pickled weights
            # (pytorch_model.bin) load with torch.load(weights_only=True).
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, trust_remote_code=False, gguf_file=gguf_file
            )
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=dtype,
                trust_remote_code=False,
                weights_only=True,
                gguf_file=gguf_file,
            )
            if gguf_file is not None:
                model = dequantized_copy(model)
        except ImportError:  # the gguf package is missing: say so as transformers does
            raise
        except Exception as error:  # truncated weights, garbage tokenizer.json, bad config
            if isinstance(error, OSError) and not looks_local:
                raise OSError(
                    f"could not load name_or_path={name_or_path!r}: {error}. Check the name or "
                    "path; without network access only local directories load"
                ) from error
            raise ValueError(
                f"could not load name_or_path={name_or_path!r}: it is corrupted, truncated or "
                f"not a causal LM ({type(error).__name__}: {' '.join(str(error).split())[:300]}); "
                "save the model again with save_pretrained, or give another path"
            ) from error
        model.to(device).eval()
        adapter_name = None
        if adapter is not None:
            if not os.path.isdir(adapter):
                raise FileNotFoundError(f"adapter={str(adapter)!r} is not a directory")
            check_saved_adapter(adapter, "adapter")
            try:
                model = adapters.load_adapter(model, str(adapter), "default")
            except Exception as error:
                raise _adapter_error("adapter", adapter, error) from error
            adapter_name = "default"
        return cls(model, tokenizer, adapter=adapter_name, **kwargs)

    def sample(
        self,
        prompts: Sequence[PromptLike],
        num_samples: int = 1,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | int | None = None,
    ) -> Samples:
        """Ancestral samples under ``no_grad`` with the KV cache (see :func:`ancestral_sample`)."""
        return ancestral_sample(
            self,
            prompts,
            num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )

    def with_adapter(self, adapter: adapters.AdapterSpec) -> Policy:
        """A view of the same weights read through ``adapter`` (``None``: the base weights)."""
        view = Policy(
            self.model,
            self._tokenizer,
            adapter=adapter,
            allowed_token_ids=self.allowed_token_ids,
            chat_template=self.chat_template,
        )
        if adapter is not None:
            with adapters.route(self.model, adapter):
                pass  # validates the name now rather than at the first forward
        return view

    def add_adapter(self, name: str, config: LoraConfig | None = None) -> Policy:
        """Add a trainable LoRA adapter on this policy; returns the policy that reads it.

        The new adapter starts at zero, so the returned policy starts equal to this one: on a
        policy that reads adapters (a self-play iterate, say) it is stacked on top of them.
        """
        peft_model = adapters.add_adapter(
            self.model, name, config or adapters.default_lora_config()
        )
        self.model = peft_model
        below = adapters.stacked_names(self.adapter)
        return self.with_adapter((*below, name) if below else name)

    def load_adapter(
        self, path: str | os.PathLike, name: str, *, trainable: bool = False
    ) -> Policy:
        """Load a saved adapter under ``name``; returns the policy that reads it.

        Raises:
            FileNotFoundError, ValueError: the folder holds no adapter, or its weights are
                truncated, non-finite or shaped for another model (the path is named).
        """
        adapters.check_adapter_name(name)
        check_saved_adapter(path, "path")
        try:
            self.model = adapters.load_adapter(self.model, str(path), name, is_trainable=trainable)
        except Exception as error:
            raise _adapter_error("path", path, error) from error
        return self.with_adapter(name)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save this policy: the adapter only (peft format) when it reads one, else the model.

        ``directory`` must be new or empty: a folder that holds files is refused
        (FileExistsError), so that no file in it is replaced or moved.
        """
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(
                f"this policy reads stacked adapters {self.adapter}; a directory holds one "
                "adapter: save the policy of each (policy.with_adapter(name).save_pretrained)"
            )
        directory = Path(directory)
        if directory.is_dir() and any(directory.iterdir()):
            raise FileExistsError(
                f"directory={str(directory)!r} is not empty; save_pretrained writes into a new "
                "or empty folder only (it never replaces files): choose another directory"
            )
        make_directory(directory, "directory")
        if self.adapter is None:
            self.model.save_pretrained(directory)
        else:
            # peft writes a non-"default" adapter into a subfolder named after it; flatten it
            # so that the directory loads with Policy.from_pretrained(..., adapter=directory).
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                self.model.save_pretrained(tmp, selected_adapters=[self.adapter])
                written = Path(tmp) / self.adapter if self.adapter != "default" else Path(tmp)
                for item in written.iterdir():
                    if item.is_file():
                        os.replace(item, directory / item.name)
        self._tokenizer.save_pretrained(directory)

    # -- Density interface ----------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eos_token_id(self) -> int:
        return int(self._tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokens_evaluated(self) -> int:
        return self._tokens

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not a str")
        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
        blank = [i for i, p in texts if is_blank(p)] + [
            i for i, p in enumerate(prompts) if not isinstance(p, str) and len(p) == 0
        ]
        if blank:
            raise ValueError(
                f"prompts{sorted(blank)[:5]} are empty; every prompt must hold text (or at "
                "least one token id), as in a dataset: drop or fill these prompts"
            )
        if texts:
            check_no_special_tokens(
                self._tokenizer,
                [p for _, p in texts],
                "prompts",
                labels=[f"prompts[{i}]" for i, _ in texts],
            )
        encoded = []
        vocab = None
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                encoded.append(
                    encode_prompt(self._tokenizer, prompt, chat_template=self.chat_template)
                )
            else:
                try:
                    ids = [operator.index(t) for t in prompt]
                except TypeError:
                    raise TypeError(
                        f"prompts[{index}] must be a string or a list of integer token ids, got "
                        f"{prompt!r:.80}"
                    ) from None
                vocab = self.vocab_size if vocab is None else vocab
                outside = [t for t in ids if not 0 <= t < vocab]
                if outside:
                    raise ValueError(
                        f"prompts[{index}] has token ids {outside[:5]} outside the model's "
                        f"vocabulary [0, {vocab}); encode prompts with this model's tokenizer"
                    )
                encoded.append(ids)
        return encoded

    def _vocab_mask(self, device: torch.device) -> torch.Tensor | None:
        if self.allowed_token_ids is None:
            return None
        if device not in self._mask_cache:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            mask[self.allowed_token_ids] = True
            mask[self.eos_token_id] = True
            self._mask_cache[device] = mask
        return self._mask_cache[device]

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits with tokens outside the response vocabulary at -inf."""
        logits = logits.float()
        mask = self._vocab_mask(logits.device)
        return logits if mask is None else logits.masked_fill(~mask, float("-inf"))

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._masked(logits), dim=-1)

    def _forward(self, **inputs: Any) -> Any:
        with adapters.route(self.model, self.adapter):
            return self.model(**inputs)

    def _teacher_forced_logits(
        self,
        prompt_ids: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        features: bool = False,
    ) -> Any:
        """Log-scores at the states s_0..s_L of each row, ``[B, L+1, V]`` (logits: each state's
        row is defined up to a constant; normalize with log-softmax or logsumexp). With
        ``features=True``, also the last hidden state at each state, ``[B, L+1, H]``, as a pair.

        Rows that share a prompt (a prompt's samples, SPIN's real and generated responses) share
        its prefill: each distinct prompt runs once, its cache rows are copied (gradients flow
        through the copy), and the responses run in one pass over the cache. Otherwise one
        padded pass, where only the columns from the shortest prompt's last token on reach the
        LM head (the prompt positions' logits are never needed).
        """
        device = self.device
        response_ids = response_ids.to(device)
        lengths = lengths.to(device)
        batch, width = response_ids.shape
        prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        self._check_context(prompt_lengths, width)
        if len({tuple(p) for p in prompt_ids}) < batch:
            return self._logits_over_shared_prompts(prompt_ids, response_ids, lengths, features)
        total = int(prompt_lengths.max()) + width
        # Right padding: prompt, then response, then PAD; every row's positions start at 0.
        # One tensor from padded lists: a per-row copy costs more than the forward on big batches.
        pad = self.pad_token_id
        input_ids = torch.tensor(
            [list(p) + [pad] * (total - len(p)) for p in prompt_ids], dtype=torch.long
        ).to(device)
        steps = torch.arange(width, device=device)
        valid = position_mask(lengths, width)
        columns = prompt_lengths[:, None] + steps[None, :]
        input_ids.scatter_(1, columns, torch.where(valid, response_ids, self.pad_token_id))
        attention_mask = position_mask(prompt_lengths + lengths, total).long()
        first = int(prompt_lengths.min()) - 1
        out = self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=total - first,
            output_hidden_states=features,
        )
        self._tokens += int(attention_mask.sum())
        offsets = prompt_lengths - 1 - first  # column of s_0 in the kept window
        state_columns = offsets[:, None] + torch.arange(width + 1, device=device)

        def at_states(values: torch.Tensor) -> torch.Tensor:
            if not bool(offsets.any()):
                return values
            return values.gather(1, state_columns[..., None].expand(-1, -1, values.shape[-1]))

        logits = at_states(out.logits)
        if not features:
            return logits
        return logits, at_states(out.hidden_states[-1][:, first:].float())

    def _logits_over_shared_prompts(
        self,
        prompt_ids: list[list[int]],
        response_ids: torch.Tensor,
        lengths: torch.Tensor,
        features: bool = False,
    ) -> Any:
        state = self.start(prompt_ids, features=features)  # one prefill per distinct prompt
        width = response_ids.shape[1]
        valid = position_mask(lengths, width)
        out = self._forward(
            input_ids=torch.where(valid, response_ids, self.pad_token_id),
            attention_mask=torch.cat([state.attention_mask, valid.long()], dim=1),
            position_ids=state.next_position[:, None] + torch.arange(width, device=self.device),
            cache=state.cache,
            use_cache=True,
            output_hidden_states=features,
        )
        self._tokens += int(lengths.sum())
        # s_0's row comes normalized from the prefill; s_1..s_L are the block's logits.
        logits = torch.cat([state.next_logprobs[:, None], out.logits.float()], dim=1)
        if not features:
            return logits
        hidden = torch.cat([state.next_features[:, None], out.hidden_states[-1].float()], dim=1)
        return logits, hidden

    def step_logprobs(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        prompt_ids = self.encode_prompts(prompts)
        return self._log_softmax(self._teacher_forced_logits(prompt_ids, response_ids, lengths))

    def step_logprobs_and_features(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step scores ``[B, L+1, V]`` and the last hidden state at each state ``[B, L+1, H]``
        (the LM head's input), from one teacher-forced pass: what a learned twist reads."""
        prompt_ids = self.encode_prompts(prompts)
        logits, hidden = self._teacher_forced_logits(
            prompt_ids, response_ids, lengths, features=True
        )
        return self._log_softmax(logits), hidden

    @property
    def logits_follow_features(self) -> bool:
        """Whether the LM head alone maps the features of :meth:`step_logprobs_and_features`
        to the logits (no scaling or soft-capping after it, as some architectures add)."""
        config = self.model.config
        softcap = getattr(config, "final_logit_softcapping", None)
        return softcap is None and getattr(config, "logit_scale", None) in (None, 1, 1.0)

    def logprobs_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Step scores ``[..., V]`` from features ``[..., H]`` (the LM head's input) through the
        LM head alone, no model pass: what a stored batch of a twist fit keeps instead of
        ``[B, L+1, V]`` scores (exact where :attr:`logits_follow_features`)."""
        head = self.model.get_output_embeddings()
        with adapters.route(self.model, self.adapter):
            logits = head(features.to(self.device, self.model.dtype))
        return self._log_softmax(logits)

    @property
    def hidden_size(self) -> int:
        """Width of the features returned with ``features=True``."""
        return int(self.model.config.hidden_size)

    def score(
        self, prompts: Sequence[PromptLike], response_ids: torch.Tensor, lengths: torch.Tensor
    ) -> TokenScores:
        # Only the response tokens' and EOS's log-probabilities are needed: logit - logsumexp,
        # with no normalized [B, L+1, V] copy (the largest tensor for a real vocabulary).
        prompt_ids = self.encode_prompts(prompts)
        logits = self._masked(self._teacher_forced_logits(prompt_ids, response_ids, lengths))
        return scores_from_steps(
            logits,
            response_ids.to(logits.device),
            lengths.to(logits.device),
            self.eos_token_id,
            log_normalizer=torch.logsumexp(logits, dim=-1),
        )

    def _check_context(self, prompt_lengths: torch.Tensor, width: int) -> None:
        limit = self.max_context
        longest = int(prompt_lengths.max()) if len(prompt_lengths) else 0
        if len(prompt_lengths) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        if int(prompt_lengths.min()) == 0:
            raise ValueError("a prompt is empty: every prompt needs at least one token (e.g. BOS)")
        if limit is not None and longest + width > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={width} exceeds the model's "
                f"context of {limit} tokens; shorten the prompt or lower max_new_tokens"
            )

    def start(self, prompt_ids: Sequence[Sequence[int]], *, features: bool = False) -> PolicyState:
        """Prefill the prompts; with ``features=True`` the states also carry the last hidden
        state (``next_features``), through every later ``advance``."""
        # Samplers repeat each prompt once per draw (or candidate, or particle): prefill each
        # distinct prompt once and copy its cache rows, instead of running identical rows.
        distinct: dict[tuple[int, ...], int] = {}
        rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
        if len(distinct) < len(rows):
            state = self._prefill(list(distinct), features)
            return state.select(torch.tensor(rows, device=self.device))
        return self._prefill(prompt_ids, features)

    def _prefill(self, prompt_ids: Sequence[Sequence[int]], features: bool) -> PolicyState:
        device = self.device
        prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        self._check_context(prompt_lengths, 0)
        longest = int(prompt_lengths.max())
        # Left padding so that every row's next token goes in the same column.
        pad = self.pad_token_id
        input_ids = torch.tensor(
            [[pad] * (longest - len(p)) + list(p) for p in prompt_ids], dtype=torch.long
        ).to(device)
        attention_mask = (
            torch.arange(longest, device=device)[None, :] >= (longest - prompt_lengths)[:, None]
        ).long()
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        out = self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=features,
        )
        self._tokens += int(prompt_lengths.sum())
        return PolicyState(
            out.cache,
            attention_mask,
            prompt_lengths,
            self._log_softmax(out.logits[:, -1]),
            out.hidden_states[-1][:, -1].float() if features else None,
            out.hidden_states[-1].float() if features else None,
        )

    def advance(self, state: PolicyState, tokens: torch.Tensor) -> PolicyState:
        features = state.next_features is not None
        attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones(len(tokens), 1)], dim=1
        )
        out = self._forward(
            input_ids=tokens.to(self.device)[:, None],
            attention_mask=attention_mask,
            position_ids=state.next_position[:, None],
            cache=state.cache,
            use_cache=True,
            output_hidden_states=features,
        )
        self._tokens += len(tokens)
        return PolicyState(
            out.cache,
            attention_mask,
            state.next_position + 1,
            self._log_softmax(out.logits[:, -1]),
            out.hidden_states[-1][:, -1].float() if features else None,
            state.prompt_features,
        )
