"""The tiny world: a task whose response distribution is known exactly, and tiny HF models on it.

For first runs (seconds, not hours) and for measuring samplers and self-play exactly (docs/toyworld.md).

The task ("noisy echo"): a prompt is 2-4 symbols over {a, b, c, d}; the response goes through
the prompt symbols in order and, for each, writes it (p=0.7), skips it (p=0.15) or writes it
twice (p=0.15); then, with p=0.25, one uniformly random symbol is appended. Responses are cut
at the length cap L (forced stop, docs/conventions.md), so ``p_data(y|x)`` is an exact finite table.
The shifted task, which a second policy is fine-tuned toward, follows one of two rules
(``ToyWorldConfig.shift_rule``):

- ``"symbol"`` (default): the same process with each written symbol replaced by the next one
  (a→b→c→d→a). The two policies' supports barely overlap, so their geometric mixture lives where
  both are small: in their tails, which depend on each model's quirks on each prompt.
- ``"style"``: the same symbols, written with other probabilities (``shifted_*`` fields). The
  supports overlap, as between a base model and a fine-tuned iterate of it, and the mixture
  lives where both policies put mass.

Models: a tiny Llama-style ``LlamaForCausalLM`` trained by SFT on a limited sample (a *weak*
base: better than uniform, worse than p_data), and a shifted policy fine-tuned from it. Both are
written with ``save_pretrained`` to a cache directory and loaded back with ``from_pretrained``.

Why one module over 400 lines: the task's exact tables, the tokenizer, the models trained on
the task and the evaluator that enumerates them are one reproducible build keyed by one config
hash; the build, its cache and the evaluator read the same config fields and task objects.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gfn_spin.data import chat_messages
from gfn_spin.density import Density
from gfn_spin.exact import ExactDistribution, divergences, exact_distribution
from gfn_spin.io import save_pretrained_atomic
from gfn_spin.policy import Policy
from gfn_spin.samples import pad_responses
from worlds.building import build_once, config_key, load_policy, sft

SYMBOLS = ("a", "b", "c", "d")
SHIFT_RULES = ("symbol", "style")
#: Context (``max_position_embeddings``) of the tiny world's models.
CONTEXT = 32
#: Longest prompt of the tiny world, in symbols.
MAX_PROMPT_SYMBOLS = 8
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "=>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[BOS] {{ m['content'] }} =>"
    "{% endif %}{% endfor %}"
)


@dataclass
class ToyWorldConfig:
    """Everything that determines the tiny world (its hash names the cache directory)."""

    seed: int = 0
    """Seed for the prompt split, the SFT sample and model initialization."""
    max_new_tokens: int = 7
    """Length cap L of responses."""
    prompt_lengths: tuple[int, ...] = (2, 3, 4)
    """Numbers of symbols in a prompt (all prompts of these lengths exist: 16+64+256)."""
    num_eval_prompts: int = 16
    """Held-out prompts used for every evaluation; never seen in training."""
    keep_prob: float = 0.7
    """Probability that a prompt symbol is written once."""
    double_prob: float = 0.15
    """Probability that a prompt symbol is written twice (skipped otherwise)."""
    noise_prob: float = 0.25
    """Probability that one uniform symbol is appended at the end."""
    sft_examples: int = 384
    """Size of the SFT sample (small on purpose: the base must be weak)."""
    sft_steps: int = 150
    """Optimizer steps of base SFT (few on purpose)."""
    shift_steps: int = 150
    """Optimizer steps that fine-tune the base toward the shifted rule."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    learning_rate: float = 3e-3
    batch_size: int = 64
    shift_rule: str = "symbol"
    """How the shifted task differs from the task: "symbol" (next symbol) or "style" (other
    keep/double/noise probabilities: the shifted_* fields below)."""
    shifted_keep_prob: float = 0.45
    """"style" rule: probability that a prompt symbol is written once."""
    shifted_double_prob: float = 0.4
    """"style" rule: probability that a prompt symbol is written twice."""
    shifted_noise_prob: float = 0.45
    """"style" rule: probability that one uniform symbol is appended."""
    version: int = 2
    """Version of the world's construction; part of the cache key, so a build made by another
    construction is never loaded."""

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
            return value

        for name in ("max_new_tokens", "num_eval_prompts", "sft_examples", "hidden_size"):
            integer(name, 1)
        for name in ("num_layers", "num_heads", "batch_size"):
            integer(name, 1)
        for name in ("seed", "sft_steps", "shift_steps"):
            integer(name, 0)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        lengths = self.prompt_lengths
        if (
            not isinstance(lengths, tuple | list)
            or not lengths
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths)
        ):
            raise ValueError(f"prompt_lengths={lengths!r} must be positive integers")
        if max(lengths) > MAX_PROMPT_SYMBOLS:
            raise ValueError(
                f"prompt_lengths={tuple(lengths)!r}: the world lists every prompt (4^n of length "
                f"n), so lengths stop at {MAX_PROMPT_SYMBOLS}"
            )
        if max(lengths) + 2 + self.max_new_tokens > CONTEXT:
            raise ValueError(
                f"prompt_lengths up to {max(lengths)} (plus [BOS] and =>) and "
                f"max_new_tokens={self.max_new_tokens} exceed the models' context of {CONTEXT} "
                "tokens; lower max_new_tokens or the prompt lengths"
            )
        total = sum(4**n for n in set(lengths))
        if self.num_eval_prompts >= total:
            raise ValueError(
                f"num_eval_prompts={self.num_eval_prompts} leaves no train prompts: there are "
                f"{total} prompts of lengths {tuple(lengths)}; lower num_eval_prompts"
            )
        if not (
            isinstance(self.learning_rate, int | float)
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0")
        if self.shift_rule not in SHIFT_RULES:
            raise ValueError(f"shift_rule={self.shift_rule!r} must be one of {SHIFT_RULES}")
        for prefix in ("", "shifted_"):
            keep, double, noise = (
                getattr(self, prefix + name) for name in ("keep_prob", "double_prob", "noise_prob")
            )
            if not (0 <= keep and 0 <= double and keep + double <= 1 and 0 <= noise <= 1):
                raise ValueError(
                    f"{prefix}keep_prob={keep}, {prefix}double_prob={double} and "
                    f"{prefix}noise_prob={noise} must be probabilities with keep + double <= 1"
                )

    def key(self) -> str:
        return config_key(self)


class EchoTask:
    """The exact response distribution ``p_data(y|x)`` of the noisy-echo task (and its shift)."""

    def __init__(self, config: ToyWorldConfig, symbol_ids: list[int], shift: int = 0):
        self.config = config
        self.symbol_ids = symbol_ids
        self.shift = shift
        self._cache: dict[tuple[int, ...], dict[tuple[int, ...], float]] = {}

    def _write(self, symbol: int) -> int:
        position = self.symbol_ids.index(symbol)
        return self.symbol_ids[(position + self.shift) % len(self.symbol_ids)]

    def table(self, prompt_ids: list[int] | tuple[int, ...]) -> dict[tuple[int, ...], float]:
        """``{response: probability}`` for one prompt (token ids with BOS and "=>")."""
        key = tuple(prompt_ids)
        if key in self._cache:
            return self._cache[key]
        cfg = self.config
        symbols = [t for t in prompt_ids if t in self.symbol_ids]
        actions = (
            (1, cfg.keep_prob),
            (0, 1 - cfg.keep_prob - cfg.double_prob),
            (2, cfg.double_prob),
        )
        noise = [((), 1 - cfg.noise_prob)] + [
            ((s,), cfg.noise_prob / len(self.symbol_ids)) for s in self.symbol_ids
        ]
        table: dict[tuple[int, ...], float] = defaultdict(float)
        for choice in itertools.product(actions, repeat=len(symbols)):
            prob = 1.0
            body: list[int] = []
            for symbol, (times, p) in zip(symbols, choice, strict=True):
                prob *= p
                body += [self._write(symbol)] * times
            for tail, p_tail in noise:
                response = tuple(body + [self._write(t) for t in tail])[: cfg.max_new_tokens]
                table[response] += prob * p_tail
        self._cache[key] = dict(table)
        return self._cache[key]

    def sample(self, prompt_ids: list[int], rng: random.Random) -> tuple[int, ...]:
        table = self.table(prompt_ids)
        return rng.choices(list(table), weights=list(table.values()))[0]

    def log_prob_on(self, prompt_ids: list[int], support: ExactDistribution) -> torch.Tensor:
        """``log p_data`` aligned with an enumerated support (-inf off the task's support)."""
        table = self.table(prompt_ids)
        probs = torch.tensor([table.get(r, 0.0) for r in support.responses], dtype=torch.float64)
        return probs.log()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the symbol vocabulary; ``"a b"`` encodes as ``[BOS] a b =>``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + SYMBOLS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A =>", special_tokens=[("[BOS]", vocab["[BOS]"]), ("=>", vocab["=>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def numbered_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """A tokenizer over ``t0 .. t{size-1}`` (t0 is PAD and UNK, t1 is EOS), for random-weight
    models of any vocabulary size: the benchmarks and the large, non-enumerable ablation."""
    vocab = {f"t{i}": i for i in range(size)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        eos_token="t1",
        pad_token="t0",
    )


@dataclass
class ToyWorld:
    """The tiny world: tokenizer, exact task, base and shifted policies, prompts, SFT data."""

    config: ToyWorldConfig
    tokenizer: Any
    task: EchoTask
    shifted_task: EchoTask
    base: Policy
    shifted: Policy
    train_prompts: list[list[int]]
    eval_prompts: list[list[int]]
    sft_data: dict[str, list[Any]]
    directory: Path
    symbol_ids: list[int] = field(default_factory=list)

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def load_policy(self, name: str = "base", **kwargs: Any) -> Policy:
        """A fresh copy of a saved policy ("base" or "shifted") from its directory."""
        return load_policy(self.directory, name, self.symbol_ids, **kwargs)

    def key(self) -> str:
        """The world's identity (its config hash), recorded by runs that use it."""
        return self.config.key()

    def evaluator(self) -> ToyWorldEvaluator:
        """α-SPIN's default evaluation on this world (exact KLs, :class:`ToyWorldEvaluator`)."""
        return ToyWorldEvaluator(self)

    def enumerate(self, density: Any, prompt_ids: list[int]) -> ExactDistribution:
        return exact_distribution(density, prompt_ids, self.max_new_tokens)

    def kl_from_data(self, policy: Any, prompts: list[list[int]] | None = None) -> float:
        """Mean exact ``KL(p_data ‖ policy)`` over ``prompts`` (default: the eval prompts)."""
        return ToyWorldEvaluator(self, prompts, drift_prompts=None).kl_from_data(policy)


def shifted_echo_task(config: ToyWorldConfig, symbol_ids: list[int]) -> EchoTask:
    """The task the shifted policy is fine-tuned toward, by ``config.shift_rule``."""
    if config.shift_rule == "symbol":
        return EchoTask(config, symbol_ids, shift=1)
    # EchoTask reads its probabilities from the config it is given.
    style = replace(
        config,
        keep_prob=config.shifted_keep_prob,
        double_prob=config.shifted_double_prob,
        noise_prob=config.shifted_noise_prob,
    )
    return EchoTask(style, symbol_ids)


def _all_prompts(config: ToyWorldConfig, tokenizer: Any) -> list[list[int]]:
    texts = [
        " ".join(symbols)
        for m in config.prompt_lengths
        for symbols in itertools.product(SYMBOLS, repeat=m)
    ]
    return [tokenizer(text)["input_ids"] for text in texts]


def _sft(
    policy: Policy,
    prompts: list[list[int]],
    responses: list[tuple[int, ...]],
    config: ToyWorldConfig,
    steps: int,
    seed: int,
) -> None:
    """:func:`worlds.building.sft` on (prompt, response) pairs, its draws seeded by ``seed``."""
    ids, lengths = pad_responses(responses, config.max_new_tokens, policy.pad_token_id)
    sft(policy, prompts, ids, lengths, config, steps, torch.Generator().manual_seed(seed))


def build_world(
    config: ToyWorldConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    rebuild: bool = False,
) -> ToyWorld:
    """Build (or load from the cache) the tiny world; deterministic for ``config.seed``.

    Args:
        config: the world's settings (defaults: :class:`ToyWorldConfig`).
        cache_dir: where models are saved (default ``$GFN_SPIN_CACHE/toyworld`` or
            ``~/.cache/gfn_spin/toyworld``), one subdirectory per config hash.
        device: device of the returned policies (models are trained on CPU).
        rebuild: retrain even when a cached build exists.
    """
    config = config or ToyWorldConfig()
    tokenizer = build_tokenizer()
    symbol_ids = tokenizer.convert_tokens_to_ids(list(SYMBOLS))
    task = EchoTask(config, symbol_ids)
    shifted_task = shifted_echo_task(config, symbol_ids)

    prompts = _all_prompts(config, tokenizer)
    rng = random.Random(config.seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    eval_prompts = [prompts[i] for i in sorted(order[: config.num_eval_prompts])]
    train_prompts = [prompts[i] for i in sorted(order[config.num_eval_prompts :])]
    sft_prompts = [rng.choice(train_prompts) for _ in range(config.sft_examples)]
    sft_responses = [task.sample(p, rng) for p in sft_prompts]

    def train(directory: Path) -> None:
        _train_models(
            config,
            tokenizer,
            symbol_ids,
            train_prompts,
            sft_prompts,
            sft_responses,
            shifted_task,
            rng,
            directory,
        )

    # The cache name predates the package: kept, so existing builds still load.
    directory, _ = build_once("toyworld", config, train, cache_dir=cache_dir, rebuild=rebuild)

    def load(name: str) -> Policy:
        return load_policy(directory, name, symbol_ids, device=device, dtype=torch.float32)

    return ToyWorld(
        config=config,
        tokenizer=tokenizer,
        task=task,
        shifted_task=shifted_task,
        base=load("base"),
        shifted=load("shifted"),
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        sft_data=_sft_data(tokenizer, sft_prompts, sft_responses),
        directory=directory,
        symbol_ids=symbol_ids,
    )


def _train_models(
    config: ToyWorldConfig,
    tokenizer: Any,
    symbol_ids: list[int],
    train_prompts: list[list[int]],
    sft_prompts: list[list[int]],
    sft_responses: list[tuple[int, ...]],
    shifted_task: EchoTask,
    rng: random.Random,
    directory: Path,
) -> None:
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=2 * config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )
    policy = Policy(model, tokenizer, allowed_token_ids=symbol_ids)
    _sft(policy, sft_prompts, sft_responses, config, config.sft_steps, config.seed)
    save_pretrained_atomic(policy, directory / "base")
    shift_prompts = [rng.choice(train_prompts) for _ in range(config.sft_examples)]
    shift_responses = [shifted_task.sample(p, rng) for p in shift_prompts]
    _sft(policy, shift_prompts, shift_responses, config, config.shift_steps, config.seed + 1)
    save_pretrained_atomic(policy, directory / "shifted")


def _sft_data(
    tokenizer: Any, prompts: list[list[int]], responses: list[tuple[int, ...]]
) -> dict[str, list[Any]]:
    """SFT pairs as text columns plus a chat column (``real``: user and assistant turns, as in
    SPIN data), ready for ``datasets.Dataset.from_dict``."""
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    prompt_texts = [t.replace("=>", "").strip() for t in prompt_texts]
    response_texts = tokenizer.batch_decode([list(r) for r in responses], skip_special_tokens=True)
    return {
        "prompt": prompt_texts,
        "response": response_texts,
        "real": [chat_messages(p, r) for p, r in zip(prompt_texts, response_texts, strict=True)],
    }


class ToyWorldEvaluator:
    """Exact ``KL(p_data ‖ π)`` and drift ``KL(π ‖ π_0)`` on the tiny world's eval prompts.

    Both are exact and cheap: ``KL(p_data ‖ π)`` needs π only on p_data's (small) support,
    one teacher-forced pass; the drift is ``KL`` between π's and π_0's enumerated response
    distributions (:func:`gfn_spin.exact.exact_distribution`, one decoding step per distinct
    prefix with the KV cache; π_0's enumeration is kept). Enumeration runs each prefix once,
    where reading the chain rule off a teacher-forced pass over all |A|^(L-1) full-length
    strings would run each prefix of length k |A|^(L-1-k) times.

    The drift costs one enumeration per prompt (21,845 responses on the default world), so it
    is taken on ``drift_prompts`` evenly spaced eval prompts only (None: all).
    """

    def __init__(
        self,
        world: Any,
        prompts: Sequence[Sequence[int]] | None = None,
        *,
        drift_prompts: int | None = 4,
    ) -> None:
        self.world = world
        self.prompts = [list(p) for p in (world.eval_prompts if prompts is None else prompts)]
        stride = max(1, len(self.prompts) // drift_prompts) if drift_prompts else 1
        self.drift_prompts = self.prompts[::stride][: drift_prompts or None]
        self.max_new_tokens = world.max_new_tokens
        supports, data_logps = [], []
        for prompt in self.prompts:
            table = world.task.table(prompt)
            supports.append(list(table))
            data_logps.append(torch.tensor(list(table.values()), dtype=torch.float64))
        self._supports = supports
        self._data_logps = data_logps
        self._base: list[ExactDistribution] | None = None

    @torch.no_grad()
    def kl_from_data(self, policy: Density) -> float:
        """Mean over prompts of ``Σ_y p(y) (log p(y) − log π(y))`` (exact)."""
        rows = [p for p, support in zip(self.prompts, self._supports, strict=True) for _ in support]
        responses = [r for support in self._supports for r in support]
        ids, lengths = pad_responses(responses, self.max_new_tokens, policy.eos_token_id)
        logq = policy.log_prob(rows, ids, lengths).double().cpu()
        total, offset = 0.0, 0
        for probs in self._data_logps:
            part = logq[offset : offset + len(probs)]
            offset += len(probs)
            mask = probs > 0
            total += float((probs[mask] * (probs[mask].log() - part[mask])).sum())
        return total / len(self.prompts)

    @torch.no_grad()
    def drift(self, policy: Density) -> float:
        """Mean over the drift prompts of ``KL(π ‖ π_0)`` (exact, by enumeration)."""
        if self._base is None:
            self._base = [self.world.enumerate(self.world.base, p) for p in self.drift_prompts]
        total = 0.0
        for prompt, base in zip(self.drift_prompts, self._base, strict=True):
            total += divergences(self.world.enumerate(policy, prompt).logprobs, base.logprobs)[
                "kl_pq"
            ]
        return total / len(self.drift_prompts)

    def __call__(self, policy: Density) -> dict[str, float]:
        return {"kl_data": self.kl_from_data(policy), "kl_drift": self.drift(policy)}
