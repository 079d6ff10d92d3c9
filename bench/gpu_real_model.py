"""The real model on a lent device, in one run: sampling and fit benches against HF ``generate``,
then the real-model job's full setting. One JSON line per figure; nothing depends on it.

    python -m bench.gpu_real_model                        # on the lent machine (CUDA, SmolLM2)
    python -m bench.gpu_real_model --device cpu --tiny    # smoke test of every path, CPU

Figures, each a ratio of two timings made in this process on the same device and batch:

- ``real_sampling``: tokens/s of our ancestral sampler against ``model.generate`` of the same
  model (the world's base) on the same batch of chat prompts (cropped from the left to one
  length, so the assistant header stays), EOS masked so every row makes ``--new-tokens``
  (:func:`bench.sampling.sampling_rates`); on CUDA also HF's static cache;
- ``real_fit_step``: one twist-GFlowNet training step on the α = 0.5 target of the world's
  stress pair, against one local-product sampling pass of the same batch (the issue's bound is
  3x) and against HF ``generate`` of one model on it; on CUDA, the step's peak memory;
- ``real_model_job``: ``python -m experiments.real_model --full`` (``--world tiny`` and tiny
  budgets with ``--tiny``) in a subprocess, under what is left of ``--budget``; its tables are
  printed and its results.json summarized.

The world is built first when it is not in ``$GFN_SPIN_CACHE`` (counted in the budget).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._timing import emit
from bench.sampling import round_robin, sampling_rates
from experiments.real_model import RealModelConfig, open_world
from gfn_spin import adapters
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.samples import ancestral_sample
from samplers.gflownet import GFlowNetSampler

#: The job's flags with ``--tiny`` (seconds on a CPU).
TINY_JOB = [
    "--world", "tiny", "--alphas", "0.5", "--max-new-tokens", "4", "--fit-prompts", "1",
    "--new-prompts", "1", "--reference-particles", "8", "--reference-runs", "2",
    "--particles", "4", "--runs", "2", "--draws", "4", "--gflownet.steps", "2",
]  # fmt: skip


def equal_length_prompts(world, tokenizer_of, batch: int) -> list[list[int]]:
    """``batch`` rows cycling over the world's encoded prompts, each cropped from the left to
    the shortest one's length (the end of a chat prompt, the assistant header, stays)."""
    encoded = tokenizer_of.encode_prompts(world.fit_prompts + world.new_prompts)
    length = min(len(ids) for ids in encoded)
    return [encoded[i % len(encoded)][-length:] for i in range(batch)]


def bench_sampling(world, args: argparse.Namespace) -> None:
    """Our sampler against HF generate on the base model and one batch."""
    base, _ = next(iter(world.pairs.values()))
    prompts = equal_length_prompts(world, base, args.batch)
    static = args.device.startswith("cuda")
    with adapters.route(base.model, None):  # HF generate reads the base weights, as ours does
        rate, first_call = sampling_rates(
            base.model, base.tokenizer, prompts, args.new_tokens, args.repeats, static
        )
    emit(
        "real_sampling",
        batch=args.batch,
        new_tokens=args.new_tokens,
        prompt_tokens=len(prompts[0]),
        distinct_prompts=len({tuple(p) for p in prompts}),
        ours_tokens_per_s=rate["ours"],
        hf_tokens_per_s=rate["hf_dynamic"],
        ratio_ours_over_hf=rate["ours"] / rate["hf_dynamic"],
        **({"hf_static_ratio": rate["hf_static"] / rate["hf_dynamic"]} if static else {}),
        first_call_s=first_call,
    )


def bench_fit_step(world, args: argparse.Namespace) -> None:
    """A twist-GFlowNet step against one local-product sampling pass and HF generate."""
    pair = "style" if "style" in world.pairs else next(iter(world.pairs))
    base, other = world.pairs[pair]
    target = GeometricMixture([base, other], [0.5, 0.5])
    config = RealModelConfig().gflownet
    sampler = GFlowNetSampler(
        target,
        other,
        config,
        max_new_tokens=args.new_tokens,
        prompts_per_step=args.fit_prompts,
        samples_per_prompt=args.fit_samples,
        adapter_name="bench_real",
    )
    prompt_ids = base.encode_prompts(world.fit_prompts[: args.fit_prompts])
    rows = [ids for ids in prompt_ids for _ in range(args.fit_samples)]
    local = target.local_product()

    def sample_pass() -> None:
        ancestral_sample(local, rows, 1, max_new_tokens=args.new_tokens, generator=0)

    def step() -> None:
        with torch.enable_grad():  # round_robin times under no_grad
            sampler.train_step(prompt_ids)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    medians, _ = round_robin({"step": step, "pass": sample_pass}, args.repeats, args.device)
    step_s, pass_s = medians["step"], medians["pass"]
    cropped = equal_length_prompts(world, base, len(rows))
    with adapters.route(base.model, None):
        rate, _ = sampling_rates(base.model, base.tokenizer, cropped, args.new_tokens, 1, False)
    hf_s = len(rows) * args.new_tokens / rate["hf_dynamic"]
    emit(
        "real_fit_step",
        pair=pair,
        batch=len(rows),
        new_tokens=args.new_tokens,
        step_s=step_s,
        local_product_pass_s=pass_s,
        ratio_step_over_pass=step_s / pass_s,
        hf_generate_one_model_s=hf_s,
        ratio_step_over_hf=step_s / hf_s,
        **(
            {"peak_memory_gb": (torch.cuda.max_memory_allocated() - before) / 2**30}
            if args.device.startswith("cuda")
            else {}
        ),
    )


def run_job(args: argparse.Namespace, seconds_left: float) -> None:
    """The real-model job in a subprocess, killed when the budget runs out."""
    output = Path(tempfile.mkdtemp(prefix="real_model_")) / "run"
    flags = TINY_JOB if args.tiny else ["--full"]
    command = [sys.executable, "-m", "experiments.real_model", *flags, "--device", args.device,
               "--output-dir", str(output), "--progress", "false"]  # fmt: skip
    started = time.perf_counter()
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=max(1, seconds_left))
        rc, stdout, tail = out.returncode, out.stdout, out.stderr[-2000:]
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else ""
        rc, tail = "timeout", f"after {seconds_left:.0f} s"
    print(stdout, flush=True)
    results = output / "results.json"
    summary = {}
    if results.is_file():
        saved = json.loads(results.read_text(encoding="utf-8"))
        summary = {"rows": len(saved["rows"]), "seconds": saved["seconds"]}
    emit("real_model_job", rc=rc, wall_s=time.perf_counter() - started, output=str(output),
         **summary, **({} if rc == 0 else {"stderr_tail": tail}))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny world, tiny sizes: a smoke test"
    )
    parser.add_argument("--budget", type=float, default=570, help="seconds for the whole run (570)")
    parser.add_argument("--batch", type=int, default=None, help="sampling batch (256; tiny 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (32; tiny 4)")
    parser.add_argument(
        "--fit-prompts", type=int, default=None, help="fit prompts/step (8; tiny 2)"
    )
    parser.add_argument("--fit-samples", type=int, default=None, help="draws/prompt (8; tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (3; tiny 1)")
    args = parser.parse_args(argv)
    for name, full, tiny in (("batch", 256, 8), ("new_tokens", 32, 4), ("fit_prompts", 8, 1),
                             ("fit_samples", 8, 2), ("repeats", 3, 1)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu --tiny")
    if args.device == "cpu":
        torch.set_num_threads(2)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    emit("device", device=args.device, name=name)
    config = RealModelConfig(world="tiny" if args.tiny else "smollm2", progress=False)
    world = open_world(config, torch.device(args.device))
    emit("world", world=config.world, seconds=world.build_seconds, pairs=list(world.pairs))
    bench_sampling(world, args)
    bench_fit_step(world, args)
    run_job(args, args.budget - (time.perf_counter() - started))
    emit("summary", seconds=time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
