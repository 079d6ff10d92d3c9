"""Samplers where nothing can be enumerated: two random Llama models.
``python -m experiments.large_models``.

For whoever wants sampler costs beyond the tiny world: two random-init Llama models
(vocabulary ≥ 256, cap ≥ 32, the second a perturbed copy of the first), whose geometric mixture
cannot be enumerated: ESS per model token of SIR, SMC and a briefly trained GFlowNet, and the
GFlowNet's KL(q‖target) = E_q[log q − log G̃] + log Z with log Z from a large SMC run.
Outputs: :mod:`experiments.studies`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.studies import AblationConfig, Setup, gfn_config, run_studies
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.options import option
from gfn_spin.policy import Policy
from gfn_spin.samples import Samples
from samplers import ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetSampler
from worlds.toy import numbered_tokenizer

#: The mixture weight α of the random-Llama target π_first^(1-α) π_second^α.
LARGE_ALPHA = 0.5


@dataclass
class LargeConfig(AblationConfig):
    """ESS per model token and the GFlowNet's KL(q‖target) on two random Llama models."""

    QUICK: ClassVar[dict[str, Any]] = {"large_gfn_steps": 30, "large_reference_particles": 128}
    """Settings of ``--quick`` (each one still at its default takes this value)."""

    output_dir: str = option(
        "outputs/large_models",
        "Directory for ablation.csv, results.json, ablation.png and run.log.",
    )
    large_vocab: int = option(256, "Vocabulary of the random Llama models (≥ 256).")
    large_cap: int = option(32, "Length cap L of the large study (≥ 32).")
    large_perturbation: float = option(
        0.3,
        "The second model's weights: w + perturbation · std(w) · noise (so the mixture is "
        "not trivial).",
    )
    large_sharpness: float = option(
        20.0, "Scale of the random LM heads (a random Llama is near-uniform; this makes it peaked)."
    )
    large_sir_candidates: tuple[int, ...] = option((4, 16), "K values of SIR in the large study.")
    large_smc_particles: tuple[int, ...] = option((16, 64), "N values of SMC in the large study.")
    large_draws: int = option(16, "Draws per held-out prompt of every sampler in the large study.")
    large_gfn_steps: int = option(150, "GFlowNet training steps in the large study.")
    large_learning_rate: float = option(
        1e-4,
        "GFlowNet peak learning rate in the large study (the sharp random heads need a small one).",
    )
    large_subtb_lambdas: tuple[float, ...] = option(
        (1.0, 0.5),
        "SubTB λ of the large study's GFlowNets, one trained per value (1: the published one).",
    )
    large_reference_particles: int = option(
        512,
        """N of the two SMC runs (two seeds) whose mean log Ẑ serves as log Z in
            KL(q‖target); their difference is reported as log_z_spread, the uncertainty of that
            KL.""",
    )

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        super().validate()
        for name in ("large_gfn_steps", "large_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if any(k < 1 for k in (*self.large_sir_candidates, *self.large_smc_particles)):
            raise ValueError("SIR candidates and SMC particles must be >= 1")
        if not self.large_subtb_lambdas or min(self.large_subtb_lambdas) < 0:
            raise ValueError(f"large_subtb_lambdas={self.large_subtb_lambdas} must be >= 0")
        if self.large_vocab < 256 or self.large_cap < 32:
            raise ValueError("large_vocab must be >= 256 and large_cap >= 32 (not enumerable)")


def random_llama_pair(config: LargeConfig) -> tuple[Policy, Policy]:
    """Two random Llama policies: the second is the first with perturbed weights."""
    tokenizer = numbered_tokenizer(config.large_vocab)
    llama = LlamaConfig(
        vocab_size=config.large_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=config.large_cap + 32,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(config.seed)
    first = LlamaForCausalLM(llama).eval()
    with torch.no_grad():
        first.lm_head.weight.mul_(config.large_sharpness)
        first.lm_head.weight[1].mul_(0.1)  # EOS rarer than a typical token: long responses
    second = copy.deepcopy(first)
    with torch.no_grad():
        for param in second.parameters():
            param.add_(config.large_perturbation * param.std() * torch.randn_like(param))
    return Policy(first, tokenizer), Policy(second, tokenizer)


def kl_to_target(log_z: torch.Tensor, samples: Samples) -> dict[str, float]:
    """KL(q‖target) estimated as ``log Z − ELBO`` per prompt, averaged over the prompts, and the
    mean ELBO, for draws of a sampler with an exact ``log_q``.

    ``log_z``: ``[P]`` the target's log-normalizer per prompt (a reference estimate where
    nothing can be enumerated); ``samples.stats["elbo"]``: ``[P]`` the mean of
    ``log G̃ − log q`` over each prompt's draws, so ``log Z − ELBO = E_q[log q − log G̃] + log Z``.
    """
    elbo = torch.as_tensor(samples.stats["elbo"], dtype=torch.float64)
    log_z = torch.as_tensor(log_z, dtype=torch.float64)
    return {"kl_q_target": float((log_z - elbo).mean()), "elbo": float(elbo.mean())}


def reference_log_z(
    config: LargeConfig, target: GeometricMixture, prompts: list[list[int]]
) -> tuple[torch.Tensor, float]:
    """``[P]`` reference log Z of ``target`` per prompt: the mean of two independent SMC
    estimates, whose mean gap (returned too) says how far to trust KL = log Z − ELBO (the ELBO
    itself needs no reference: compare it across rows)."""
    references = [
        SMCSampler(
            target, config.large_reference_particles, max_new_tokens=config.large_cap
        ).sample(prompts, 1, generator=config.seed + offset)
        for offset in (0, 1)
    ]
    estimates = torch.tensor(
        [[float(z) for z in r.stats["log_z"]] for r in references], dtype=torch.float64
    )
    return estimates.mean(0), float((estimates[0] - estimates[1]).abs().mean())


def large_row(
    name: str,
    setting: str,
    samples: Samples,
    size: int,
    per_draw: int,
    ess: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the study. ``ess``: the absolute ESS of each population of ``size`` weighted
    proposals, which cost ``per_draw`` draws' tokens (K candidates or N particles: one;
    GFlowNet: all)."""
    ess = torch.as_tensor(ess, dtype=torch.float64).mean()
    tokens_per_draw = samples.stats["tokens"] / len(samples)
    return {
        "section": "large",
        "alpha": LARGE_ALPHA,
        "name": name,
        "setting": setting,
        "measure": "estimated",
        "ess_fraction": float(ess / size),
        "tokens_per_draw": tokens_per_draw,
        "ess_per_token": float(ess / (tokens_per_draw * per_draw)),
        **(extra or {}),
    }


def gflownet_rows(
    config: LargeConfig,
    target: GeometricMixture,
    model: Policy,
    train: list[list[int]],
    evaluation: list[list[int]],
    log_z: torch.Tensor,
    log_z_spread: float,
) -> list[dict[str, Any]]:
    """The GFlowNet's rows: untrained (the local product for residual) once, then trained with
    each SubTB λ of ``large_subtb_lambdas``."""
    cap, draws, rows = config.large_cap, config.large_draws, []
    for index, subtb_lambda in enumerate(config.large_subtb_lambdas):
        gfn = gfn_config(config, f"steps={config.large_gfn_steps}", LARGE_ALPHA, cap)
        gfn = dataclasses.replace(
            gfn,
            prompts_per_step=8,
            samples_per_prompt=4,
            learning_rate=config.large_learning_rate,
            subtb_lambda=subtb_lambda,
            adapter_name=f"large_{index}",
        )
        gflownet = GFlowNetSampler(target, model, gfn)
        seconds = 0.0
        for steps in (0, gfn.steps) if index == 0 else (gfn.steps,):
            started = time.perf_counter()
            gflownet.fit(train, steps, progress=config.progress)
            seconds += time.perf_counter() - started
            samples = gflownet.sample(evaluation, draws, generator=1)
            rows.append(
                large_row(
                    f"GFlowNet {gflownet.parametrization} {steps} steps"
                    + (f" λ={subtb_lambda:g}" if steps else ""),
                    f"lr {gfn.learning_rate:g}, {gfn.prompts_per_step}x{gfn.samples_per_prompt} per step",
                    samples,
                    draws,
                    draws,
                    samples.stats["ess"],
                    {
                        **kl_to_target(log_z, samples),
                        "log_z_spread": log_z_spread,
                        "train_steps": steps,
                        "train_seconds": seconds,
                    },
                )
            )
    return rows


def log_rows(rows: list[dict[str, Any]], logger: Any) -> None:
    """One log line per row: ESS/N, ESS per model token, tokens per draw, and the KL where
    there is one."""
    for row in rows:
        kl = (
            ""
            if row.get("kl_q_target") is None
            else f"  KL(q‖p) {row['kl_q_target']:.3f} (ELBO {row['elbo']:.3f}, log Ẑ spread "
            f"{row['log_z_spread']:.3f})"
        )
        logger.info(
            "large: %-28s ESS/N %.3f  ESS per model token %.2e  tokens/draw %.0f%s",
            row["name"],
            row["ess_fraction"],
            row["ess_per_token"],
            row["tokens_per_draw"],
            kl,
        )


def large_setting(config: LargeConfig, setup: Setup, logger: Any) -> list[dict[str, Any]]:
    """ESS per model token of SIR, SMC and a GFlowNet; the GFlowNet's KL(q‖target).

    ``setup`` is unused: nothing here is enumerable, so no tiny world is built.
    """
    cap, draws = config.large_cap, config.large_draws
    base, model = random_llama_pair(config)
    target = GeometricMixture([base, model], [1 - LARGE_ALPHA, LARGE_ALPHA])
    generator = torch.Generator().manual_seed(config.seed)
    prompts = torch.randint(2, config.large_vocab, (10, 6), generator=generator).tolist()
    train, evaluation = prompts[:8], prompts[8:]
    log_z, log_z_spread = reference_log_z(config, target, evaluation)
    rows = []
    for k in config.large_sir_candidates:
        sampler = ImportanceResampler(target, None, k, max_new_tokens=cap)
        samples = sampler.sample(evaluation, draws, generator=1)
        rows.append(
            large_row(f"SIR K={k}", "local product proposal", samples, k, 1, samples.stats["ess"])
        )
    for n in config.large_smc_particles:
        sampler = SMCSampler(target, n, max_new_tokens=cap)
        samples = sampler.sample(evaluation, draws, generator=1)
        rows.append(
            large_row(f"SMC N={n}", "local product proposal", samples, n, 1, samples.stats["ess"])
        )
    rows += gflownet_rows(config, target, model, train, evaluation, log_z, log_z_spread)
    log_rows(rows, logger)
    logger.info("large: log Z from SMC N=%d: %s", config.large_reference_particles, log_z.tolist())
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict (also written to ``output_dir``)."""
    return run_studies(
        LargeConfig,
        argv,
        lambda config: [large_setting],
        "experiments.large_models",
        __doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    main()
