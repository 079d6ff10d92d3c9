"""Tiny-world GFlowNet fits for the subprocess tests (accelerate launch against one process).

Usage: ``python tests/run_gflownet_fit.py CACHE OUTPUT_DIR CONFIGS_JSON [CHECKPOINT_DIR]``: for
each config (a list of GFlowNetConfig overrides), fits a GFlowNet to the geometric mixture of
the base and π_t (α = 0.5), starting from π_t, on the first training prompts, with checkpoints
in CHECKPOINT_DIR when given; writes each rank's trainable weights (before and after) and
metrics, one entry per config, to ``OUTPUT_DIR/rank{r}.pt``.
"""

import json
import sys
from pathlib import Path

import torch

from gfn_spin import GeometricMixture
from samplers import GFlowNetSampler
from worlds.toy import build_world

torch.set_num_threads(1)
cache, out, configs = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
checkpoint_dir = sys.argv[4] if len(sys.argv) > 4 else None
world = build_world(cache_dir=cache)


def trainable(sampler: GFlowNetSampler) -> dict[str, torch.Tensor]:
    if sampler.head is not None:
        return {n: v.detach().clone() for n, v in sampler.head.state_dict().items()}
    marker = f".{sampler.config.adapter_name}."
    model = sampler.init.model
    return {n: p.detach().clone() for n, p in model.named_parameters() if marker in n}


runs = []
for overrides in configs:
    shifted = world.load_policy("shifted", device="cpu", dtype=torch.float32)
    target = GeometricMixture([world.base, shifted], [0.5, 0.5])
    sampler = GFlowNetSampler(target, shifted, **overrides)
    initial = trainable(sampler)
    metrics = sampler.fit(
        world.train_prompts[:16], progress=False, log_every=1, checkpoint_dir=checkpoint_dir
    )
    runs.append({"initial": initial, "weights": trainable(sampler), "metrics": metrics})
    rank = sampler.trainer.accelerator.process_index
out.mkdir(parents=True, exist_ok=True)
torch.save(runs, out / f"rank{rank}.pt")
