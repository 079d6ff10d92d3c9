"""What one twist head can represent on the many-prompt world, apart from how it is trained.

For whoever asks whether the amortized GFlowNet's error (docs/gflownet.md, "Which prompts to fit
on") is its training signal or its form. A SubTB fit sees a few sampled responses per prompt; this
bench gives the head the best signal there is: the exact gradient of ``KL(target ‖ q)`` over
every state of every fit prompt's response tree (``gfn_spin.exact_twist``: each state's optimal
next-token law, weighted by the target's probability of reaching it), for ``--epochs`` passes.
What it reaches bounds what any training of that head on those prompts can reach. Heads:

- ``features``: the twist form's own head (``TwistHead`` over the components' last hidden states
  at the state, the ``"twist"`` parametrization's input);
- ``features+sequence``: the same MLP also reading the raw prompt and response so far (one-hot
  per slot) and the depth, everything the state's law can depend on.

Printed per preset and head: exact TV on ``--probe`` new prompts and on as many fit prompts
(evenly spaced), and the local product's TV on the same prompts, with the ratio.

    python -m bench.twist_capacity --quick
    python -m bench.twist_capacity                    # both presets, 1,024 fit prompts, 10 epochs
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch.nn.functional import one_hot
from tqdm.auto import tqdm

from bench._timing import emit
from bench.alpha_spin_regime import mean_and_error
from gfn_spin.exact_twist import StateTree, state_tree
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.twisted_local_product import TwistHead
from objectives.distill import state_kl
from worlds.many_prompt import ManyPromptConfig, build_many_prompt_world

HEADS = ("features", "features+sequence")
QUICK = {"fit_prompts": 64, "epochs": 3, "probe": 2, "presets": "stress"}
#: Prompts per tree (one batched forward per level over P · A^d rows).
CHUNK = 8


@dataclass
class States:
    """The training states of many trees, concatenated: what a head reads and is fitted to."""

    inputs: dict[str, torch.Tensor]
    log_local: torch.Tensor
    log_optimal: torch.Tensor
    weights: torch.Tensor


def inputs_by_head(
    tree: StateTree,
    prompts: Sequence[Sequence[int]],
    vocab: int,
    width: int,
    heads: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Per head of ``heads``, its input at every state of ``tree`` (``prompts``: the tree's
    prompts, each left-padded to ``width`` tokens for the raw sequence)."""
    inputs = {"features": tree.features}
    if "features+sequence" in heads:
        padded = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
        sequence = torch.cat([padded[tree.prompt_index], tree.prefixes.clamp_min(0)], dim=1)
        depth = one_hot(tree.depth, tree.max_new_tokens).float()
        raw = rearrange(one_hot(sequence, vocab).float(), "s n v -> s (n v)")
        inputs["features+sequence"] = torch.cat([tree.features, raw, depth], dim=1)
    return {name: inputs[name] for name in heads}


def states(
    target: GeometricMixture,
    prompts: Sequence[Sequence[int]],
    cap: int,
    width: int,
    heads: Sequence[str],
    progress: bool,
) -> States:
    """The states of every prompt's tree (those the target reaches), in chunks of prompts."""
    parts = []
    for start in tqdm(range(0, len(prompts), CHUNK), desc="trees", disable=not progress):
        chunk = prompts[start : start + CHUNK]
        tree = state_tree(target, chunk, cap)
        reached = tree.visits > 0
        inputs = inputs_by_head(tree, chunk, target.vocab_size, width, heads)
        parts.append(
            (
                {name: x[reached] for name, x in inputs.items()},
                tree.log_local[reached],
                tree.log_optimal[reached],
                tree.visits[reached],
            )
        )
    visits = torch.cat([p[3] for p in parts])
    return States(
        {name: torch.cat([p[0][name] for p in parts]) for name in heads},
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        visits * len(visits) / visits.sum(),
    )


def fit_head(data: States, name: str, args: argparse.Namespace, vocab: int) -> TwistHead:
    """The head fitted by the exact gradient: AdamW, cosine decay, minibatches of states."""
    inputs = data.inputs[name]
    head = TwistHead(inputs.shape[1], vocab, width=args.width, depth=args.depth)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate)
    steps = args.epochs * max(1, len(inputs) // args.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in tqdm(range(steps), desc=f"fit {name}", disable=not args.progress):
        rows = torch.randint(len(inputs), (args.batch,), generator=generator)
        log_q = torch.log_softmax(data.log_local[rows] + head(inputs[rows]), dim=-1)
        loss = (data.weights[rows] * state_kl(data.log_optimal[rows], log_q)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return head


@torch.no_grad()
def probe_tvs(
    target: GeometricMixture,
    prompts: Sequence[Sequence[int]],
    cap: int,
    width: int,
    heads: dict[str, TwistHead],
) -> dict[str, list[float]]:
    """Per prompt, the exact TV to the target of each head's law and of the local product."""
    tvs: dict[str, list[float]] = {name: [] for name in [*heads, "local product"]}
    for prompt in prompts:
        tree = state_tree(target, [prompt], cap)
        inputs = inputs_by_head(tree, [prompt], target.vocab_size, width, list(heads))
        exact = tree.response_logprobs(tree.log_optimal.double()).exp()
        laws = {name: tree.log_local + head(inputs[name]) for name, head in heads.items()}
        laws["local product"] = tree.log_local
        for name, logits in laws.items():
            law = tree.response_logprobs(torch.log_softmax(logits.double(), dim=-1)).exp()
            tvs[name].append(0.5 * float((law - exact).abs().sum()))
    return tvs


def capacity(args: argparse.Namespace, preset: str) -> list[dict[str, Any]]:
    """Every head fitted on one preset's fit prompts, measured on new and fit prompts."""
    many = build_many_prompt_world(ManyPromptConfig(preset=preset))
    world, cap = many.world, many.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - args.alpha, args.alpha])
    generator = torch.Generator().manual_seed(args.seed)
    chosen = torch.randperm(len(many.fit_prompts), generator=generator)[: args.fit_prompts]
    fit = [list(many.fit_prompts[i]) for i in sorted(chosen.tolist())]
    width = max(len(p) for p in [*many.fit_prompts, *many.new_prompts])
    data = states(target, fit, cap, width, args.heads, args.progress)
    heads = {name: fit_head(data, name, args, target.vocab_size) for name in args.heads}
    probes = {
        "new": many.new_prompts[:: max(1, len(many.new_prompts) // args.probe)][: args.probe],
        "fit": fit[:: max(1, len(fit) // args.probe)][: args.probe],
    }
    rows = []
    for on, prompts in probes.items():
        tvs = probe_tvs(target, [list(p) for p in prompts], cap, width, heads)
        local = mean_and_error(tvs["local product"])
        for name in args.heads:
            tv = mean_and_error(tvs[name])
            row = {
                "preset": preset,
                "alpha": args.alpha,
                "head": name,
                "on": on,
                "fit_prompts": len(fit),
                "states": len(data.weights),
                "epochs": args.epochs,
                "tv": tv,
                "local_product_tv": local,
                "over_local_product": tv[0] / local[0],
            }
            print(
                f"{preset} α={args.alpha} {name} head, exact gradient on {len(fit)} fit prompts "
                f"({len(data.weights):,} states, {args.epochs} epochs): TV on {on} prompts "
                f"{tv[0]:.4f} ± {tv[1]:.4f}; local product {local[0]:.4f}: "
                f"{row['over_local_product']:.2f}×",
                flush=True,
            )
            emit("twist_capacity", **row)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="overlap,stress", help="comma-separated presets")
    parser.add_argument("--alpha", type=float, default=0.5, help="the target's α")
    parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {HEADS}")
    parser.add_argument("--fit-prompts", type=int, default=1024, help="fit prompts (a subset)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the fit states")
    parser.add_argument("--batch", type=int, default=4096, help="states per gradient step")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="AdamW peak rate")
    parser.add_argument("--width", type=int, default=256, help="the head's hidden width")
    parser.add_argument("--depth", type=int, default=2, help="the head's hidden layers")
    parser.add_argument("--probe", type=int, default=8, help="prompts of each exact TV")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and batches")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    parser.add_argument("--quick", action="store_true", help="a small setting (a minute)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.heads = args.heads.split(",")
    unknown = sorted(set(args.heads) - set(HEADS))
    if unknown:
        parser.error(f"--heads: unknown {unknown}; choose from {list(HEADS)}")
    torch.set_num_threads(1)
    return [row for preset in args.presets.split(",") for row in capacity(args, preset)]


if __name__ == "__main__":
    main()
