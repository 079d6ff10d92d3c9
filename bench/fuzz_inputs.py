"""Fuzz pass over what a user hands gfn-spin: API arguments, both command lines, and every
file the toolkit reads back (checkpoints, manifests, metrics.json, adapters, parquet, jsonl).

For whoever changes input handling: run ``python -m bench.fuzz_inputs`` (CPU, about 10
minutes on the tiny world; ``--only NAME`` runs the cases whose name holds NAME). Each case
runs in a fresh folder that also holds a user's files (and, for pickles, a file whose
creation proves that code ran); its outcome is classified as one of :data:`OUTCOMES`:

- clear early error: a ValueError/TypeError/OSError-family refusal (or argparse's usage
  error) whose message is the toolkit's own, raised before any training work;
- correct: the call succeeded and its result passed the case's check, or a fit that
  diverged stopped with a FloatingPointError naming the step;
- silent-wrong: it succeeded but the check failed (a setting ignored, NaN weights saved);
- raw traceback: another exception type, or a library's message passed through;
- late refusal: a refusal of something knowable up front, after training work started;
- data loss: a user's file changed or disappeared;
- code execution: a pickled payload ran.

Prints one line per case that is not clear/correct, then the counts by class as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

OUTCOMES = (
    "clear early error",
    "correct",
    "silent-wrong",
    "raw traceback",
    "late refusal",
    "data loss",
    "code execution",
)
#: Library messages that must never reach a user unexplained.
RAW_PHRASES = (
    "probability tensor contains",
    "size mismatch for",
    "invalid literal for int()",
    "codec can't decode",
    "Weights only load failed",
    "weights_only=False",
    "list index out of range",
    "object has no attribute",
    "KeyError",
)
USER_FILES = {"notes.txt": "mine", "draft.tmp": "draft", "data/mine.csv": "a,b\n"}


class Payload:
    """Unpickling this writes ``marker``: proof that code in a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@dataclass
class Case:
    """``run(folder)`` does the thing; ``check(result, folder)`` says whether a success is
    right (None: any success is wrong); ``up_front``: a refusal is expected before work, so a
    refusal after ``worked(folder)`` is late."""

    name: str
    run: Callable[[Path], Any]
    check: Callable[[Any, Path], bool] | None = None
    worked: Callable[[Path], bool] | None = None
    user_dir: str = "."  # where the user's files sit, relative to the case folder


#: Every user file planted in the running case (path, text): checked after the case.
_PLANTED: list[tuple[Path, str]] = []


def _plant(folder: Path) -> None:
    """Put a user's files into ``folder`` (also inside folders the toolkit writes)."""
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        _PLANTED.append((folder / name, text))


def _clear(message: str) -> bool:
    return len(message) > 15 and not any(p in message for p in RAW_PHRASES)


def classify(case: Case, root: Path) -> tuple[str, str]:
    folder = Path(tempfile.mkdtemp(dir=root, prefix="case_"))
    user = folder / case.user_dir
    user.mkdir(parents=True, exist_ok=True)
    _PLANTED.clear()
    _plant(user)
    marker = folder / "PWNED"
    os.environ["FUZZ_MARKER"] = str(marker)
    err = io.StringIO()
    outcome, detail = "correct", ""
    try:
        with contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = case.run(folder)
        if case.check is None or not case.check(result, folder):
            outcome, detail = "silent-wrong", f"accepted: {str(result)[:120]}"
    except SystemExit as exited:  # a command line's exit
        text = err.getvalue()
        lines = [line for line in text.splitlines() if line.strip()]
        if exited.code in (0, None):
            ok = case.check is not None and case.check(None, folder)
            outcome = "correct" if ok else "silent-wrong"
            detail = "exit 0"
        elif "Traceback" in text or not lines or not _clear(lines[-1]):
            outcome, detail = "raw traceback", (lines[-1] if lines else "")[:160]
        elif case.worked is not None and case.worked(folder):
            outcome, detail = "late refusal", lines[-1][:160]
        else:
            outcome, detail = "clear early error", lines[-1][:160]
    except (ValueError, TypeError, OSError, FloatingPointError, RuntimeError) as error:
        message = " ".join(str(error).split())
        toolkit = type(error).__module__.split(".")[0] in ("builtins", "gfn_spin", "samplers")
        if (
            not _clear(message)
            or not toolkit
            or type(error) is RuntimeError
            and "gfn" not in message
        ):
            outcome, detail = "raw traceback", f"{type(error).__name__}: {message[:160]}"
        elif case.worked is not None and case.worked(folder):
            outcome, detail = "late refusal", message[:160]
        elif isinstance(error, FloatingPointError):
            outcome, detail = "correct", f"stopped: {message[:150]}"  # divergence, step named
        else:
            outcome, detail = "clear early error", message[:160]
    except Exception as error:  # noqa: BLE001 -- what the fuzz pass looks for
        outcome, detail = "raw traceback", f"{type(error).__name__}: {str(error)[:160]}"
    lost = [
        str(p.relative_to(folder)) for p, t in _PLANTED if not p.is_file() or p.read_text() != t
    ]
    if lost:
        outcome, detail = "data loss", f"lost {lost}"
    if marker.exists():
        outcome, detail = "code execution", "payload ran"
    shutil.rmtree(folder, ignore_errors=True)
    return outcome, detail


# -- the tiny world and its pieces ----------------------------------------------------------------

_WORLD: dict[str, Any] = {}


def world():
    if "w" not in _WORLD:
        from worlds.toy import build_world

        _WORLD["w"] = build_world()
    return _WORLD["w"]


def policy(name: str = "shifted"):
    return world().load_policy(name, device="cpu", dtype=torch.float32)


def target_init():
    from gfn_spin import GeometricMixture

    shifted = policy()
    return GeometricMixture([world().base, shifted], [0.5, 0.5]), shifted


TINY = {"max_new_tokens": 7, "prompts_per_step": 2, "samples_per_prompt": 2, "warmup_steps": 1}


def gflownet(**overrides):
    from samplers import GFlowNetSampler

    return GFlowNetSampler(*target_init(), **{**TINY, **overrides})


def finite_weights(sampler) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in sampler.trainable_parameters)


# -- cases -----------------------------------------------------------------------------------------


def config_cases() -> list[Case]:
    """GFlowNetConfig and AlphaSpinConfig fields with values of every kind."""
    from samplers.gflownet import GFlowNetConfig
    from selfplay import AlphaSpinConfig

    valid_gfn = {
        "learning_rate": lambda v: math.isfinite(v) and v > 0,
        "lora_alpha": lambda v: math.isfinite(v) and v > 0,
        "weight_decay": lambda v: math.isfinite(v) and v >= 0,
        "subtb_lambda": lambda v: math.isfinite(v) and v >= 0,
        "max_grad_norm": lambda v: math.isfinite(v) and v > 0,
        "reward_temperature_start": lambda v: math.isfinite(v) and v > 0,
        "reward_temperature_end": lambda v: math.isfinite(v) and v > 0,
        "explore_prob": lambda v: 0 <= v <= 1,
        "replay_prob": lambda v: 0 <= v <= 1,
        "eval_every": lambda v: float(v).is_integer() and v >= 0 and isinstance(v, int),
        "checkpoint_every": lambda v: isinstance(v, int) and v >= 0,
        "steps": lambda v: isinstance(v, int) and v >= 0,
        "lora_rank": lambda v: isinstance(v, int) and v >= 1,
        "prompts_per_step": lambda v: isinstance(v, int) and v >= 1,
        "max_new_tokens": lambda v: isinstance(v, int) and v >= 1,
    }
    values = [math.nan, math.inf, -math.inf, -1, 0, 1e30, 2.5, True]
    cases = []
    for name, valid in valid_gfn.items():
        for value in values:

            def run(_: Path, name=name, value=value):
                return GFlowNetConfig(**{name: value})

            def check(config, _: Path, name=name, valid=valid):
                value = getattr(config, name)
                return not isinstance(value, bool) and valid(value)

            cases.append(Case(f"GFlowNetConfig {name}={value!r}", run, check))
    spin_valid = {
        "learning_rate": lambda v: math.isfinite(v) and v > 0,
        "beta": lambda v: math.isfinite(v) and v > 0,
        "alpha": lambda v: 0 <= v <= 1,
        "iterations": lambda v: isinstance(v, int) and v >= 1,
        "batch_size": lambda v: isinstance(v, int) and v >= 1,
    }
    for name, valid in spin_valid.items():
        for value in (math.nan, -1, 0, 1e30, 2.5):

            def run(folder: Path, name=name, value=value):
                return AlphaSpinConfig(output_dir=str(folder / "run"), **{name: value})

            def check(config, _: Path, name=name, valid=valid):
                return valid(getattr(config, name))

            cases.append(Case(f"AlphaSpinConfig {name}={value!r}", run, check))
    for name in ("/tmp/x", "../x", "a b", "", "iter-1", "x" * 300, 5):
        cases.append(
            Case(
                f"GFlowNetConfig adapter_name={name!r:.30}",
                lambda _, n=name: GFlowNetConfig(adapter_name=n),
                None,
            )
        )
    return cases


def prompt_cases() -> list[Case]:
    from samplers import AncestralSampler

    def sample(prompts, **kwargs):
        def run(_: Path):
            sampler = AncestralSampler(policy("base"), max_new_tokens=kwargs.pop("cap", 4))
            return sampler.sample(
                prompts, kwargs.pop("n", 2), generator=kwargs.pop("g", 0), **kwargs
            )

        return run

    def drew(draws, _: Path) -> bool:
        return bool(torch.isfinite(draws.log_q).all())

    inputs = {
        "empty string": ([""], None),
        "whitespace": (["  \t"], None),
        "empty ids": ([[]], None),
        "negative id": ([[-1]], None),
        "float ids": ([[1.5]], None),
        "None prompt": ([None], None),
        "int prompt": ([5], None),
        "bare string": ("a b", None),
        "bytes": ([b"a b"], None),
        "unknown words": (["a zebra b"], drew),
        "known words": (["a b"], drew),
        "NUL char": (["a\x00b"], drew),
        "emoji": (["a 🙂 b"], drew),
        "special token text": (["[EOS] a"], None),
        "huge prompt": (["a " * 5000], None),
        "id beyond vocab": ([[10**9]], None),
    }
    cases = [Case(f"sample prompts={k}", sample(p), c) for k, (p, c) in inputs.items()]
    for label, kwargs in {
        "n=0": {"n": 0},
        "n=-1": {"n": -1},
        "n=2.5": {"n": 2.5},
        "generator='x'": {"g": "x"},
        "temperature=nan": {"temperature": math.nan},
        "temperature=0": {"temperature": 0.0},
        "top_p=0": {"top_p": 0.0},
        "top_p=nan": {"top_p": math.nan},
        "cap=0": {"cap": 0},
        "cap=10**6": {"cap": 10**6},
    }.items():
        cases.append(Case(f"sample {label}", sample(["a b"], **kwargs), None))
    return cases


def adapter_cases() -> list[Case]:
    def saved(folder: Path) -> Path:
        p = policy("base")
        p.add_adapter("x").save_pretrained(folder / "adapter")
        return next((folder / "adapter").rglob("adapter_config.json")).parent

    def load_after(damage: Callable[[Path], None], expect_ok: bool = False) -> Case:
        def run(folder: Path):
            adapter = saved(folder)
            damage(adapter)
            return policy("base").load_adapter(adapter, "x")

        return run, (lambda r, _: True) if expect_ok else None

    from safetensors.torch import load_file, save_file

    def weights(a: Path) -> Path:
        return a / "adapter_model.safetensors"

    damages: dict[str, tuple[Callable[[Path], None], bool]] = {
        "intact": (lambda a: None, True),
        "truncated": (lambda a: weights(a).write_bytes(weights(a).read_bytes()[:64]), False),
        "empty file": (lambda a: weights(a).write_bytes(b""), False),
        "random bytes": (lambda a: weights(a).write_bytes(os.urandom(4096)), False),
        "nan weights": (
            lambda a: save_file(
                {k: torch.full_like(v, math.nan) for k, v in load_file(weights(a)).items()},
                weights(a),
            ),
            False,
        ),  # noqa: E501
        "wrong shapes": (
            lambda a: save_file(
                {
                    k: torch.zeros(v.shape[0] + 2, v.shape[1])
                    for k, v in load_file(weights(a)).items()
                },
                weights(a),
            ),
            False,
        ),  # noqa: E501
        "int tensors": (
            lambda a: save_file(
                {
                    k: torch.zeros(v.shape, dtype=torch.int64)
                    for k, v in load_file(weights(a)).items()
                },
                weights(a),
            ),
            False,
        ),  # noqa: E501
        "no tensors": (lambda a: save_file({}, weights(a)), False),
        "garbage config": (lambda a: (a / "adapter_config.json").write_text("{nope"), False),
        "config a list": (lambda a: (a / "adapter_config.json").write_text("[1]"), False),
        "config rank 999": (
            lambda a: (a / "adapter_config.json").write_text(
                json.dumps({**json.loads((a / "adapter_config.json").read_text()), "r": 999})
            ),
            False,
        ),  # noqa: E501
        "no config": (lambda a: (a / "adapter_config.json").unlink(), False),
        "malicious bin": (
            lambda a: (
                weights(a).unlink(),
                pickle.dump(
                    {"w": Payload(Path(os.environ["FUZZ_MARKER"]))},
                    open(a / "adapter_model.bin", "wb"),
                ),
            ),
            False,
        ),  # noqa: E501
        "random bin": (
            lambda a: (weights(a).unlink(), (a / "adapter_model.bin").write_bytes(os.urandom(512))),
            False,
        ),  # noqa: E501
        "bin of a list": (
            lambda a: (weights(a).unlink(), torch.save([torch.zeros(2)], a / "adapter_model.bin")),
            False,
        ),  # noqa: E501
    }
    cases = []
    for label, (damage, ok) in damages.items():
        run, check = load_after(damage, ok)
        cases.append(Case(f"Policy.load_adapter {label}", run, check))
    for name in ("/abs/path", "../up", "a.b", "", "ok_name"):

        def run(folder: Path, name=name):
            target = (folder / "abs") if name == "/abs/path" else name
            p = policy("base").add_adapter(str(target))
            p.save_pretrained(folder / "out")
            return p

        cases.append(
            Case(
                f"Policy.add_adapter {name!r}",
                run,
                (lambda r, _: True) if name == "ok_name" else None,
            )  # noqa: E501
        )
    return cases


def checkpoint_cases() -> list[Case]:
    """Damage one file of a GFlowNet checkpoint, then resume from it (and load it)."""
    from samplers import GFlowNetSampler

    def fitted(folder: Path, **overrides) -> Path:
        gflownet(**overrides).fit(
            world().train_prompts[:4], steps=2, checkpoint_dir=folder / "ck", progress=False
        )  # noqa: E501
        return folder / "ck" / "step_0000002"

    def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
        def damage(step: Path) -> None:
            path = step / name
            path.write_text(json.dumps(change(json.loads(path.read_text()))))

        return damage

    damages: dict[str, Callable[[Path], None]] = {
        "metrics step 999": edit_json("metrics.json", lambda v: {**v, "step": 999}),
        "metrics step 'abc'": edit_json("metrics.json", lambda v: {**v, "step": "abc"}),
        "metrics step -1": edit_json("metrics.json", lambda v: {**v, "step": -1}),
        "metrics step 1.5": edit_json("metrics.json", lambda v: {**v, "step": 1.5}),
        "metrics a list": edit_json("metrics.json", lambda v: [v]),
        "metrics no step": edit_json("metrics.json", lambda v: {"metrics": []}),
        "metrics metrics=5": edit_json("metrics.json", lambda v: {**v, "metrics": 5}),
        "metrics not json": lambda s: (s / "metrics.json").write_text("{"),
        "metrics not utf-8": lambda s: (s / "metrics.json").write_bytes(b"\xff\xfe"),
        "metrics removed": lambda s: (s / "metrics.json").unlink(),
        "config not json": lambda s: (s / "gflownet_config.json").write_text("nope"),
        "config unknown field": edit_json("gflownet_config.json", lambda v: {**v, "bogus": 1}),
        "config lora_rank=64": edit_json("gflownet_config.json", lambda v: {**v, "lora_rank": 64}),
        "config learning_rate nan": edit_json(
            "gflownet_config.json", lambda v: {**v, "learning_rate": math.nan}
        ),  # noqa: E501
        "config a list": edit_json("gflownet_config.json", lambda v: [v]),
        "state truncated": lambda s: (s / "trainer_state.pt").write_bytes(
            (s / "trainer_state.pt").read_bytes()[:100]
        ),  # noqa: E501
        "state random": lambda s: (s / "trainer_state.pt").write_bytes(os.urandom(1000)),
        "state malicious": lambda s: pickle.dump(
            {"optimizer": Payload(Path(os.environ["FUZZ_MARKER"]))},
            open(s / "trainer_state.pt", "wb"),
        ),  # noqa: E501
        "state missing keys": lambda s: torch.save({"optimizer": {}}, s / "trainer_state.pt"),
        "state a tensor": lambda s: torch.save(torch.zeros(3), s / "trainer_state.pt"),
        "weights nan": lambda s: _nan_weights(s),
        "weights wrong shape": lambda s: _reshape_weights(s),
        "weights truncated": lambda s: _weights_file(s).write_bytes(
            _weights_file(s).read_bytes()[:50]
        ),  # noqa: E501
        "marker points outside": lambda s: (s / ".gfn-spin-dir").write_text(
            json.dumps({"files": ["../../notes.txt", "/etc/hosts"], "complete": True})
        ),  # noqa: E501
        "marker unfinished": lambda s: (s / ".gfn-spin-dir").write_text(
            json.dumps({"files": [], "complete": False})
        ),  # noqa: E501
        "marker garbage": lambda s: (s / ".gfn-spin-dir").write_text("\x00\x01"),
    }
    cases = []
    for parametrization in ("residual", "lora"):
        for label, damage in damages.items():
            if parametrization == "lora" and label.startswith(("metrics", "config", "marker")):
                continue  # the same files for both forms

            def resume(folder: Path, damage=damage, parametrization=parametrization):
                step = fitted(folder, parametrization=parametrization)
                damage(step)
                _plant(folder / "ck")
                _plant(step)
                sampler = gflownet(parametrization=parametrization)
                sampler.fit(
                    world().train_prompts[:4],
                    steps=3,
                    checkpoint_dir=folder / "ck",
                    resume=True,
                    progress=False,
                )  # noqa: E501
                return sampler

            def resumed_right(sampler, folder: Path) -> bool:
                # Either it resumed from an intact checkpoint, or (a damaged marker list)
                # it resumed and never touched files outside the folder.
                return sampler.state.step == 3 and finite_weights(sampler)

            check = (
                resumed_right
                if label in ("marker points outside", "marker garbage", "marker unfinished")
                else None
            )  # noqa: E501
            cases.append(Case(f"resume {parametrization} {label}", resume, check))

            def load(folder: Path, damage=damage, parametrization=parametrization):
                step = fitted(folder, parametrization=parametrization)
                damage(step)
                return GFlowNetSampler.load(step, *target_init())

            load_check = (lambda r, _: finite_weights(r)) if label.startswith("marker") else None
            if label.startswith(("weights", "config", "marker")):
                cases.append(Case(f"load {parametrization} {label}", load, load_check))
    return cases


def _weights_file(step: Path) -> Path:
    return next(step.glob("*.safetensors"))


def _nan_weights(step: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _weights_file(step)
    save_file({k: torch.full_like(v, math.nan) for k, v in load_file(path).items()}, path)


def _reshape_weights(step: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _weights_file(step)
    save_file(
        {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in load_file(path).items()}, path
    )  # noqa: E501


def fit_cases() -> list[Case]:
    """Fits that diverge, settings through fit, and saves into folders holding user files."""

    def fit(overrides: dict, steps: int = 3):
        def run(folder: Path):
            sampler = gflownet(**overrides)
            sampler.fit(world().train_prompts[:4], steps=steps, progress=False)
            sampler.save(folder / "saved")
            return sampler

        return run

    def sane(sampler, folder: Path) -> bool:
        losses = [m["loss"] for m in sampler.metrics]
        return finite_weights(sampler) and all(math.isfinite(x) for x in losses)

    cases = []
    for form in ("residual", "lora", "twist"):
        for lr in (1e30, 1e6, 1e-3):
            cases.append(
                Case(
                    f"fit {form} learning_rate={lr:g}",
                    fit({"parametrization": form, "learning_rate": lr}),
                    sane,
                )
            )  # noqa: E501
        cases.append(
            Case(
                f"fit {form} reward_temperature 1e-30",
                fit(
                    {
                        "parametrization": form,
                        "reward_temperature_start": 1e-30,
                        "reward_temperature_end": 1e-30,
                    }
                ),
                sane,
            )
        )  # noqa: E501
    for steps in (0, -1, 2.5):

        def run(folder: Path, steps=steps):
            return gflownet().fit(world().train_prompts[:2], steps=steps, progress=False)

        cases.append(
            Case(f"fit steps={steps}", run, (lambda r, _: r == []) if steps == 0 else None)
        )
    for label, prompts in {"no prompts": [], "prompts a str": "a b", "one empty": [""]}.items():
        cases.append(
            Case(
                f"fit {label}",
                lambda _, p=prompts: gflownet().fit(p, steps=1, progress=False),
                None,
            )
        )  # noqa: E501

    def save_into(make: Callable[[Path], None]) -> Callable[[Path], Any]:
        def run(folder: Path):
            make(folder)
            return gflownet(parametrization="residual").save(folder)

        return run

    cases += [
        Case("save into a folder of user files", save_into(lambda f: None), None),
        Case(
            "save over an earlier save with user files",
            save_into(lambda f: gflownet(parametrization="residual").save(f / "x") and None),
            None,
        ),  # noqa: E501
        Case("save into a file path", lambda f: gflownet().save(f / "notes.txt"), None),
        Case("save under a file", lambda f: gflownet().save(f / "notes.txt" / "x"), None),
    ]

    def resave(folder: Path):
        sampler = gflownet(parametrization="residual")
        sampler.save(folder / "s")
        _plant(folder / "s")
        sampler.save(folder / "s")
        return folder / "s"

    def kept(result, folder: Path) -> bool:
        return all((result / n).read_text() == t for n, t in USER_FILES.items())

    cases.append(Case("save twice with user files inside", resave, kept))

    def checkpoint_over_user(folder: Path):
        prompts = world().train_prompts[:4]
        gflownet().fit(prompts, steps=2, checkpoint_dir=folder / "ck", progress=False)
        _plant(folder / "ck" / "step_0000002")
        gflownet().fit(prompts, steps=3, checkpoint_dir=folder / "ck", resume=True, progress=False)  # noqa: E501
        return folder / "ck" / "step_0000002"

    cases.append(Case("resume with user files in an old checkpoint", checkpoint_over_user, kept))
    return cases


def data_cases() -> list[Case]:
    from selfplay.pairs import load_pairs

    def rows(text: str | bytes, suffix: str = ".jsonl", split: str = "train"):
        def run(folder: Path):
            path = folder / f"data{suffix}"
            path.write_bytes(text.encode() if isinstance(text, str) else text)
            return load_pairs(path, split=split)

        return run

    good = '{"prompt": "a b", "response": "c d"}\n' * 3
    ok = lambda r, _: len(r) == 3  # noqa: E731
    inputs: dict[str, tuple[Any, Any]] = {
        "good jsonl": (rows(good), ok),
        "good jsonl split test": (rows(good, split="test"), None),
        "good jsonl split bogus": (rows(good, split="bogus"), None),
        "non-utf8 value": (rows(b'{"prompt": "a \xff", "response": "c"}\n'), None),
        "latin-1 file": (rows('{"prompt": "caf\xe9", "response": "c"}\n'.encode("latin-1")), None),  # noqa: E501
        "utf-8 BOM": (rows(b"\xef\xbb\xbf" + good.encode()), lambda r, _: r[0]["prompt"] == "a b"),
        "utf-16": (rows(good.encode("utf-16")), None),
        "empty file": (rows(""), None),
        "blank lines only": (rows("\n\n\n"), None),
        "truncated line": (rows(good + '{"prompt": "a'), None),
        "missing column": (rows('{"prompt": "a b"}\n'), None),
        "null prompt": (rows('{"prompt": null, "response": "c"}\n'), None),
        "number prompt": (rows('{"prompt": 5, "response": "c"}\n'), None),
        "list prompt": (rows('{"prompt": ["a"], "response": "c"}\n'), None),
        "empty prompt": (rows('{"prompt": "", "response": "c"}\n'), None),
        "whitespace prompt": (rows('{"prompt": "  ", "response": "c"}\n'), None),
        "empty response": (rows('{"prompt": "a", "response": ""}\n' * 3), ok),
        "columnar json": (rows('{"prompt": ["a"], "response": ["b"]}', ".json"), None),
        "json list": (rows(json.dumps([{"prompt": "a b", "response": "c"}] * 3), ".json"), ok),
        "csv": (rows("prompt,response\na b,c\na b,c\na b,c\n", ".csv"), ok),
        "csv non-utf8": (rows(b"prompt,response\na \xff,c\n", ".csv"), None),
        "parquet garbage": (rows(b"PAR1garbagePAR1", ".parquet"), None),
        "arrow garbage": (rows(b"\x00" * 64, ".arrow"), None),
        "txt suffix": (rows(good, ".txt"), None),
        # read as text here; the trainer refuses it when it tokenizes (docs/errors.md row 63)
        "special tokens": (rows('{"prompt": "a [EOS]", "response": "c"}\n' * 3), ok),
        "CRLF lines": (rows(good.replace("\n", "\r\n")), ok),
    }
    cases = [Case(f"dataset {k}", r, c) for k, (r, c) in inputs.items()]
    cases.append(Case("dataset missing path", lambda f: load_pairs(f / "nope.jsonl"), None))
    cases.append(Case("dataset a folder of user files", lambda f: load_pairs(f), None))
    return cases


def run_folder_cases() -> list[Case]:
    """Damage one file of a finished α-SPIN run folder, then run it one iteration further."""
    from selfplay import AlphaSpinConfig, AlphaSpinTrainer

    run_kwargs = {"max_examples": 32, "batch_size": 16, "progress": False, "alpha": 1.0}
    cache: dict[str, Path] = {}

    def finished(folder: Path) -> Path:
        if "run" not in cache:
            base = Path(tempfile.mkdtemp(prefix="fuzz_run_", dir=os.environ["FUZZ_ROOT"]))
            config = AlphaSpinConfig(output_dir=str(base / "run"), iterations=1, **run_kwargs)
            AlphaSpinTrainer(config, world=world(), evaluate=lambda p: {}).train()
            cache["run"] = base / "run"
        shutil.copytree(cache["run"], folder / "run", dirs_exist_ok=True)
        for name in (".gfn-spin.lock",):
            (folder / "run" / name).unlink(missing_ok=True)
        return folder / "run"

    def edit_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
        def damage(run: Path) -> None:
            path = run / name
            path.write_text(json.dumps(change(json.loads(path.read_text()))))

        return damage

    def zero_iterate(run: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = next((run / "iterates" / "iter_1").rglob("*.safetensors"))
        save_file({k: torch.zeros_like(v) for k, v in load_file(path).items()}, path)

    damages: dict[str, tuple[Callable[[Path], None], bool]] = {
        "nothing": (lambda r: None, True),
        "metrics step 999": (
            edit_json("metrics.json", lambda v: [{**r, "iteration": 999} for r in v]),
            True,
        ),  # noqa: E501
        "metrics not json": (lambda r: (r / "metrics.json").write_text("{"), True),
        "manifest not json": (lambda r: (r / "manifest.json").write_text("{"), False),
        "manifest done a string": (
            edit_json("manifest.json", lambda v: {**v, "done": "all"}),
            False,
        ),  # noqa: E501
        "manifest extra done step": (
            edit_json(
                "manifest.json", lambda v: {**v, "done": [*v["done"], "train_iter_2", "data_1"]}
            ),
            False,
        ),  # noqa: E501
        "manifest hash edited": (
            edit_json(
                "manifest.json",
                lambda v: {
                    **v,
                    "content_sha256": {k: "0" * 64 for k in v.get("content_sha256", {})},
                },
            ),
            False,
        ),  # noqa: E501
        "manifest identity changed": (
            edit_json(
                "manifest.json", lambda v: {**v, "identity": {**v["identity"], "data_sha256": "x"}}
            ),
            False,
        ),  # noqa: E501
        "iterate zeroed": (zero_iterate, False),
        "iterate removed": (lambda r: shutil.rmtree(r / "iterates" / "iter_1"), False),
        "parquet truncated": (
            lambda r: (r / "data" / "iteration_0.parquet").write_bytes(b"PAR1"),
            False,
        ),  # noqa: E501
        "parquet removed": (lambda r: (r / "data" / "iteration_0.parquet").unlink(), False),
        "marker another tool": (
            lambda r: (r / ".gfn-spin-run.json").write_text('{"tool": "x"}'),
            False,
        ),  # noqa: E501
        "user file in iterate": (lambda r: _plant(r / "iterates" / "iter_1"), True),
    }
    cases = []
    for label, (damage, ok) in damages.items():

        def run(folder: Path, damage=damage):
            run_dir = finished(folder)
            damage(run_dir)
            config = AlphaSpinConfig(output_dir=str(run_dir), iterations=2, **run_kwargs)
            return AlphaSpinTrainer(config, world=world(), evaluate=lambda p: {}).train()

        def right(records, folder: Path) -> bool:
            return [r["iteration"] for r in records] == [0, 1, 2]

        def worked(folder: Path) -> bool:
            return (folder / "run" / "iterates" / "iter_2").exists()

        cases.append(Case(f"α-SPIN resume {label}", run, right if ok else None, worked))
    return cases


def cli_cases() -> list[Case]:
    """Both command lines, run in-process through their real entry (one line per refusal)."""
    from experiments import geometric_mixture, train_alpha_spin
    from experiments.cli import run_command

    def command(main, argv: list[str], files: dict[str, bytes] | None = None):
        def run(folder: Path):
            for name, data in (files or {}).items():
                (folder / name).write_bytes(data)
            args = [a.replace("{F}", str(folder)) for a in argv]
            os.environ.pop("GFN_SPIN_DEBUG", None)
            run_command(main, args)

        return run

    geo = ["--quick", "--output-dir", "{F}/out", "--no-progress"]
    geo_bad = {
        "alphas 2": ["--alphas", "2"],
        "alphas nan": ["--alphas", "nan"],
        "alphas none": ["--alphas"],
        "alphas repeated": ["--alphas", "0.5", "0.5"],
        "max-new-tokens tiny world": ["--max-new-tokens", "1000000"],
        "prompts-file tiny world": ["--prompts-file", "{F}/notes.txt"],
        "world nonsense": ["--world", "nonsense=1"],
        "world num_heads=3": ["--world", "num_heads=3"],
        "world learning_rate=nan": ["--world", "learning_rate=nan"],
        "gflownet lr inf": ["--gflownet.learning-rate", "inf"],
        "gflownet lora-alpha 0": ["--gflownet.lora-alpha", "0"],
        "gflownet max-grad-norm nan": ["--gflownet.max-grad-norm", "nan"],
        "gflownet eval-every -1": ["--gflownet.eval-every", "-1"],
        "gflownet checkpoint-every -1": ["--gflownet.checkpoint-every", "-1"],
        "gflownet loss db": ["--gflownet.loss", "db"],
        "device gpu0": ["--device", "gpu0"],
        "device cuda:7": ["--device", "cuda:7"],
        "threads -1": ["--threads", "-1"],
        "resume without checkpoint-dir": ["--resume"],
        "checkpoint-dir with user files": ["--checkpoint-dir", "{F}"],
        "checkpoint-dir a file": ["--checkpoint-dir", "{F}/notes.txt"],
        "output-dir with user files": ["--output-dir", "{F}"],
        "output-dir a file": ["--output-dir", "{F}/notes.txt"],
        "model missing": ["--model", "{F}/nope", "--base", "{F}/nope"],
        "model only": ["--model", "{F}/nope"],
        "model a user folder": ["--model", "{F}/data", "--base", "{F}/data"],
        "onepass-steps -1": ["--onepass-steps", "-1"],
        "num-eval-prompts 0": ["--num-eval-prompts", "0"],
        "unknown flag": ["--bogus", "1"],
        "sir-candidates 0": ["--sir-candidates", "0"],
    }
    cases = [
        Case(f"geometric_mixture {k}", command(geometric_mixture.main, [*geo, *v]), None)
        for k, v in geo_bad.items()
    ]
    spin = [
        *("--output-dir", "{F}/run", "--max-examples", "32", "--batch-size", "16"),
        *("--no-progress", "--iterations", "1", "--gflownet.steps", "2"),
    ]
    spin_bad = {
        "learning-rate inf": ["--learning-rate", "inf"],
        "beta nan": ["--beta", "nan"],
        "alpha 2": ["--alpha", "2"],
        "iterations 0": ["--iterations", "0"],
        "gflownet lr inf": ["--sampler", "gflownet", "--gflownet.learning-rate", "inf"],
        "gflownet subtb-lambda nan": ["--sampler", "gflownet", "--gflownet.subtb-lambda", "nan"],
        "gflownet weight-decay nan": ["--sampler", "gflownet", "--gflownet.weight-decay", "nan"],
        "gflownet reward-temperature-start inf": [
            "--sampler",
            "gflownet",
            "--gflownet.reward-temperature-start",
            "inf",
        ],  # noqa: E501
        "gflownet lora-alpha nan": ["--sampler", "gflownet", "--gflownet.lora-alpha", "nan"],
        "gflownet max-new-tokens 40": ["--sampler", "gflownet", "--gflownet.max-new-tokens", "40"],
        "dataset-split test on jsonl": ["--dataset", "{F}/d.jsonl", "--dataset-split", "test"],
        "dataset non-utf8": ["--dataset", "{F}/bad.jsonl"],
        "dataset missing": ["--dataset", "{F}/none.jsonl"],
        "dataset empty": ["--dataset", "{F}/empty.jsonl"],
        "device gpu0": ["--device", "gpu0"],
        "output-dir with user files": ["--output-dir", "{F}"],
        "max-new-tokens 100000": ["--max-new-tokens", "100000"],
        "sampler bogus": ["--sampler", "bogus"],
    }
    files = {
        "d.jsonl": b'{"prompt": "a b", "response": "c d"}\n' * 8,
        "bad.jsonl": b'{"prompt": "a \xff", "response": "c"}\n',
        "empty.jsonl": b"",
    }
    for k, v in spin_bad.items():
        case = Case(
            f"train_alpha_spin {k}", command(train_alpha_spin.main, [*spin, *v], files), None
        )  # noqa: E501
        case.worked = lambda f: (f / "run" / "iterates" / "iter_1").exists()
        cases.append(case)
    return cases


def subprocess_cases() -> list[Case]:
    """The real ``python -m`` entries under ``timeout``: refusals, and reruns of a finished run
    on the same folder after a user put files inside the folders it wrote."""
    import subprocess

    def command(module: str, argv: list[str], expect_ok: bool) -> Callable[[Path], Any]:
        def run(folder: Path):
            args = [a.replace("{F}", str(folder)) for a in argv]
            done = subprocess.run(
                ["timeout", "900", sys.executable, "-m", module, *args],
                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"},
            )  # fmt: skip
            if done.returncode == 0:
                return done
            sys.stderr.write(done.stderr)
            raise SystemExit(done.returncode)

        return run

    def rerun(module: str, argv: list[str], inside: str) -> Callable[[Path], Any]:
        first = command(module, argv, True)

        def run(folder: Path):
            first(folder)
            _plant(folder / inside)
            return first(folder)

        return run

    geo = ["--quick", "--no-progress", "--output-dir", "{F}/out"]
    spin = [
        *("--output-dir", "{F}/run", "--max-examples", "32", "--batch-size", "16"),
        *("--no-progress", "--iterations", "1"),
    ]
    ok = lambda done, _: done is not None and done.returncode == 0  # noqa: E731
    return [
        Case(
            "python -m geometric_mixture alphas 2",
            command("experiments.geometric_mixture", [*geo, "--alphas", "2"], False),
        ),  # noqa: E501
        Case(
            "python -m train_alpha_spin beta nan",
            command("experiments.train_alpha_spin", [*spin, "--beta", "nan"], False),
        ),  # noqa: E501
        Case(
            "python -m train_alpha_spin gflownet lr inf",
            command(
                "experiments.train_alpha_spin",
                [*spin, "--sampler", "gflownet", "--gflownet.learning-rate", "inf"],
                False,
            ),
        ),  # noqa: E501
        Case(
            "python -m geometric_mixture rerun, user file in its adapter folder",
            rerun(
                "experiments.geometric_mixture",
                [*geo, "--checkpoint-dir", "{F}/ck", "--resume"],
                "out/gflownet_alpha_0_5",
            ),
            ok,
        ),  # noqa: E501
        Case(
            "python -m train_alpha_spin rerun, user file in its iterate",
            rerun("experiments.train_alpha_spin", spin, "run/iterates/iter_1"),
            ok,
        ),  # noqa: E501
    ]


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the cases whose name holds this text")
    parser.add_argument("--output", default=None, help="also write the counts and cases as JSON")
    parser.add_argument("--show", action="store_true", help="print every case, not only bad ones")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cases = [
        *config_cases(),
        *prompt_cases(),
        *adapter_cases(),
        *data_cases(),
        *fit_cases(),
        *checkpoint_cases(),
        *run_folder_cases(),
        *cli_cases(),
        *subprocess_cases(),
    ]
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    root = Path(tempfile.mkdtemp(prefix="gfn_fuzz_"))
    os.environ["FUZZ_ROOT"] = str(root)  # the shared finished α-SPIN run goes there too
    counts: Counter[str] = Counter()
    rows = []
    started = time.perf_counter()
    for case in cases:
        outcome, detail = classify(case, root)
        counts[outcome] += 1
        rows.append({"case": case.name, "outcome": outcome, "detail": detail})
        if args.show or outcome not in ("clear early error", "correct"):
            print(f"{outcome:18s} {case.name}: {detail}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    summary = {o: counts[o] for o in OUTCOMES}
    print(
        json.dumps(
            {"cases": len(cases), "seconds": round(time.perf_counter() - started), **summary}
        )
    )  # noqa: E501
    if args.output:
        Path(args.output).write_text(json.dumps({"counts": summary, "cases": rows}, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
