"""Exact enumeration throughput (responses per second) on the tiny world's base policy.

Target (issue 2): >= 100k responses per prompt in <= 10 s on the 2-core CPU. Also times the
naive alternative on a sample of responses, one full teacher-forced pass per response batch,
to show what the cached prefix-tree expansion saves.

    python -m bench.enumeration --max-new-tokens 9
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._timing import emit
from gfn_spin.exact import exact_distribution
from worlds.toy import build_world


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        nargs="+",
        default=[7, 8, 9],
        help="length caps to enumerate (default: 7 8 9)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8192, help="prefixes per forward step (default: 8192)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.device == "cpu" or args.threads is not None:
        # 1 thread: on a shared 2-core machine, 2-thread regions stall on the neighbours' jobs.
        torch.set_num_threads(args.threads or 1)

    world = build_world(device=args.device)
    prompt = world.eval_prompts[0]
    exact_distribution(world.base, prompt, 4)  # warm up kernels and allocator
    for cap in args.max_new_tokens:
        start = time.perf_counter()
        dist = exact_distribution(
            world.base, prompt, cap, batch_size=args.batch_size, max_responses=10**7
        )
        seconds = time.perf_counter() - start
        # The naive way: score every response with one full teacher-forced pass (timed on a
        # slice and extrapolated, since the full run is the slow thing being avoided).
        sample = dist.responses[-4096:]
        ids = torch.zeros(len(sample), cap, dtype=torch.long)
        for i, r in enumerate(sample):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in sample])
        naive_start = time.perf_counter()
        with torch.no_grad():
            world.base.log_prob(
                [prompt] * len(sample), ids.to(args.device), lengths.to(args.device)
            )
        naive = (time.perf_counter() - naive_start) * len(dist.responses) / len(sample)
        rate = len(dist.responses) / seconds
        print(
            f"L={cap}: {len(dist.responses):>9,} responses in {seconds:6.2f} s "
            f"({rate:,.0f}/s); full-pass scoring would take ~{naive:.2f} s "
            f"({naive / seconds:.1f}x slower)"
        )
        emit(
            "enumeration",
            max_new_tokens=cap,
            responses=len(dist.responses),
            seconds=seconds,
            responses_per_s=rate,
            naive_ratio=naive / seconds,
        )


if __name__ == "__main__":
    main()
