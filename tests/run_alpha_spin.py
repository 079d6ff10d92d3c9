"""A tiny-world α-SPIN run for the subprocess tests (kill-and-resume, accelerate launch).

Usage: ``python tests/run_alpha_spin.py CACHE OUTPUT_DIR CONFIG_JSON``; writes each rank's LoRA
weights and records to ``OUTPUT_DIR/rank{r}.pt`` when the run completes.
"""

import json
import sys
from pathlib import Path

import torch

from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from worlds.toy import ToyWorldEvaluator, build_world

torch.set_num_threads(1)
cache, out, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
world = build_world(cache_dir=cache)
evaluator = ToyWorldEvaluator(world)
config = AlphaSpinConfig(output_dir=out, progress=False, **extra)
trainer = AlphaSpinTrainer(
    config, world=world, evaluate=lambda p: {"kl_data": evaluator.kl_from_data(p)}
)
records = trainer.train()
weights = {n: p.detach().clone() for n, p in trainer.base.model.named_parameters() if "lora" in n}
torch.save(
    {"weights": weights, "records": records},
    Path(out) / f"rank{trainer.accelerator.process_index}.pt",
)
