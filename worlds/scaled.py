"""The scaled world: 256 symbols, responses up to 32 tokens, and exact references beyond enumeration.

For measuring samplers and GFlowNets where enumeration is impossible (``257^32`` responses) but
the truth must still be a number (docs/scaled_world.md). Everything here has a next-token law
that depends on the last two tokens only, so :mod:`worlds.bounded_context` gives exact ``log Z``,
exact sampling and exact divergences of any geometric mixture of its policies.

The task ("momentum walk"): symbols ``s0 .. s{A-1}`` sit on a circle. A prompt is the start of a
walk; the response continues it. From the last two symbols ``(a, b)`` the walk reads its step
``d = b − a`` (centred modulo A, clipped to ``±max_step``), keeps it (p = 1 − turn_prob) or
changes it by ±1 (turn_prob/2 each, clipped), and writes ``b + d'``; with ``jump_prob`` it
writes a uniform symbol instead; before every token it stops with ``stop_prob``. Responses are
cut at the length cap L (forced stop), so ``p_data(y|x)`` is an exact order-2 Markov law.

Two shifted tasks, each the target of a policy fine-tuned from the base:

- iterate (overlapping pair): the same walk with other turn and stop probabilities
  (``iterate_*`` fields): same support, other style, as a self-play iterate relates to its base;
- stress (non-overlapping pair): the "zig-zag" walk, which reverses its step each time
  (``d' = −d ± 1``): base and stress policy put their mass on nearly disjoint continuations.

Models: one-layer Mistral-style ``MistralForCausalLM`` with ``sliding_window = 2`` and rotary
positions, so a token's logits see that token and the one before it, at a fixed relative
offset: the law depends on the last two tokens only (checked by
:func:`worlds.bounded_context.check_bounded_context`). Saved with ``save_pretrained`` under
``$GFN_SPIN_CACHE/scaled_world/<config hash>`` and loaded back with ``from_pretrained``.

Why one module over 400 lines: the task's exact law, the data it samples, the models'
training and the cache key are one definition of the world (as in ``worlds.toy``); a
change to any of them must change the cache hash with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from gfn_spin.io import save_pretrained_atomic
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from worlds.bounded_context import BoundedContextTarget, ContextTables, expected_sum
from worlds.building import build_once, config_key, load_policy, sft

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
#: Tokens a next-token law depends on (the models' attention window; the task's order).
CONTEXT = 2
PAIRS = ("iterate", "stress")
#: Longest prompt plus response the models accept (their law does not depend on position).
MAX_POSITIONS = 4096


@dataclass
class ScaledWorldConfig:
    """Everything that determines the scaled world (its hash names the cache directory)."""

    seed: int = 0
    """Seed for prompts, data and model initialization."""
    num_symbols: int = 256
    """Alphabet size A (the vocabulary is A plus 4 special tokens)."""
    max_new_tokens: int = 32
    """Length cap L of responses."""
    max_step: int = 3
    """Largest step of the walk, in symbols (needs 2·max_step + 1 ≤ A)."""
    prompt_lengths: tuple[int, ...] = (2, 4, 6)
    """Numbers of symbols in a prompt (at least 2: the law reads the last two)."""
    num_train_prompts: int = 2048
    """Prompts the SFT and fine-tuning data are drawn on."""
    num_eval_prompts: int = 32
    """Held-out prompts: their last two symbols never end a train prompt."""
    turn_prob: float = 0.3
    """Probability that the step changes by ±1 (half each)."""
    jump_prob: float = 0.05
    """Probability that a uniform symbol is written instead of the walk's next one."""
    stop_prob: float = 0.04
    """Probability of stopping before each token."""
    iterate_turn_prob: float = 0.6
    """Iterate's task: turn probability."""
    iterate_stop_prob: float = 0.08
    """Iterate's task: stop probability."""
    sft_examples: int = 4096
    """Size of the base's SFT sample."""
    sft_steps: int = 400
    """Optimizer steps of base SFT."""
    finetune_steps: int = 200
    """Optimizer steps that fine-tune the base toward each shifted task."""
    hidden_size: int = 64
    num_heads: int = 4
    learning_rate: float = 3e-3
    batch_size: int = 64
    version: int = 1
    """Bumped when the construction changes, so old caches are not reused."""

    def __post_init__(self) -> None:
        for name in ("num_symbols", "max_new_tokens", "max_step", "num_train_prompts"):
            _integer(self, name, 1)
        for name in ("num_eval_prompts", "sft_examples", "hidden_size", "num_heads"):
            _integer(self, name, 1)
        for name in ("seed", "sft_steps", "finetune_steps"):
            _integer(self, name, 0)
        _integer(self, "batch_size", 1)
        if 2 * self.max_step + 1 > self.num_symbols:
            raise ValueError(
                f"max_step={self.max_step} needs 2·max_step + 1 <= num_symbols="
                f"{self.num_symbols}: steps must land on distinct symbols"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        lengths = self.prompt_lengths
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) for n in lengths):
            raise ValueError(f"prompt_lengths={lengths!r} must be integers")
        if min(lengths) < CONTEXT:
            raise ValueError(f"prompt_lengths={tuple(lengths)!r} must all be >= {CONTEXT}")
        if self.num_eval_prompts > self.num_symbols**2 // 2:
            raise ValueError(
                f"num_eval_prompts={self.num_eval_prompts} needs distinct last-two-symbol pairs "
                f"(at most half of the {self.num_symbols**2}); lower it"
            )
        for name in ("turn_prob", "jump_prob", "stop_prob", "iterate_turn_prob"):
            _probability(self, name)
        _probability(self, "iterate_stop_prob")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a finite number > 0")

    @classmethod
    def small(cls, **overrides: Any) -> ScaledWorldConfig:
        """A variant small enough to enumerate (5 symbols, cap 5) and to build in seconds."""
        values: dict[str, Any] = {
            "num_symbols": 5,
            "max_new_tokens": 5,
            "max_step": 1,
            "prompt_lengths": (2, 3),
            "num_train_prompts": 64,
            "num_eval_prompts": 4,
            "sft_examples": 256,
            "sft_steps": 60,
            "finetune_steps": 40,
            "hidden_size": 16,
            "num_heads": 2,
            "turn_prob": 0.3,
            "jump_prob": 0.1,
            "stop_prob": 0.15,
            "iterate_stop_prob": 0.3,
        }
        values.update(overrides)
        return cls(**values)

    def key(self) -> str:
        return config_key(self)


def _integer(config: Any, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _probability(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not (isinstance(value, int | float) and 0 <= value <= 1):
        raise ValueError(f"{name}={value!r} must be a probability in [0, 1]")


def walk_tables(
    num_symbols: int,
    *,
    max_step: int,
    turn_prob: float,
    jump_prob: float,
    stop_prob: float,
    zigzag: bool,
    alphabet: Sequence[int],
    eos_token_id: int,
) -> ContextTables:
    """The exact next-token law of the walk at every context ``(a, b)``: ``[A², A+1]`` tables."""
    size = num_symbols
    pairs = torch.arange(size * size)
    a, b = pairs // size, pairs % size
    step = ((b - a + size // 2) % size - size // 2).clamp(-max_step, max_step)
    if zigzag:
        step = -step
    probs = torch.full((size * size, size + 1), jump_prob / size, dtype=torch.float64)
    for change, weight in ((-1, turn_prob / 2), (0, 1 - turn_prob), (1, turn_prob / 2)):
        written = (b + (step + change).clamp(-max_step, max_step)) % size
        probs[pairs, written] += (1 - jump_prob) * weight
    probs[:, :size] *= 1 - stop_prob
    probs[:, size] = stop_prob
    return ContextTables(probs.log(), list(alphabet), eos_token_id, CONTEXT)


def build_tokenizer(num_symbols: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer over ``s0 .. s{A-1}``; ``"s3 s4"`` encodes as ``[BOS] s3 s4``."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"s{i}": len(SPECIALS) + i for i in range(num_symbols)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )


@dataclass
class ScaledWorld:
    """The scaled world: tokenizer, exact tasks, the three policies, prompts.

    ``task``, ``iterate_task`` and ``stress_task`` are the exact data laws as
    :class:`~worlds.bounded_context.ContextTables`; ``base``, ``iterate`` and ``stress`` the trained
    policies (pairs: ``(base, iterate)`` overlaps, ``(base, stress)`` does not).
    """

    config: ScaledWorldConfig
    tokenizer: Any = field(repr=False)
    task: ContextTables = field(repr=False)
    iterate_task: ContextTables = field(repr=False)
    stress_task: ContextTables = field(repr=False)
    base: Policy
    iterate: Policy
    stress: Policy
    train_prompts: list[list[int]] = field(repr=False)
    eval_prompts: list[list[int]] = field(repr=False)
    directory: Path
    symbol_ids: list[int] = field(repr=False)
    build_seconds: float | None = None
    _tables: dict[str, ContextTables] = field(default_factory=dict, repr=False)

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def load_policy(self, name: str = "base", **kwargs: Any) -> Policy:
        """A fresh copy of a saved policy ("base", "iterate" or "stress")."""
        return load_policy(self.directory, _check_policy_name(name), self.symbol_ids, **kwargs)

    def policy_tables(self, name: str) -> ContextTables:
        """The next-token law of policy ``name`` at every context (read once, then kept)."""
        if name not in self._tables:
            self._tables[name] = ContextTables.from_density(
                getattr(self, _check_policy_name(name)), self.symbol_ids, CONTEXT
            )
        return self._tables[name]

    def mixture(self, alpha: float, pair: str = "iterate") -> GeometricMixture:
        """``base^(1−α) · other^α`` for ``pair`` in ("iterate", "stress")."""
        return GeometricMixture([self.base, getattr(self, _check_pair(pair))], [1 - alpha, alpha])

    def target(self, alpha: float, pair: str = "iterate") -> BoundedContextTarget:
        """The exact normalized law of :meth:`mixture` (log Z, sampling, divergences)."""
        tables = self.policy_tables("base").combine(
            [self.policy_tables(_check_pair(pair))], [1 - alpha, alpha]
        )
        return BoundedContextTarget(tables, self.max_new_tokens)

    def kl_from_data(self, name: str, prompts: Sequence[Sequence[int]] | None = None) -> float:
        """Mean exact ``KL(p_data ‖ policy)`` over ``prompts`` (default: the eval prompts)."""
        prompts = self.eval_prompts if prompts is None else prompts
        # E_data[Σ_t log p_data − log π] under the data's own (length-free) law.
        values = self.task.logprobs - self.policy_tables(name).logprobs
        per_context = expected_sum(
            self.task.logprobs, values, self.task.successor(), self.max_new_tokens
        )
        return float(per_context[self.task.context_index(prompts)].mean())


def _check_pair(pair: str) -> str:
    if pair not in PAIRS:
        raise ValueError(f"pair={pair!r} must be one of {PAIRS}")
    return pair


def _check_policy_name(name: str) -> str:
    if name not in ("base", *PAIRS):
        raise ValueError(f"name={name!r} must be one of {('base', *PAIRS)}")
    return name


def _tasks(config: ScaledWorldConfig, symbol_ids: list[int], eos: int) -> list[ContextTables]:
    common = {
        "max_step": config.max_step,
        "jump_prob": config.jump_prob,
        "alphabet": symbol_ids,
        "eos_token_id": eos,
    }
    return [
        walk_tables(
            config.num_symbols,
            turn_prob=config.turn_prob,
            stop_prob=config.stop_prob,
            zigzag=False,
            **common,
        ),
        walk_tables(
            config.num_symbols,
            turn_prob=config.iterate_turn_prob,
            stop_prob=config.iterate_stop_prob,
            zigzag=False,
            **common,
        ),
        walk_tables(
            config.num_symbols,
            turn_prob=config.turn_prob,
            stop_prob=config.stop_prob,
            zigzag=True,
            **common,
        ),
    ]


def _prompts(
    config: ScaledWorldConfig, task: ContextTables, symbol_ids: list[int], bos: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Train and eval prompts: walk starts, split so that no eval prompt's last two symbols end
    a train prompt (the models' law at the first response token sees exactly those two)."""
    generator = torch.Generator().manual_seed(config.seed)
    size = config.num_symbols
    walking = task.logprobs[:, :size].exp()  # the walk without stopping, for prompts
    pool = 4 * (config.num_train_prompts + config.num_eval_prompts)
    lengths = torch.tensor(config.prompt_lengths)[
        torch.randint(len(config.prompt_lengths), (pool,), generator=generator)
    ]
    first = torch.randint(size, (pool,), generator=generator)
    step = torch.randint(-config.max_step, config.max_step + 1, (pool,), generator=generator)
    symbols = [first, (first + step) % size]
    for _ in range(max(config.prompt_lengths) - 2):
        law = walking[symbols[-2] * size + symbols[-1]]
        symbols.append(torch.multinomial(law, 1, generator=generator).squeeze(1))
    walks = torch.stack(symbols, 1)
    ids = torch.tensor(symbol_ids)
    prompts = [[bos, *ids[walks[i, : int(n)]].tolist()] for i, n in enumerate(lengths)]
    tails: dict[tuple[int, int], None] = {}
    for prompt in prompts:
        tails.setdefault((prompt[-2], prompt[-1]), None)
    held_out = set(list(tails)[: config.num_eval_prompts])
    eval_prompts, train_prompts, seen = [], [], set()
    for prompt in prompts:
        tail = (prompt[-2], prompt[-1])
        if tail in held_out and tail not in seen:
            seen.add(tail)
            eval_prompts.append(prompt)
        elif tail not in held_out and len(train_prompts) < config.num_train_prompts:
            train_prompts.append(prompt)
    if len(eval_prompts) < config.num_eval_prompts:
        raise ValueError(
            f"only {len(eval_prompts)} distinct prompt endings for num_eval_prompts="
            f"{config.num_eval_prompts}; lower it"
        )
    return train_prompts, eval_prompts


def _responses(
    task: ContextTables,
    prompts: list[list[int]],
    config: ScaledWorldConfig,
    count: int,
    generator: torch.Generator,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """``count`` (prompt, exact p_data response) pairs on random ``prompts``."""
    chosen = torch.randint(len(prompts), (count,), generator=generator).tolist()
    rows = [prompts[i] for i in chosen]
    draws = BoundedContextTarget(task, config.max_new_tokens).sample(rows, generator=generator)
    return rows, draws.response_ids, draws.lengths


def _model(config: ScaledWorldConfig, tokenizer: Any) -> MistralForCausalLM:
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=2 * config.hidden_size,
            num_hidden_layers=1,  # one layer: the receptive field is the window itself
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            sliding_window=CONTEXT,
            # Rotary positions and the window make the law position-free: any length works.
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )


def build_world(
    config: ScaledWorldConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    rebuild: bool = False,
) -> ScaledWorld:
    """Build (or load from the cache) the scaled world; deterministic for ``config.seed``.

    Args:
        config: the world's settings (defaults: :class:`ScaledWorldConfig`).
        cache_dir: where models are saved (default ``$GFN_SPIN_CACHE/scaled_world`` or
            ``~/.cache/gfn_spin/scaled_world``), one subdirectory per config hash.
        device: device of the returned policies (models are trained on CPU).
        rebuild: retrain even when a cached build exists.
    """
    config = config or ScaledWorldConfig()
    tokenizer = build_tokenizer(config.num_symbols)
    symbol_ids = tokenizer.convert_tokens_to_ids([f"s{i}" for i in range(config.num_symbols)])
    eos = tokenizer.eos_token_id
    task, iterate_task, stress_task = _tasks(config, symbol_ids, eos)
    train_prompts, eval_prompts = _prompts(config, task, symbol_ids, tokenizer.bos_token_id)

    def train(directory: Path) -> None:
        _train_models(
            config, tokenizer, symbol_ids, train_prompts, task, iterate_task, stress_task, directory
        )

    # The cache name predates the package: kept, so existing builds still load.
    directory, record = build_once(
        "scaled_world", config, train, cache_dir=cache_dir, rebuild=rebuild
    )
    seconds = record.get("build_seconds")

    def load(name: str) -> Policy:
        return load_policy(directory, name, symbol_ids, device=device, dtype=torch.float32)

    return ScaledWorld(
        config=config,
        tokenizer=tokenizer,
        task=task,
        iterate_task=iterate_task,
        stress_task=stress_task,
        base=load("base"),
        iterate=load("iterate"),
        stress=load("stress"),
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        directory=directory,
        symbol_ids=symbol_ids,
        build_seconds=seconds,
    )


def _train_models(
    config: ScaledWorldConfig,
    tokenizer: Any,
    symbol_ids: list[int],
    train_prompts: list[list[int]],
    task: ContextTables,
    iterate_task: ContextTables,
    stress_task: ContextTables,
    directory: Path,
) -> None:
    """SFT the base on a p_data sample, then fine-tune a copy of it toward each shifted task."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed)
    base = Policy(_model(config, tokenizer), tokenizer, allowed_token_ids=symbol_ids)
    data = _responses(task, train_prompts, config, config.sft_examples, generator)
    sft(base, *data, config, config.sft_steps, generator)
    save_pretrained_atomic(base, directory / "base")
    for name, shifted in (("iterate", iterate_task), ("stress", stress_task)):
        policy = Policy(_model(config, tokenizer), tokenizer, allowed_token_ids=symbol_ids)
        policy.model.load_state_dict(base.model.state_dict())
        data = _responses(shifted, train_prompts, config, config.sft_examples, generator)
        sft(policy, *data, config, config.finetune_steps, generator)
        save_pretrained_atomic(policy, directory / name)
