"""Time the modified SubTB loss: the library's, the direct pair-tensor form, a Python loop.

Three implementations of the same number (docs/gflownet.md), on the same random batch:

- ``loop``: the published form, one Python iteration per sub-trajectory length d = j - i
  (all start positions at once), written here from the formula;
- ``pair``: the direct vectorized form, which builds the ``[B, L+1, L+1]`` tensor of
  residuals r_ij = A_i - A_j: the baseline the library's expansion is measured against;
- ``vectorized``: ``objectives.subtb.modified_subtb_loss``: the pair sum
  expanded into three ``[B, L+1] x [L+1, L+1]`` products on per-trajectory centred potentials,
  O(B·L) memory.

Before any time is reported, on float32 inputs of realistic size (potentials spread over
~50 nats, untrained and nearly balanced policies), the values must agree with a float64
reference to --rtol, and the gradients to --grad-rtol relative to the largest entry (or be no
worse than the float32 pair tensor's own gap, the floor set by rounding the potentials);
"geometric_within" and λ = 0.5 are checked too. Timings are medians of round-robin repeats (so load from other
processes hits every contender alike); the figures are the ratios.

    python -m bench.subtb_loss                 # batch 64, L in {16, 64, 256}, CPU
    python -m bench.subtb_loss --device cuda --lengths 64

Prints a table, the speedups, and one JSON line per figure.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from bench._timing import emit
from objectives.subtb import balance_potentials, modified_subtb_loss, subtb_pair_weights


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


def pair_tensor_subtb(
    log_pf: torch.Tensor,
    log_pterm: torch.Tensor,
    log_reward: torch.Tensor,
    lengths: torch.Tensor,
    subtb_lambda: float = 1.0,
    weighting: str = "batch",
) -> torch.Tensor:
    """The direct form: the [B, L+1, L+1] residual tensor."""
    potentials, _ = balance_potentials(log_pf, log_pterm, log_reward, lengths)
    residuals = potentials.unsqueeze(2) - potentials.unsqueeze(1)  # [B, i, j]
    pair_weights, end_weights = subtb_pair_weights(
        lengths, log_pf.shape[1], subtb_lambda, weighting, dtype=potentials.dtype
    )
    per_end = (residuals.square() * pair_weights).sum(dim=1)
    weighted = (end_weights * per_end).sum(dim=1)
    normalizer = (end_weights * pair_weights.sum(dim=0)).sum(dim=1)
    if weighting == "batch":
        return weighted.sum() / normalizer.sum().clamp_min(1.0)
    per_trajectory = weighted / normalizer.clamp_min(1.0)
    return per_trajectory.sum() / (lengths >= 1).sum().clamp_min(1)


def random_batch(
    batch: int, cap: int, device: torch.device, seed: int, *, balanced: float = 1.0
) -> list[torch.Tensor]:
    """A float32 batch of realistic size: log-rewards fall to about -50 at the cap.

    ``balanced`` scales the part of the reward that does not match the policy: 1.0 is an
    untrained policy, 0.01 a nearly balanced one (small residuals on large potentials, where
    cancellation would show).
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cap + 1, (batch,), generator=gen)
    lengths[0] = cap
    positions = torch.arange(cap + 1)
    state_valid = positions.unsqueeze(0) <= lengths.unsqueeze(1)
    log_pf = torch.where(state_valid[:, 1:], -3 * torch.rand(batch, cap, generator=gen), 0.0)
    log_pterm = torch.where(state_valid, -3 * torch.rand(batch, cap + 1, generator=gen), 0.0)
    log_pterm[:, cap] = 0.0
    drift = -(100.0 / cap) * torch.rand(batch, cap + 1, generator=gen).cumsum(1)  # ~ -50 at L
    noise = 3.0 * torch.randn(batch, cap + 1, generator=gen)
    log_reward = torch.where(state_valid, balanced * (drift + noise), 0.0)
    if balanced != 1.0:  # the policy explains the rest of the reward exactly
        prefix = torch.cat([torch.zeros(batch, 1), log_pf.cumsum(1)], 1)
        log_reward = torch.where(state_valid, log_reward + prefix + log_pterm - 20.0, 0.0)
    return [t.to(device) for t in (log_pf, log_pterm, log_reward, lengths)]


def agreement(cap: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Worst relative gaps of float32 losses to a float64 reference: the library's and the
    pair tensor's (the float32 floor: potentials are rounded before any pair is formed)."""
    worst = {"value_rel_gap": 0.0, "grad_rel_gap": 0.0, "pair_value_rel_gap": 0.0}
    worst["pair_grad_rel_gap"] = 0.0
    for balanced in (1.0, 0.01):
        for weighting in ("batch", "geometric_within"):
            for lam in (args.subtb_lambda, 0.5):
                inputs = random_batch(args.batch, cap, device, args.seed, balanced=balanced)
                ref = [
                    t.double().requires_grad_(True) if t.is_floating_point() else t for t in inputs
                ]
                ref_value = pair_tensor_subtb(*ref, subtb_lambda=lam, weighting=weighting)
                if weighting == "batch":  # the loop is an independent check of the float64 value
                    loop_value = loop_over_lengths_subtb(*ref, subtb_lambda=lam)
                    assert abs(loop_value.item() - ref_value.item()) <= 1e-9 * abs(ref_value.item())
                ref_grads = torch.autograd.grad(ref_value, ref[:2])
                for prefix, loss in (("", modified_subtb_loss), ("pair_", pair_tensor_subtb)):
                    ours = [
                        t.clone().requires_grad_(True) if t.is_floating_point() else t
                        for t in inputs
                    ]
                    value = loss(*ours, subtb_lambda=lam, weighting=weighting)
                    grads = torch.autograd.grad(value, ours[:2])
                    gap = abs(value.item() - ref_value.item()) / abs(ref_value.item())
                    worst[f"{prefix}value_rel_gap"] = max(worst[f"{prefix}value_rel_gap"], gap)
                    for grad, ref_grad in zip(grads, ref_grads, strict=True):
                        gap = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
                        worst[f"{prefix}grad_rel_gap"] = max(worst[f"{prefix}grad_rel_gap"], gap)
    return worst


def time_interleaved_ms(
    functions: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median wall time in ms of each function, timed round-robin so that load from other
    processes on a shared machine hits every contender alike."""

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


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="trajectories per batch (64)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[16, 64, 256], help="length caps L to time"
    )
    parser.add_argument("--subtb-lambda", type=float, default=1.0, help="λ (1.0, the LM recipe)")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats; median kept")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="value agreement required")
    parser.add_argument(
        "--grad-rtol", type=float, default=1e-4, help="gradient agreement (vs largest entry)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, torch's elsewhere). On the shared "
        "2-core machine a 2-thread parallel region stalls whenever another process holds the "
        "other core, which delays whichever contender comes next; 1 thread measures "
        "the code, not the neighbours",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)

    rows = []
    for cap in args.lengths:
        gaps = agreement(cap, args, device)
        # Gradients: within --grad-rtol, or no worse than the float32 floor the pair tensor has.
        grad_bound = max(args.grad_rtol, 1.5 * gaps["pair_grad_rel_gap"])
        if gaps["value_rel_gap"] > args.rtol or gaps["grad_rel_gap"] > grad_bound:
            raise SystemExit(f"L={cap}: float32 loss disagrees with the float64 reference: {gaps}")
        log_pf, log_pterm, log_reward, lengths = random_batch(args.batch, cap, device, args.seed)
        log_pf.requires_grad_(True)
        log_pterm.requires_grad_(True)
        inputs = (log_pf, log_pterm, log_reward, lengths)
        implementations = {
            "loop": partial(loop_over_lengths_subtb, *inputs, subtb_lambda=args.subtb_lambda),
            "pair": partial(pair_tensor_subtb, *inputs, subtb_lambda=args.subtb_lambda),
            "vectorized": partial(modified_subtb_loss, *inputs, subtb_lambda=args.subtb_lambda),
        }
        values = {name: fn().item() for name, fn in implementations.items()}
        relative_gap = abs(values["vectorized"] - values["loop"]) / abs(values["loop"])
        if relative_gap > args.rtol:
            raise SystemExit(f"L={cap}: values differ by {relative_gap:.2e} relative: {values}")
        row = {"L": cap, "batch": args.batch, "value": values["vectorized"], **gaps}
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
        for pass_ in ("fwd", "fwd_bwd"):
            vectorized = row[f"vectorized_{pass_}_ms"]
            row[f"speedup_{pass_}"] = row[f"loop_{pass_}_ms"] / vectorized
            row[f"speedup_{pass_}_vs_pair"] = row[f"pair_{pass_}_ms"] / vectorized
            row[f"pair_speedup_{pass_}"] = row[f"loop_{pass_}_ms"] / row[f"pair_{pass_}_ms"]
        rows.append(row)

    print(
        f"modified SubTB loss, batch {args.batch}, λ = {args.subtb_lambda}, device {device}, "
        f"{torch.get_num_threads()} threads (ms, median of {args.repeats} interleaved repeats)"
    )
    print(
        f"{'L':>5} {'pass':>8} {'loop':>9} {'pair':>9} {'vector':>9} "
        f"{'loop/vec':>9} {'pair/vec':>9} {'loop/pair':>9}"
    )
    for row in rows:
        for pass_ in ("fwd", "fwd_bwd"):
            print(
                f"{row['L']:>5} {pass_:>8} {row[f'loop_{pass_}_ms']:>9.3f} "
                f"{row[f'pair_{pass_}_ms']:>9.3f} {row[f'vectorized_{pass_}_ms']:>9.3f} "
                f"{row[f'speedup_{pass_}']:>8.1f}x {row[f'speedup_{pass_}_vs_pair']:>8.1f}x "
                f"{row[f'pair_speedup_{pass_}']:>8.1f}x"
            )
    for row in rows:
        print(
            f"L={row['L']}: float32 vs float64 reference, worst value gap "
            f"{row['value_rel_gap']:.1e} (pair tensor {row['pair_value_rel_gap']:.1e}), "
            f"worst gradient gap {row['grad_rel_gap']:.1e} "
            f"(pair tensor {row['pair_grad_rel_gap']:.1e})"
        )
    for row in rows:
        emit(
            "subtb_loss",
            device=str(device),
            batch=row["batch"],
            L=row["L"],
            subtb_lambda=args.subtb_lambda,
            threads=torch.get_num_threads(),
            **{k: round(v, 5) for k, v in row.items() if k not in ("L", "batch")},
        )
    return rows


if __name__ == "__main__":
    main()
