"""Kill-and-resume: a run SIGKILLed at a random point mid-iteration and restarted with the same
command ends with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).with_name("run_alpha_spin.py")

CONFIG = {
    "alpha": 0.8,
    "history": 2,
    "sampler": "importance",
    "num_candidates": 4,
    "iterations": 3,
    "max_examples": 64,
    "batch_size": 16,
    "epochs": 2,
    "generation_chunk": 16,
}


def command(script: Path, cache: Path, out: Path) -> list[str]:
    return [sys.executable, str(script), str(cache), str(out), json.dumps(CONFIG)]


def final_metrics(out: Path) -> list[dict]:
    return [r["metrics"] for r in json.loads((out / "manifest.json").read_text())["records"]]


def done_steps(out: Path) -> list[str]:
    try:
        return json.loads((out / "manifest.json").read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigkill_then_resume_matches_uninterrupted(world, tmp_path):
    script = SCRIPT
    cache = world.directory.parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    reference = tmp_path / "reference"
    started = time.time()
    subprocess.run(command(script, cache, reference), check=True, env=env, capture_output=True)
    duration = time.time() - started
    expected = final_metrics(reference)
    assert len(expected) == CONFIG["iterations"] + 1

    rng = random.Random(os.environ.get("KILL_SEED", "0"))
    out = tmp_path / "killed"
    # Kill once the iterations are under way (the base is evaluated), after a random delay
    # within the run's remaining time, so it lands in generation, training or saving.
    proc = subprocess.Popen(command(script, cache, out), env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while "eval_0" not in done_steps(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5 * duration))
    killed_mid_run = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_at_kill = done_steps(out)
    subprocess.run(command(script, cache, out), check=True, env=env, capture_output=True)
    assert final_metrics(out) == expected, f"killed after steps {steps_at_kill}"
    assert killed_mid_run, "the run finished before the kill; the test did not interrupt it"
    assert not list(out.glob("**/*.tmp"))
