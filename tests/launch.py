"""Run a test script as two CPU processes under ``accelerate launch``, and as one process.

For the data-parallel tests: each script writes ``OUTPUT_DIR/rank{r}.pt``; the caller compares
the two ranks with each other and with the single process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# accelerate's --cpu launcher needs MPI for several processes; --multi_gpu uses torchrun, and
# the trainers ask accelerate for gloo on CPU.
LAUNCH = [
    "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no",
]  # fmt: skip


def run_two_and_one(
    script: Path, cache: str, config: str, out: Path, *, port: int, timeout: int
) -> tuple[Path, Path]:
    """Run ``script CACHE OUTPUT_DIR CONFIG_JSON`` on two processes into ``out/dp`` and on one
    into ``out/single``; returns the two folders. Every process uses one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dp, single = out / "dp", out / "single"
    two = [*LAUNCH, "--main_process_port", str(port), str(script), cache, str(dp), config]
    one = [sys.executable, str(script), cache, str(single), config]
    for command in (two, one):
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=timeout)
    return dp, single
