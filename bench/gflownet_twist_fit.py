"""Twist GFlowNet fit at a real vocabulary size: resident memory over the fit, a step's cost.

For checking that nothing a fit keeps across steps scales with L × vocab (docs/gflownet.md):
the target is the geometric mixture of two Llama-shaped LMs with random weights and a
vocabulary of 49,152 (SmolLM2's), the sampler the twist form with its default buffer of
stored batches. Printed, as ratios:

- resident memory: the peak resident set size over the last ``--window`` steps over the peak
  over the ``--window`` steps after step ``--first`` (the buffer fills over the first
  ``twist_buffer`` steps, so a buffer whose batches scale with the vocabulary shows here), and
  the resident size between steps (freed memory returned first) at the last step over that at
  step ``--first``. Peaks are compared with peaks: a step's own transient tensors (the fresh
  batch's vocabulary-sized scores) are in both windows;
- a training step's time (median over the steps after ``--first``) over the time of one
  sampling pass of the local product on the same batch (same prompts, rows and length cap;
  median of ``--repeats``);
- a checkpoint's size over its trainable weights' file.

    python -m bench.gflownet_twist_fit                  # vocab 49,152, 2 layers x 64, 100 steps
    python -m bench.gflownet_twist_fit --world smollm2  # SmolLM2-135M-Instruct and its style pair

With ``--world smollm2`` the target is the real-model world's style pair (worlds.smollm: the
base and its style adapter, α = ``--alpha``), the prompts its first ``--prompts`` training
tasks encoded with the chat template, the head and batch the real-model preset's
(experiments.real_model.real_model_gflownet); ``--width``, ``--layers``, ``--heads``,
``--vocab`` and ``--prompt-tokens`` do not apply.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._timing import emit
from bench.gflownet_step import random_mixture, random_prompts, status_bytes
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.samples import ancestral_sample
from samplers import GFlowNetSampler


def _reset_peak() -> int:
    """Return freed memory to the system, reset the peak RSS (VmHWM) to the current RSS, and
    return that RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return status_bytes("VmRSS")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--world",
        choices=("random", "smollm2"),
        default="random",
        help="random: two random Llama-shaped LMs of --vocab/--width/--layers/--heads; "
        "smollm2: the real-model world's style pair (random)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adafactor"),
        default="adamw",
        help="the fit's optimizer (GFlowNetConfig.optimizer; adamw)",
    )
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (49152)")
    parser.add_argument("--width", type=int, default=64, help="hidden size (64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (4)")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt (4)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (16)")
    parser.add_argument("--new-tokens", type=int, default=16, help="length cap L (16)")
    parser.add_argument("--alpha", type=float, default=0.5, help="target weight α (0.5)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (100)")
    parser.add_argument("--first", type=int, default=10, help="step memory is compared to (10)")
    parser.add_argument("--window", type=int, default=10, help="steps per peak window (10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed sampling passes (5)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1)")
    args = parser.parse_args(argv)
    args.device = "cpu"  # resident memory is a CPU figure
    torch.set_num_threads(args.threads)
    if not (0 < args.first and args.window > 0 and args.first + 2 * args.window <= args.steps):
        parser.error("need 0 < --first and --first + 2 x --window <= --steps")
    return args


def setting(args: argparse.Namespace) -> tuple[GeometricMixture, list[list[int]], dict]:
    """The target, the prompts (token ids) and the sampler's settings of ``args.world``."""
    batch = {
        "max_new_tokens": args.new_tokens,
        "prompts_per_step": args.prompts,
        "samples_per_prompt": args.samples,
        "explore_prob": 0.0,
        "replay_prob": 0.0,
        "seed": 0,
        "optimizer": args.optimizer,
    }
    if args.world == "random":
        return random_mixture(args), random_prompts(args), batch | {"parametrization": "twist"}
    # Not at module level: the real-model world needs its optional wheel.
    from experiments.real_model import real_model_gflownet
    from worlds.smollm import build_world

    world = build_world()
    base, other = world.pairs["style"]
    target = GeometricMixture([base, other], [1 - args.alpha, args.alpha])
    prompts = base.encode_prompts(world.train_prompts[: args.prompts])
    preset = {
        name: getattr(real_model_gflownet(), name)
        for name in ("twist_width", "twist_depth", "twist_updates", "twist_buffer")
    }
    return target, prompts, batch | preset | {"parametrization": "twist"}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    target, prompts, settings = setting(args)
    sampler = GFlowNetSampler(target, target.components[1], **settings)
    seconds, rss = [], {}
    last_window = args.steps - args.window
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        sampler.train_step(prompts)
        seconds.append(time.perf_counter() - start)
        if step == args.first:
            rss["first"] = _reset_peak()
        elif step == args.first + args.window:
            rss["first_peak"] = status_bytes("VmHWM")
        if step == last_window:
            _reset_peak()
    rss["last_peak"] = status_bytes("VmHWM")
    rss["last"] = _reset_peak()

    local = target.local_product()
    generator = torch.Generator().manual_seed(0)
    sampling = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            ancestral_sample(
                local, prompts, args.samples, max_new_tokens=args.new_tokens, generator=generator
            )
        sampling.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        folder = sampler.save_checkpoint(Path(tmp) / "fit")
        sizes = {path.name: path.stat().st_size for path in folder.iterdir()}
    weights = sizes[sampler.weights.weights_file]

    step_time = statistics.median(seconds[args.first :])
    figures = {
        "peak_rss_growth": rss["last_peak"] / rss["first_peak"] - 1,
        "rss_growth": rss["last"] / rss["first"] - 1,
        "step_over_sampling": step_time / statistics.median(sampling),
        "checkpoint_over_weights": sum(sizes.values()) / weights,
    }
    model = (
        "SmolLM2-135M-Instruct style pair"
        if args.world == "smollm2"
        else (f"{args.layers} layers x {args.width}")
    )
    print(
        f"twist GFlowNet fit ({args.optimizer}), vocab {target.vocab_size}, {model}, α = "
        f"{args.alpha}, batch "
        f"{args.prompts} x {args.samples}, L = {args.new_tokens}, {args.steps} steps"
    )
    print(
        f"peak RSS over steps {last_window + 1}-{args.steps}: {rss['last_peak'] / 2**20:.0f} "
        f"MiB, {figures['peak_rss_growth']:+.1%} over steps {args.first + 1}-"
        f"{args.first + args.window} ({rss['first_peak'] / 2**20:.0f} MiB); RSS between steps "
        f"{rss['last'] / 2**20:.0f} MiB at step {args.steps}, {figures['rss_growth']:+.1%} over "
        f"step {args.first} ({rss['first'] / 2**20:.0f} MiB)"
    )
    print(
        f"step {step_time * 1e3:.0f} ms (median of {len(seconds) - args.first}) = "
        f"{figures['step_over_sampling']:.2f}x one local-product sampling pass of the batch"
    )
    print(
        f"checkpoint {sum(sizes.values()) / 2**20:.1f} MiB = "
        f"{figures['checkpoint_over_weights']:.2f}x its trainable weights ({weights / 2**20:.1f} "
        f"MiB); files {sizes}"
    )
    emit(
        "gflownet_twist_fit", world=args.world, vocab=target.vocab_size, steps=args.steps, **figures
    )
    return figures


if __name__ == "__main__":
    main()
