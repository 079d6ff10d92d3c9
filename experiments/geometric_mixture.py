"""How exactly can we sample π_base^(1-α) · π_t^α?  The main job: ``python -m experiments.geometric_mixture``.

On the tiny world (DESIGN §6) every density is enumerated, so each sampler's error to the
geometric mixture is a number. For each α the job trains one GFlowNet adapter on the train
prompts (amortized), then compares on the held-out eval prompts, at stated budgets:

- ancestral sampling from π_t (what people do without a geometric sampler),
- the local product q_loc (token-level product),
- SIR from q_loc with K candidates, SMC from q_loc with N particles,
- the GFlowNet, and SIR with the GFlowNet as proposal.

Every number is measured with noise well below its value:

- samplers with a density (π_t, q_loc, the GFlowNet): exact TV and KL(target‖q) from their
  enumerated law, and the exact ESS/N as N → ∞, ``1/(1 + χ²(target‖q))``;
- SIR: exact TV and KL(target‖p_K) from its exact output law ``p_K``
  (:func:`gfn_spin.exact.sir_output_law`, relative precision stated in the output);
- SMC, whose law has no closed form: only ``|log Ẑ − log Z|`` per run against the enumerated
  ``log Z``, and the ESS/N of its final weights, averaged over ``smc_runs`` independent runs
  per eval prompt with their standard errors; a point whose standard error exceeds a quarter
  of its value after ``smc_max_runs`` runs is dropped and said so.

Model tokens per draw and draws per second are measured on ``draws`` draws per eval prompt.
Output: two printed tables (exact laws; SMC), ``results.json`` (config, package versions, git
commit, per-prompt values, the SIR laws' precision, the SMC standard errors),
``error_vs_cost.png`` (per α: exact TV and KL against model tokens per draw; SMC's
``|Δlog Z|`` in a panel of its own) and ``run.log`` in ``--output-dir``.

The world (``--world-preset``): by default ``overlap``, where π_t relates to π_base the way a
self-play iterate relates to its base: the shifted task writes the *same* symbols with other
keep/double/noise probabilities (``shift_rule=style``), and both policies learn from 8,192 SFT
examples instead of the stress world's 384, so the two policies share their support and the
base is closer to p_data (KL(p_data‖π_base) 1.23 against 1.79 on the eval prompts); the target
is still far from π_t (TV 0.39 at α = 0.5). It builds in about 9 s on one thread, like the
stress world: SFT runs the same 150 steps of 64 examples whatever the sample size. ``stress``
is the symbol-shift world (the shifted task writes the next symbol): the policies barely
overlap and the mixture lives in their tails, a hard case for every sampler.
``--world field=value ...`` adds ToyWorldConfig settings on top of the preset (``seed=1``).

With ``--model``/``--base`` (HF names or local paths) nothing is enumerated; ESS, log Ẑ and the
ELBO gap KL(q‖target) ≈ log Ẑ − E_q[log G̃ − log q] are reported instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.common import (
    check_alphas,
    output_set,
    parse_config,
    prepare_output_dir,
    read_prompts_file,
    setup_logging,
    split_train_eval,
    world_config,
    write_results,
)
from gfn_spin.density import Density
from gfn_spin.devices import resolve_device
from gfn_spin.exact import divergences, exact_distribution, sir_output_laws
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.base import Sampler
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler, ess_fraction
from samplers.weighting import model_tokens

DEFAULT_PROMPTS = ("a b", "c d a", "b b c d", "d a")
WORLD_PRESETS: dict[str, tuple[str, ...]] = {
    "overlap": ("shift_rule=style", "sft_examples=8192"),
    "stress": ("shift_rule=symbol",),
}
"""ToyWorldConfig settings of each ``--world-preset`` (``--world`` adds to them)."""


@dataclass
class GeometricMixtureConfig:
    """Compare samplers of the geometric mixture π_base^(1-α) π_t^α against the exact target."""

    output_dir: str = "outputs/geometric_mixture"
    """Directory for results.json, error_vs_cost.png and run.log (created if missing)."""
    alphas: tuple[float, ...] = (0.5, 0.95)
    """Values of α; the target is GeometricMixture([base, π_t], [1-α, α])."""
    seed: int = 0
    """Seed of training batches and of every sampler's draws."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ..."""
    threads: int = 1
    """CPU threads for torch (tiny models run fastest single-threaded; 0 keeps torch's default)."""
    model: str | None = None
    """π_t: an HF model name or local path; None uses the tiny world's shifted policy."""
    base: str | None = None
    """π_base: an HF model name or local path; None uses the tiny world's base policy."""
    world_cache: str | None = None
    """Cache directory of the tiny world (default $GFN_SPIN_CACHE or ~/.cache/gfn_spin)."""
    world_preset: str = "overlap"
    """Tiny world: "overlap" (π_t writes the base task's symbols with other probabilities, both
    policies SFT-trained on 8,192 examples: policies that overlap like a self-play iterate and
    its base) or "stress" (π_t writes the next symbol: policies that barely overlap)."""
    world: tuple[str, ...] = ()
    """More tiny-world settings as field=value, fields of gfn_spin.toyworld.ToyWorldConfig,
    applied on top of world_preset (e.g. seed=1); each distinct world is built once and
    cached."""
    prompts_file: str | None = None
    """Real models only: a text file of prompts, one per line (the last quarter is held out)."""
    max_new_tokens: int = 32
    """Real models only: the length cap L (the tiny world's cap is 7)."""
    num_eval_prompts: int = 16
    """Held-out prompts evaluated (at most the world's 16)."""
    draws: int = 8
    """Draws per eval prompt for every sampler except SMC: they measure model tokens per draw
    and draws per second (errors come from exact laws, not from these draws; SIR's K·draws
    candidates per prompt make its mean cost precise)."""
    sir_candidates: tuple[int, ...] = (4, 16, 64)
    """K values of SIR from the local product."""
    smc_particles: tuple[int, ...] = (16, 64)
    """N values of SMC from the local product."""
    smc_runs: int = 8
    """Independent SMC runs per eval prompt (|Δlog Z| and ESS/N are averaged over them)."""
    smc_max_runs: int = 256
    """Most SMC runs per eval prompt: runs are raised up to this until the standard error of
    each reported mean is at most a quarter of it; a point still above is dropped."""
    sir_rtol: float = 1e-8
    """Relative precision required of SIR's exact output law (per response)."""
    gfn_sir_candidates: int = 4
    """K of SIR with the trained GFlowNet as proposal."""
    gfn_parametrization: str = "auto"
    """GFlowNet policy (docs/gflownet.md): "auto" (the twist form here), "twist" (local product
    × a head on both policies' hidden states), "residual" (local product × a LoRA correction)
    or "lora" (LoRA on π_t, one model pass per token)."""
    gfn_loss: str = "subtb"
    """GFlowNet objective: "subtb", "tb" or "log_variance"."""
    gfn_steps: int = 200
    """GFlowNet training rollouts per α."""
    gfn_twist_updates: int = 8
    """Twist form: head updates per rollout (the extra ones on stored batches)."""
    gfn_learning_rate: float = 3e-3
    """GFlowNet peak learning rate (cosine decay)."""
    gfn_lora_rank: int = 32
    """GFlowNet LoRA rank (residual and lora forms)."""
    gfn_prompts_per_step: int = 32
    """Prompts per GFlowNet training batch."""
    gfn_samples_per_prompt: int = 4
    """Responses per prompt per GFlowNet training batch."""
    gfn_subtb_lambda: float = 1.0
    """SubTB λ."""
    gfn_explore_prob: float = 0.0
    """Fraction of training batches sampled at a random temperature in [0.5, 2]."""
    gfn_replay_prob: float = 0.0
    """Fraction of training batches replayed from the buffer of high-reward responses."""
    onepass_steps: int = 200
    """Steps distilling the GFlowNet into the one-pass form (a LoRA adapter on π_t that HF
    generate can serve, one model pass per token); 0 skips it."""
    onepass_learning_rate: float = 1e-2
    """Peak learning rate of the one-pass distillation."""
    onepass_rank: int = 64
    """LoRA rank of the one-pass form."""
    checkpoint_dir: str | None = None
    """Where GFlowNet checkpoints go (one subdirectory per α); None: no checkpoints."""
    resume: bool = False
    """Resume GFlowNet training from the latest checkpoint in checkpoint_dir."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        if self.world_preset not in WORLD_PRESETS:
            raise ValueError(
                f"world_preset={self.world_preset!r} must be one of {sorted(WORLD_PRESETS)}"
            )
        world_config(self.world_specs())  # a bad --world setting fails here, not after loading
        check_alphas(self.alphas)
        resolve_device(self.device)
        for name in (
            "draws",
            "num_eval_prompts",
            "max_new_tokens",
            "gfn_sir_candidates",
            "smc_runs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if any(k < 1 for k in (*self.sir_candidates, *self.smc_particles)):
            raise ValueError("sir_candidates and smc_particles must be >= 1")
        if (self.model is None) != (self.base is None):
            raise ValueError("give both --model and --base (real models), or neither (tiny world)")
        if self.model is not None and self.world:
            raise ValueError("--world sets up the tiny world; it does not apply with --model")
        if self.smc_max_runs < self.smc_runs:
            raise ValueError(
                f"smc_max_runs={self.smc_max_runs} must be >= smc_runs={self.smc_runs}"
            )
        if not 0.0 < self.sir_rtol < 1e-2:
            raise ValueError(f"sir_rtol={self.sir_rtol} must be in (0, 0.01)")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")
        if self.onepass_steps < 0:
            raise ValueError(f"onepass_steps={self.onepass_steps} must be >= 0")
        self.gfn_config(0.5, 7)  # validates the GFlowNet fields
        self.onepass_config(0.5, 7)

    def world_specs(self) -> tuple[str, ...]:
        """The tiny world's ToyWorldConfig settings: the preset's, then ``world``'s."""
        return (*WORLD_PRESETS.get(self.world_preset, ()), *self.world)

    def gfn_config(self, alpha: float, max_new_tokens: int) -> GFlowNetConfig:
        return GFlowNetConfig(
            max_new_tokens=max_new_tokens,
            parametrization=self.gfn_parametrization,
            steps=self.gfn_steps,
            learning_rate=self.gfn_learning_rate,
            lora_rank=self.gfn_lora_rank,
            lora_alpha=float(self.gfn_lora_rank),
            prompts_per_step=self.gfn_prompts_per_step,
            samples_per_prompt=self.gfn_samples_per_prompt,
            subtb_lambda=self.gfn_subtb_lambda,
            loss=self.gfn_loss,
            twist_updates=self.gfn_twist_updates,
            explore_prob=self.gfn_explore_prob,
            replay_prob=self.gfn_replay_prob,
            adapter_name=f"gflownet_alpha_{alpha:g}".replace(".", "_"),
            seed=self.seed,
        )

    def onepass_config(self, alpha: float, max_new_tokens: int) -> GFlowNetConfig:
        """The one-pass form distilled from the GFlowNet: LoRA on π_t."""
        return GFlowNetConfig(
            max_new_tokens=max_new_tokens,
            parametrization="lora",
            steps=self.onepass_steps,
            learning_rate=self.onepass_learning_rate,
            lora_rank=self.onepass_rank,
            lora_alpha=float(self.onepass_rank),
            prompts_per_step=self.gfn_prompts_per_step,
            samples_per_prompt=self.gfn_samples_per_prompt,
            adapter_name=f"onepass_alpha_{alpha:g}".replace(".", "_"),
            seed=self.seed,
        )


# -- the comparison ---------------------------------------------------------------------------


@dataclass
class Entry:
    """One sampler of the comparison and how its error is measured.

    ``density`` is set when the sampler's own law can be enumerated (π_t, q_loc, the GFlowNet);
    ``proposal`` and ``num_candidates`` when it is SIR (its exact law follows from the
    proposal's); neither for SMC (only ``|Δlog Z|`` and ESS are measured).
    """

    name: str
    sampler: Sampler
    density: Density | None
    budget: str
    proposal: Density | None = None
    num_candidates: int | None = None

    @property
    def kind(self) -> str:
        """ "density", "sir" or "smc"."""
        if self.density is not None:
            return "density"
        return "sir" if self.proposal is not None else "smc"


def build_samplers(
    config: GeometricMixtureConfig,
    target: GeometricMixture,
    init: Policy,
    gflownet: GFlowNetSampler,
    max_new_tokens: int,
    onepass: GFlowNetSampler | None = None,
) -> list[Entry]:
    """The compared samplers, in table order."""
    local = target.local_product()
    cap = {"max_new_tokens": max_new_tokens}
    entries = [
        Entry("ancestral π_t", AncestralSampler(init, target=target, **cap), init, "1 draw"),
        Entry("local product", AncestralSampler(local, target=target, **cap), local, "1 draw"),
    ]
    for k in config.sir_candidates:
        sampler = ImportanceResampler(target, local, k, **cap)
        entries.append(Entry(f"SIR K={k}", sampler, None, f"K={k}", local, k))
    for n in config.smc_particles:
        entries.append(Entry(f"SMC N={n}", SMCSampler(target, n, **cap), None, f"N={n}"))
    entries.append(
        Entry("GFlowNet", gflownet, gflownet.policy, f"{gflownet.config.steps} train steps")
    )
    if onepass is not None:
        budget = f"{onepass.config.steps} distillation steps"
        entries.append(Entry("GFlowNet one-pass", onepass, onepass.policy, budget))
    k = config.gfn_sir_candidates
    sampler = ImportanceResampler(target, gflownet.policy, k, **cap)
    entries.append(Entry(f"SIR(GFlowNet) K={k}", sampler, None, f"K={k}", gflownet.policy, k))
    return entries


def _draw(entry: Entry, prompts: list[list[int]], draws: int, seed: int) -> tuple[Any, dict]:
    samples = entry.sampler.sample(prompts, draws, generator=seed)
    stats = samples.stats
    per_prompt = len(samples) // len(prompts)
    if stats.get("ess") is not None and entry.density is None:
        size = getattr(entry.sampler, "num_candidates", None) or entry.sampler.num_particles
        ess = float(torch.as_tensor(stats["ess"], dtype=torch.float64).mean()) / size
    else:
        log_w = (samples.log_target - samples.log_q).view(len(prompts), per_prompt)
        ess = float(ess_fraction(log_w).mean())
    return samples, {
        "ess_fraction": ess,
        "tokens_per_draw": stats["tokens"] / len(samples),
        # Model passes per response token (prompt prefills included): 1 for a one-pass policy.
        "tokens_per_response_token": stats["tokens"] / max(int(samples.lengths.sum()), 1),
        "draws_per_second": len(samples) / max(stats["seconds"], 1e-9),
        "seconds": stats["seconds"],
    }


def stratified_mean(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values [P, R]`` (R i.i.d. runs on each of P fixed prompts) and its standard error.

    The prompts are fixed, so only the run-to-run spread counts:
    ``SE = sqrt(Σ_p s_p² / R) / P`` with ``s_p²`` the unbiased variance over prompt p's runs.
    """
    values = values.double()
    runs = values.shape[1]
    if runs < 2:
        raise ValueError("a standard error needs at least 2 runs per prompt")
    se = float(values.var(1, unbiased=True).div(runs).sum().sqrt()) / values.shape[0]
    return float(values.mean()), se


def measure_smc(
    config: GeometricMixtureConfig,
    entry: Entry,
    prompts: list[list[int]],
    exact_log_z: torch.Tensor,
    logger: Any,
) -> dict[str, Any]:
    """SMC: mean |log Ẑ − log Z| per run and ESS/N, with standard errors at most ¼ of each.

    Starts with ``smc_runs`` independent runs per prompt and raises the count (up to
    ``smc_max_runs``) until both standard errors are at most a quarter of their means; a mean
    still above that floor is reported as None (dropped) with ``floor_met`` False.
    """
    sampler = entry.sampler
    runs, done = config.smc_runs, 0
    deltas, ess, tokens, seconds = [], [], 0.0, 0.0
    while True:
        new = runs - done
        repeated = [p for p in prompts for _ in range(new)]
        samples = sampler.sample(repeated, 1, generator=config.seed + done)
        log_z = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64).cpu()
        deltas.append(log_z.view(len(prompts), new) - exact_log_z[:, None])
        ess_runs = torch.as_tensor(samples.stats["ess"], dtype=torch.float64).cpu()
        ess.append(ess_runs.view(len(prompts), new) / sampler.num_particles)
        tokens += samples.stats["tokens"]
        seconds += samples.stats["seconds"]
        done = runs
        err_mean, err_se = stratified_mean(torch.cat(deltas, 1).abs())
        ess_mean, ess_se = stratified_mean(torch.cat(ess, 1))
        met = err_se <= err_mean / 4 and ess_se <= ess_mean / 4
        if met or runs >= config.smc_max_runs:
            break
        # Standard errors shrink as 1/sqrt(runs): aim below the floor with a 1.5× margin.
        ratio = max(4 * err_se / max(err_mean, 1e-300), 4 * ess_se / max(ess_mean, 1e-300))
        runs = min(config.smc_max_runs, max(2 * runs, math.ceil(runs * (1.5 * ratio) ** 2)))
    if not met:
        logger.info(
            "%s: a standard error is above a quarter of its mean after %d runs per prompt: "
            "dropped from the table and plot",
            entry.name,
            runs,
        )
    delta = torch.cat(deltas, 1)
    z_ratio, z_ratio_se = stratified_mean(delta.exp())
    return {
        "runs_per_prompt": runs,
        "floor_met": met,
        "log_z_error": err_mean if met else None,
        "log_z_error_se": err_se,
        "log_z_error_measured": err_mean,
        "log_z_error_per_prompt": delta.abs().mean(1).tolist(),
        "z_ratio_mean": z_ratio,
        "z_ratio_se": z_ratio_se,
        "ess_fraction": ess_mean if met else None,
        "ess_fraction_se": ess_se,
        "tokens_per_draw": tokens / (runs * len(prompts)),
        "draws_per_second": runs * len(prompts) / max(seconds, 1e-9),
        "seconds": seconds,
    }


def evaluate_exact(
    config: GeometricMixtureConfig,
    init: Policy,
    cap: int,
    alpha: float,
    entries: list[Entry],
    components: list[tuple[Any, Any]],
    prompts: list[list[int]],
    logger: Any,
) -> list[dict[str, Any]]:
    """Every sampler's error to the enumerated target on ``prompts`` (see the module docstring)."""
    unnormalized = [
        (1 - alpha) * base.logprobs + alpha * shifted.logprobs for base, shifted in components
    ]
    target_logprobs = [torch.log_softmax(g, 0) for g in unnormalized]
    # Exact log Z of each prompt's target (the components' enumerations are normalized).
    exact_log_z = torch.stack([torch.logsumexp(g, 0) for g in unnormalized])

    enumerated: dict[int, list[torch.Tensor]] = {}

    def law_of(density: Density) -> list[torch.Tensor]:
        """The density's enumerated log-probabilities on each prompt (computed once)."""
        if id(density) not in enumerated:
            if density is init:  # π_t itself: its enumeration is already there
                enumerated[id(density)] = [shifted.logprobs for _, shifted in components]
            else:
                laws = []
                for prompt, (base, _) in zip(prompts, components, strict=True):
                    q = exact_distribution(density, prompt, cap)
                    if q.responses != base.responses:
                        raise RuntimeError("enumeration orders differ; cannot align supports")
                    laws.append(q.logprobs)
                enumerated[id(density)] = laws
        return enumerated[id(density)]

    # SIR's exact laws: every K of one proposal in one pass per prompt.
    sir_laws: dict[tuple[int, int], list[Any]] = {}
    wanted: dict[int, tuple[Density, list[int]]] = {}
    for entry in entries:
        if entry.kind == "sir":
            wanted.setdefault(id(entry.proposal), (entry.proposal, []))[1].append(
                entry.num_candidates
            )
    for key, (proposal, ks) in wanted.items():
        proposal_laws = law_of(proposal)
        t0 = time.perf_counter()
        per_prompt = [
            sir_output_laws(q_lp, g, ks, rtol=config.sir_rtol)
            for q_lp, g in zip(proposal_laws, unnormalized, strict=True)
        ]
        for j, k in enumerate(ks):
            sir_laws[(key, k)] = [laws[j] for laws in per_prompt]
        logger.debug(
            "α=%s: SIR laws K=%s on %d prompts in %.1f s",
            alpha,
            ks,
            len(prompts),
            time.perf_counter() - t0,
        )

    rows = []
    for entry in entries:
        started = time.perf_counter()
        row: dict[str, Any] = {"name": entry.name, "alpha": alpha, "budget": entry.budget}
        if entry.kind == "smc":
            row.update(measure_smc(config, entry, prompts, exact_log_z, logger))
            row.update(measure="smc", tv=None, kl=None)
            rows.append(row)
            logger.debug("α=%s %s: %.1f s", alpha, entry.name, time.perf_counter() - started)
            continue
        samples, drawn = _draw(entry, prompts, config.draws, config.seed)
        row.update(drawn)
        if entry.kind == "density":
            laws = law_of(entry.density)
            precision = 0.0
            measure = "exact"
        else:
            found = sir_laws[(id(entry.proposal), entry.num_candidates)]
            laws = [law.logprobs for law in found]
            precision = max(law.precision for law in found)
            measure = "exact SIR law"
        tvs, kls, exact_ess = [], [], []
        for target_lp, q_lp in zip(target_logprobs, laws, strict=True):
            d = divergences(target_lp, q_lp)
            tvs.append(d["tv"])
            kls.append(d["kl_pq"])
            # ESS/N as N → ∞: 1 / E_q[(p/q)²] = 1 / Σ p²/q, exact from the enumeration.
            exact_ess.append(float(torch.exp(-torch.logsumexp(2 * target_lp - q_lp, 0))))
        if entry.kind == "density":
            row["ess_fraction_sampled"] = row["ess_fraction"]
            row["ess_fraction"] = sum(exact_ess) / len(exact_ess)
        else:
            # SIR's sampled ESS/K and log Ẑ (24 draws: kept in results.json, not in the table).
            row["ess_fraction_sampled"] = row.pop("ess_fraction")
            row["ess_fraction"] = None
            estimate = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64).cpu()
            row["log_z_error_sampled"] = float((estimate - exact_log_z).abs().mean())
        row.update(
            measure=measure,
            tv=sum(tvs) / len(tvs),
            kl=sum(kls) / len(kls),
            tv_per_prompt=tvs,
            kl_per_prompt=kls,
            law_precision=precision,
        )
        logger.debug("α=%s %s: %.1f s", alpha, entry.name, time.perf_counter() - started)
        rows.append(row)
    return rows


def evaluate_estimated(
    config: GeometricMixtureConfig,
    alpha: float,
    entries: list[Entry],
    prompts: list[list[int]],
) -> list[dict[str, Any]]:
    """Real models: ESS, log Ẑ and (for samplers with a density) the ELBO gap KL(q‖target)."""
    rows, log_z_best = [], None
    drawn = []
    for entry in entries:
        samples, row = _draw(entry, prompts, config.draws, config.seed)
        drawn.append((entry, samples, row))
        if entry.density is None and samples.stats.get("log_z") is not None:
            log_z = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64)
            if entry.name.startswith("SMC"):
                log_z_best = log_z  # the largest SMC comes last among SMC entries
    for entry, samples, row in drawn:
        elbo_gap = None
        if entry.density is not None and log_z_best is not None:
            log_w = (samples.log_target - samples.log_q).double().view(len(prompts), -1)
            elbo_gap = float((log_z_best - log_w.mean(1)).mean())
        log_z = samples.stats.get("log_z")
        row.update(
            name=entry.name,
            alpha=alpha,
            budget=entry.budget,
            measure="estimated",
            tv=None,
            kl=None,
            elbo_gap=elbo_gap,
            log_z=None if log_z is None else float(torch.as_tensor(log_z).double().mean()),
        )
        rows.append(row)
    return rows


# -- output ---------------------------------------------------------------------------------------

EXACT_MEASURES = ("exact", "exact SIR law")


def _num(value: Any, width: int, digits: int, style: str = "f") -> str:
    """``value`` right-aligned; style "f" (``digits`` decimals) or "g" (``digits`` significant)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if style == "g":
        return f"{value:>#{width}.{digits}g}"
    return f"{value:>{width}.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as fixed-width text: exact laws, then SMC, then estimates (real models)."""
    blocks = []
    exact = [r for r in rows if r["measure"] in EXACT_MEASURES]
    if exact:
        header = (
            f"{'α':>5} {'sampler':<20} {'law':<13} {'TV':>9} {'KL(p‖q)':>9} {'ESS/N':>6} "
            f"{'tok/draw':>9} {'draws/s':>8}"
        )
        lines = ["Exact laws (TV and KL(target‖sampler) from the enumerated law; ESS/N as N → ∞)"]
        lines += [header, "-" * len(header)]
        for row in exact:
            lines.append(
                f"{row['alpha']:>5g} {row['name']:<20} {row['measure']:<13} "
                f"{_num(row['tv'], 9, 3, 'g')} {_num(row['kl'], 9, 3, 'g')} "
                f"{_num(row['ess_fraction'], 6, 3)} "
                f"{_num(row['tokens_per_draw'], 9, 1)} {_num(row['draws_per_second'], 8, 0)}"
            )
        sir = [r["law_precision"] for r in exact if r["measure"] == "exact SIR law"]
        if sir:
            lines.append(
                f"SIR laws: relative precision ≤ {max(sir):.1e} per response, so their TV and KL "
                "are exact to that"
            )
        blocks.append("\n".join(lines))
    smc = [r for r in rows if r["measure"] == "smc"]
    if smc:
        header = (
            f"{'α':>5} {'sampler':<20} {'runs':>5} {'|ΔlogZ|':>9} {'± SE':>8} {'ESS/N':>6} "
            f"{'± SE':>6} {'Ẑ/Z':>6} {'± SE':>6} {'tok/draw':>9} {'draws/s':>8}"
        )
        lines = [
            "SMC (no computable law): |log Ẑ − log Z| per run against the enumerated log Z, and "
            "the final ESS/N; mean over runs × prompts ± standard error"
        ]
        lines += [header, "-" * len(header)]
        for row in smc:
            line = (
                f"{row['alpha']:>5g} {row['name']:<20} {row['runs_per_prompt']:>5d} "
                f"{_num(row['log_z_error'], 9, 3, 'g')} {_num(row['log_z_error_se'], 8, 2, 'g')} "
                f"{_num(row['ess_fraction'], 6, 3)} {_num(row['ess_fraction_se'], 6, 3)} "
                f"{_num(row['z_ratio_mean'], 6, 3)} {_num(row['z_ratio_se'], 6, 3)} "
                f"{_num(row['tokens_per_draw'], 9, 1)} {_num(row['draws_per_second'], 8, 0)}"
            )
            if not row["floor_met"]:
                line += "  dropped: a standard error above ¼ of its mean"
            lines.append(line)
        blocks.append("\n".join(lines))
    estimated = [r for r in rows if r["measure"] == "estimated"]
    if estimated:
        header = (
            f"{'α':>5} {'sampler':<20} {'ELBO gap':>9} {'log Ẑ':>9} {'ESS/N':>6} "
            f"{'tok/draw':>9} {'draws/s':>8}"
        )
        lines = ["Estimates (nothing enumerable): ELBO gap ≈ KL(q‖target) with log Z from SMC"]
        lines += [header, "-" * len(header)]
        for row in estimated:
            lines.append(
                f"{row['alpha']:>5g} {row['name']:<20} {_num(row.get('elbo_gap'), 9, 4)} "
                f"{_num(row.get('log_z'), 9, 4)} {_num(row['ess_fraction'], 6, 3)} "
                f"{_num(row['tokens_per_draw'], 9, 1)} {_num(row['draws_per_second'], 8, 0)}"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _family(name: str) -> str:
    """Series a row belongs to in the plot: SIR from q_loc, SIR from the GFlowNet, or itself."""
    if name.startswith("SIR(GFlowNet)"):
        return "SIR(GFlowNet)"
    return name.split(" ")[0] if name.startswith(("SIR", "SMC")) else name


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per α: exact TV and KL against model tokens per draw; SMC's |Δlog Z| in its own panel.

    Real models (nothing enumerable): the ELBO gap of samplers with a density, one panel per α.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({row["alpha"] for row in rows})
    exact_world = any(r["measure"] in EXACT_MEASURES for r in rows)
    columns = 2 if exact_world else 1
    fig, axes = plt.subplots(
        len(alphas), columns, figsize=(6.2 * columns, 4.4 * len(alphas)), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes_row, alpha in zip(axes, alphas, strict=True):
        block = [r for r in rows if r["alpha"] == alpha]
        ax = axes_row[0]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model tokens per draw")
        if exact_world:
            exact = [r for r in block if r["measure"] in EXACT_MEASURES]
            families = list(dict.fromkeys(_family(r["name"]) for r in exact))
            for i, family in enumerate(families):
                series = [r for r in exact if _family(r["name"]) == family]
                series.sort(key=lambda r: r["tokens_per_draw"])
                colour = colours[i % len(colours)]
                x = [r["tokens_per_draw"] for r in series]
                ax.plot(x, [r["tv"] for r in series], "o-", color=colour, label=family)
                positive = [(xi, r["kl"]) for xi, r in zip(x, series, strict=True) if r["kl"] > 0]
                if positive:
                    ax.plot(*zip(*positive, strict=True), "s--", color=colour, mfc="none")
                for r in series:
                    label = r["budget"] if r["name"].startswith("SIR") else ""
                    if label:
                        ax.annotate(label, (r["tokens_per_draw"], r["tv"]), fontsize=7)
            ax.set_ylabel("exact error to the target (● TV, □ KL(target‖sampler))")
            ax.set_title(f"α = {alpha:g}: exact laws")
            ax.legend(fontsize=7)
            ax2 = axes_row[1]
            smc = [r for r in block if r["measure"] == "smc" and r["floor_met"]]
            smc.sort(key=lambda r: r["tokens_per_draw"])
            if smc:
                ax2.errorbar(
                    [r["tokens_per_draw"] for r in smc],
                    [r["log_z_error"] for r in smc],
                    yerr=[r["log_z_error_se"] for r in smc],
                    fmt="o-",
                    capsize=3,
                    color=colours[len(families) % len(colours)],
                )
                for r in smc:
                    ax2.annotate(r["budget"], (r["tokens_per_draw"], r["log_z_error"]), fontsize=7)
            ax2.set_xscale("log")
            ax2.set_yscale("log")
            ax2.set_xlim(ax.get_xlim())  # the same cost axis as the exact panel
            ax2.set_xlabel("model tokens per draw")
            ax2.set_ylabel("SMC: mean |log Ẑ − log Z| per run (± SE)")
            ax2.set_title(f"α = {alpha:g}: SMC (no computable law)")
        else:
            for r in block:
                if r.get("elbo_gap") is None:
                    continue
                ax.scatter(r["tokens_per_draw"], max(r["elbo_gap"], 1e-4))
                ax.annotate(r["name"], (r["tokens_per_draw"], max(r["elbo_gap"], 1e-4)), fontsize=7)
            ax.set_ylabel("ELBO gap ≈ KL(sampler‖target)")
            ax.set_title(f"α = {alpha:g}")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# -- main ---------------------------------------------------------------------------------------


def _load_models(config: GeometricMixtureConfig, device: torch.device, logger: Any):
    """(world or None, base, π_t, train prompts, eval prompts, L)."""
    if config.model is None:
        from gfn_spin.toyworld import build_world

        started = time.perf_counter()
        world = build_world(
            world_config(config.world_specs()), cache_dir=config.world_cache, device=device
        )
        logger.info(
            "tiny world (%s) ready in %.1f s (%s)",
            " ".join(config.world_specs()),
            time.perf_counter() - started,
            world.directory,
        )
        eval_prompts = world.eval_prompts[: config.num_eval_prompts]
        return (
            world,
            world.base,
            world.shifted,
            world.train_prompts,
            eval_prompts,
            world.max_new_tokens,
        )
    base = Policy.from_pretrained(config.base, device=device)
    model = Policy.from_pretrained(config.model, device=device)
    if config.prompts_file is not None:
        prompts = read_prompts_file(config.prompts_file)
    else:
        prompts = list(DEFAULT_PROMPTS)
    train, evaluation = split_train_eval(prompts)
    return None, base, model, train, evaluation[: config.num_eval_prompts], config.max_new_tokens


def _fit(
    sampler: GFlowNetSampler,
    prompts: list,
    config: GeometricMixtureConfig,
    output_dir: Path,
    teacher: Density | None = None,
) -> dict[str, Any]:
    """Fit (or resume) one sampler, save it beside the results; its training record."""
    name = sampler.config.adapter_name
    checkpoint = None if config.checkpoint_dir is None else Path(config.checkpoint_dir) / name
    t0 = time.perf_counter()
    tokens0 = model_tokens(sampler.target, sampler.policy)
    sampler.fit(
        prompts,
        checkpoint_dir=checkpoint,
        resume=config.resume,
        progress=config.progress,
        teacher=teacher,
    )
    sampler.save(output_dir / name)
    metrics = sampler.metrics
    return {
        "parametrization": sampler.parametrization,
        "steps": sampler.config.steps,
        "seconds": time.perf_counter() - t0,
        "model_tokens": model_tokens(sampler.target, sampler.policy) - tokens0,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "empty_fraction": metrics[-1].get("empty_fraction") if metrics else None,
        "metrics": metrics,
    }


def fit_gflownets(
    config: GeometricMixtureConfig,
    target: GeometricMixture,
    model: Policy,
    train_prompts: list,
    alpha: float,
    cap: int,
    output_dir: Path,
    logger: Any,
) -> tuple[GFlowNetSampler, GFlowNetSampler | None, dict[str, Any]]:
    """The GFlowNet for one α, and its one-pass form distilled from it (when asked for)."""
    gflownet = GFlowNetSampler(target, model, config.gfn_config(alpha, cap))
    record = {"alpha": alpha, **_fit(gflownet, train_prompts, config, output_dir)}
    logger.info(
        "α=%g: GFlowNet (%s) trained %d steps in %.1f s, final loss %.4g",
        alpha,
        gflownet.parametrization,
        gflownet.config.steps,
        record["seconds"],
        record["final_loss"] if record["final_loss"] is not None else float("nan"),
    )
    onepass = None
    if config.onepass_steps > 0:
        onepass = GFlowNetSampler(target, model, config.onepass_config(alpha, cap))
        record["onepass"] = _fit(onepass, train_prompts, config, output_dir, gflownet.policy)
        logger.info(
            "α=%g: one-pass form distilled %d steps in %.1f s",
            alpha,
            onepass.config.steps,
            record["onepass"]["seconds"],
        )
    return gflownet, onepass, record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict (also written to ``output_dir/results.json``)."""
    config = parse_config(GeometricMixtureConfig, argv, description=__doc__.split("\n")[0])
    config.validate()
    device = resolve_device(config.device)
    if config.prompts_file is not None:
        read_prompts_file(config.prompts_file)  # a missing or too-short file fails before work
    root = prepare_output_dir(config.output_dir)
    # Every output of this run is published together; an older run's never sits beside them.
    with output_set(root) as output_dir:
        logger = setup_logging(output_dir, "experiments.geometric_mixture", append=False)
        results = _run(config, device, output_dir, logger)
        logger.info("results in %s", root)
    return results


def _run(
    config: GeometricMixtureConfig, device: torch.device, output_dir: Path, logger: Any
) -> dict[str, Any]:
    """Load, fit, evaluate and write every output under ``output_dir`` (the staged set)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    world, base, model, train_prompts, eval_prompts, cap = _load_models(config, device, logger)
    load_seconds = time.perf_counter() - started
    if world is not None:
        eval_prompts = [list(p) for p in eval_prompts]
    components = None
    if world is not None:
        # base and π_t are enumerated once; every α's exact target is their weighted sum.
        t0 = time.perf_counter()
        components = [
            (exact_distribution(base, p, cap), exact_distribution(model, p, cap))
            for p in eval_prompts
        ]
        for b, s in components:
            if b.responses != s.responses:
                raise RuntimeError("base and π_t enumerations are not aligned")
        logger.info(
            "enumerated base and π_t on %d eval prompts in %.1f s",
            len(eval_prompts),
            time.perf_counter() - t0,
        )

    rows: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    for alpha in config.alphas:
        target = GeometricMixture([base, model], [1 - alpha, alpha])
        gflownet, onepass, record = fit_gflownets(
            config, target, model, train_prompts, alpha, cap, output_dir, logger
        )
        training.append(record)
        entries = build_samplers(config, target, model, gflownet, cap, onepass)
        t0 = time.perf_counter()
        if world is not None:
            block = evaluate_exact(
                config, model, cap, alpha, entries, components, eval_prompts, logger
            )
        else:
            block = evaluate_estimated(config, alpha, entries, eval_prompts)
        logger.info("α=%g: evaluation in %.1f s", alpha, time.perf_counter() - t0)
        rows.extend(block)

    table = format_table(rows)
    total = time.perf_counter() - started
    print(table)
    logger.debug("\n%s", table)
    logger.info("total %.1f s", total)
    results = {
        "rows": rows,
        "training": training,
        "seconds": total,
        "load_seconds": load_seconds,
        "world": None if world is None else list(config.world_specs()),
        "sir_law_precision": max(
            (r["law_precision"] for r in rows if r["measure"] == "exact SIR law"), default=None
        ),
        "table": table,
    }
    write_results(results, output_dir, config)
    plot(rows, output_dir / "error_vs_cost.png")
    return results


if __name__ == "__main__":
    main()
