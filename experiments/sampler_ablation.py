"""Which sampler settings matter?  ``python -m experiments.sampler_ablation`` runs the sampler
studies together.

For whoever wants every sampler study in one folder: the sweep (:mod:`experiments.sampler_sweep`)
always, then, each behind its flag, the torchgfn baseline (:mod:`experiments.torchgfn_baseline`,
``--torchgfn``), the amortization study (:mod:`experiments.amortization`, ``--amortization``)
and the random-Llama study (:mod:`experiments.large_models`, ``--large``). Every flag of those
studies applies here; each study also runs alone as ``python -m experiments.<study>``. Outputs:
:mod:`experiments.studies`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from experiments.amortization import AmortizationConfig, amortization
from experiments.large_models import LargeConfig, large_setting
from experiments.sampler_sweep import SweepConfig, sweep
from experiments.studies import Study, run_studies
from experiments.torchgfn_baseline import TorchgfnConfig, torchgfn_comparison
from gfn_spin.options import option


@dataclass
class SamplerAblationConfig(SweepConfig, TorchgfnConfig, AmortizationConfig, LargeConfig):
    """Sweep sampler settings on the tiny world; optional torchgfn, amortization and large
    studies."""

    QUICK: ClassVar[dict[str, Any]] = {
        **LargeConfig.QUICK,
        **AmortizationConfig.QUICK,
        **TorchgfnConfig.QUICK,
        **SweepConfig.QUICK,
    }
    """Settings of ``--quick``: those of every study."""

    output_dir: str = option(
        "outputs/sampler_ablation",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    torchgfn: bool = option(True, "Run the torchgfn SubTB baseline on one eval prompt.")
    amortization: bool = option(
        False,
        "Run the amortization study: SubTB fitted on the train prompts and on the "
        "eval prompts, and the maximum-likelihood oracle (the longest study).",
    )
    large: bool = option(True, "Run the large (non-enumerable) random-Llama study.")


def studies(config: SamplerAblationConfig) -> list[Study]:
    """The studies ``config`` selects, in the order they run."""
    selected: list[Study] = [sweep]
    if config.torchgfn:
        selected.append(torchgfn_comparison)
    if config.amortization:
        selected.append(amortization)
    if config.large:
        selected.append(large_setting)
    return selected


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected studies; returns the results dict (also written to ``output_dir``)."""
    return run_studies(
        SamplerAblationConfig,
        argv,
        studies,
        "experiments.sampler_ablation",
        (__doc__ or "").split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
