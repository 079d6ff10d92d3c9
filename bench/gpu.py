"""Every bench on a lent CUDA device within a time budget, one JSON line per figure.

Runs each bench script as its own subprocess (a crash or a timeout in one does not lose the
others' figures) at GPU sizes (a 124M-parameter, GPT-2-sized model, batch 64,
prompt 16, 64 new tokens, LoRA r = 16, bf16 weights; sampling at batch 256), and prints the
JSON lines they emit, each tagged with the bench's name, then one summary line. Every figure is
a ratio measured within one process (baseline and candidate interleaved on the same card).

    python -m bench.gpu                        # on the lent machine (CUDA)
    python -m bench.gpu --device cpu --quick   # smoke test of every code path, tiny sizes, CPU

Budget: each bench has its own timeout (in :func:`plan`; the sampling
bench's includes the static cache's compilation on its first call), and the whole run stops
starting new benches after ``--budget`` seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

MODEL_124M = ["--layers", "12", "--width", "768", "--vocab", "50257"]


def plan(device: str, quick: bool) -> list[tuple[str, list[str], int]]:
    """(module, arguments, timeout in seconds) of each bench."""
    dev = ["--device", device]
    if quick:
        return [
            ("bench.subtb_loss", [*dev, "--lengths", "16", "--repeats", "3"], 120),
            (
                "bench.gflownet_step",
                [*dev, "--new-tokens", "8", "--prompts", "4", "--samples", "2"]
                + ["--width", "64", "--layers", "1", "--heads", "2", "--vocab", "256"]
                + ["--repeats", "1"],
                300,
            ),
            (
                "bench.sampling",
                [*dev, "--batch", "8", "--new-tokens", "8", "--repeats", "1", "--static", "on"],
                300,
            ),
            (
                "bench.cost_per_sample",
                [*dev, "--prompts", "2", "--draws", "8", "--gfn-steps", "5"],
                300,
            ),
            ("bench.enumeration", [*dev, "--max-new-tokens", "4"], 300),
            ("bench.alpha_spin_iteration", [*dev, "--max-examples", "64"], 300),
        ]
    return [
        ("bench.subtb_loss", [*dev, "--lengths", "16", "64", "256", "--repeats", "50"], 120),
        (
            "bench.gflownet_step",
            [*dev, *MODEL_124M, "--heads", "12", "--new-tokens", "64", "--prompts", "16"]
            + ["--samples", "4", "--lora-rank", "16", "--repeats", "3"],
            240,
        ),
        (
            "bench.sampling",
            [*dev, *MODEL_124M, "--batch", "256", "--new-tokens", "64", "--repeats", "3"],
            180,
        ),
        ("bench.cost_per_sample", [*dev, "--gfn-steps", "300"], 120),
        ("bench.enumeration", [*dev, "--max-new-tokens", "7", "8", "9"], 120),
        ("bench.alpha_spin_iteration", dev, 120),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--budget", type=float, default=300, help="seconds before no new bench")
    parser.add_argument("--only", nargs="+", help="run only these benches (e.g. sampling)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --quick")
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else "cpu"
    )
    print(json.dumps({"figure": "device", "device": args.device, "name": device_name}), flush=True)

    started = time.perf_counter()
    failures, figures = [], 0
    for module, bench_args, timeout in plan(args.device, args.quick):
        name = module.split(".")[-1]
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - started > args.budget:
            print(json.dumps({"figure": "skipped", "bench": name, "reason": "budget"}), flush=True)
            failures.append(name)
            continue
        bench_started = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, "-m", module, *bench_args],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            lines, rc, tail = out.stdout.splitlines(), out.returncode, out.stderr[-2000:]
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout or b""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            lines, rc, tail = stdout.splitlines(), "timeout", f"after {timeout} s"
        for line in lines:
            if line.startswith("{"):
                record = json.loads(line)
                print(json.dumps({"bench": name, **record}), flush=True)
                figures += 1
        seconds = time.perf_counter() - bench_started
        if rc != 0:
            failures.append(name)
            print(
                json.dumps({"figure": "failed", "bench": name, "rc": rc, "stderr_tail": tail}),
                flush=True,
            )
        print(json.dumps({"figure": "bench_seconds", "bench": name, "value": seconds}), flush=True)
    total = time.perf_counter() - started
    print(
        json.dumps({"figure": "summary", "seconds": total, "figures": figures, "failed": failures}),
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
