"""Time the vectorized modified SubTB loss against a loop over sub-trajectory lengths.

The loop version is the published form (one Python iteration per
sub-trajectory length, all start positions at once, "batch" weighting),
written here from the formula of DESIGN §4. Both get the same random batch;
their values must agree to --rtol before any time is reported.

    python bench/subtb_loss.py                 # batch 64, L in {16, 64, 256}, CPU
    python bench/subtb_loss.py --device cuda --lengths 64

Prints a table, the speedups, and one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch

from objectives.subtb import modified_subtb_loss


def loop_over_lengths_subtb(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
) -> torch.Tensor:
    """Reference: "batch"-weighted modified SubTB, one Python iteration per length d = j - i."""
    cap = log_pf.shape[1]
    log_flow = log_reward - log_pterm  # [B, L+1]
    cumulative = torch.cat([log_pf.new_zeros(log_pf.shape[0], 1), log_pf.cumsum(dim=1)], dim=1)
    positions = torch.arange(cap + 1, device=log_pf.device)
    numerator = log_pf.new_zeros(())
    denominator = log_pf.new_zeros(())
    for d in range(1, cap + 1):
        # Start positions i = 0..L-d, end positions j = i + d.
        residuals = log_flow[:, :-d] + cumulative[:, d:] - cumulative[:, :-d] - log_flow[:, d:]
        valid = (positions[d:].unsqueeze(0) <= lengths.unsqueeze(1)).to(log_pf.dtype)
        weight = subtb_lambda ** (d - 1)
        numerator = numerator + weight * (residuals.square() * valid).sum()
        denominator = denominator + weight * valid.sum()
    return numerator / denominator.clamp_min(1.0)


def random_batch(batch: int, cap: int, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cap + 1, (batch,), generator=gen)
    lengths[0] = cap
    positions = torch.arange(cap + 1)
    state_valid = positions.unsqueeze(0) <= lengths.unsqueeze(1)
    log_pf = torch.where(state_valid[:, 1:], -3 * torch.rand(batch, cap, generator=gen), 0.0)
    log_pterm = torch.where(state_valid, -3 * torch.rand(batch, cap + 1, generator=gen), 0.0)
    log_pterm[:, cap] = 0.0
    log_reward = torch.where(state_valid, -torch.rand(batch, cap + 1, generator=gen).cumsum(1), 0.0)
    return [t.to(device) for t in (log_pf, log_pterm, log_reward, lengths)]


def time_interleaved_ms(
    functions: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median wall time in ms of each function, timed round-robin so that load from
    other processes on a shared machine hits every contender alike."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in functions.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(times)[len(times) // 2] for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="trajectories per batch (64)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[16, 64, 256], help="length caps L to time"
    )
    parser.add_argument("--subtb-lambda", type=float, default=1.0, help="λ (1.0, the LM recipe)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats; median kept")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="value agreement required")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows = []
    for cap in args.lengths:
        log_pf, log_pterm, log_reward, lengths = random_batch(args.batch, cap, device, args.seed)
        log_pf.requires_grad_(True)
        log_pterm.requires_grad_(True)
        inputs = (log_pf, log_pterm, log_reward, lengths)
        implementations = {
            "vectorized": partial(modified_subtb_loss, *inputs, subtb_lambda=args.subtb_lambda),
            "loop": partial(loop_over_lengths_subtb, *inputs, subtb_lambda=args.subtb_lambda),
        }
        values = {name: fn().item() for name, fn in implementations.items()}
        relative_gap = abs(values["vectorized"] - values["loop"]) / abs(values["loop"])
        if relative_gap > args.rtol:
            raise SystemExit(f"L={cap}: values differ by {relative_gap:.2e} relative: {values}")
        row = {"L": cap, "batch": args.batch, "value": values["vectorized"]}
        timed = {}
        for name, fn in implementations.items():

            def forward(fn=fn):
                with torch.no_grad():
                    fn()

            def forward_backward(fn=fn, wrt=(log_pf, log_pterm)):
                torch.autograd.grad(fn(), wrt)

            timed[f"{name}_fwd_ms"] = forward
            timed[f"{name}_fwd_bwd_ms"] = forward_backward
        row.update(time_interleaved_ms(timed, device, args.repeats))
        row["speedup_fwd"] = row["loop_fwd_ms"] / row["vectorized_fwd_ms"]
        row["speedup_fwd_bwd"] = row["loop_fwd_bwd_ms"] / row["vectorized_fwd_bwd_ms"]
        row["relative_gap"] = relative_gap
        rows.append(row)

    print(
        f"modified SubTB loss, batch {args.batch}, λ = {args.subtb_lambda}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    header = f"{'L':>5} {'loop fwd':>10} {'vec fwd':>10} {'x':>6} {'loop f+b':>10} {'vec f+b':>10} {'x':>6}"
    print(header + "   (ms, median)")
    for row in rows:
        print(
            f"{row['L']:>5} {row['loop_fwd_ms']:>10.3f} {row['vectorized_fwd_ms']:>10.3f} "
            f"{row['speedup_fwd']:>6.1f} {row['loop_fwd_bwd_ms']:>10.3f} "
            f"{row['vectorized_fwd_bwd_ms']:>10.3f} {row['speedup_fwd_bwd']:>6.1f}"
        )
    for row in rows:
        for figure in (
            "loop_fwd_ms",
            "vectorized_fwd_ms",
            "loop_fwd_bwd_ms",
            "vectorized_fwd_bwd_ms",
            "speedup_fwd",
            "speedup_fwd_bwd",
        ):
            print(
                json.dumps(
                    {
                        "bench": "subtb_loss",
                        "device": str(device),
                        "batch": row["batch"],
                        "L": row["L"],
                        "subtb_lambda": args.subtb_lambda,
                        "threads": torch.get_num_threads(),
                        "figure": figure,
                        "value": round(row[figure], 4),
                    }
                )
            )


if __name__ == "__main__":
    main()
