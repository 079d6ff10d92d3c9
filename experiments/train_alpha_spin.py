"""One α-SPIN run on your own model and data: ``python -m experiments.train_alpha_spin``.

For whoever fine-tunes a model by self-play (docs/alpha_spin.md). Every flag is a field of
``AlphaSpinConfig`` (:mod:`experiments.cli` builds the command line). With no ``--model`` it runs
on the tiny world (its base policy and SFT data). Restarting the same command resumes the run from its
last completed step. Data-parallel on several GPUs (or CPU processes)::

    accelerate launch --multi_gpu --num_processes 2 -m experiments.train_alpha_spin \\
        --model path/or/hub-name --dataset data.jsonl --output-dir runs/alpha_spin
"""

from __future__ import annotations

from typing import Any

from experiments.cli import parse_config
from experiments.common import prepare_output_dir, setup_logging, write_results
from selfplay import AlphaSpinConfig, AlphaSpinTrainer
from selfplay.run_directory import MANIFEST, RUN_TOOL
from worlds.toy import build_world


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    config = parse_config(AlphaSpinConfig, argv, description=(__doc__ or "").split("\n\n")[0])
    # No --model or no --dataset: the tiny world's base and SFT data.
    needs_world = config.model is None or config.dataset is None
    trainer = AlphaSpinTrainer(config, world=build_world(device="cpu") if needs_world else None)
    log = None
    if trainer.accelerator.is_main_process:
        output_dir = prepare_output_dir(
            config.output_dir,
            tool=RUN_TOOL,  # the trainer claims the same folder for the same run
            is_earlier_run=lambda root: (root / MANIFEST).is_file(),
        )
        log = setup_logging(output_dir, "experiments.train_alpha_spin")
        log.info(f"α-SPIN: {config.iterations} iterations -> {output_dir}")
    records = trainer.train()
    if log is not None:
        write_results({"iterations": records}, config.output_dir, config)
        for record in records:
            log.info(str(record))
    return records


if __name__ == "__main__":
    main()
