"""Exact evaluation of samplers on the tiny world, shared by the main job and the sampler studies.

For whoever compares samplers of a geometric mixture π_base^(1-α) π_t^α whose components can
be enumerated (docs/toyworld.md). Each compared sampler is an :class:`Entry`; its error is
measured with noise well below its value:

- samplers with a density (π_t, q_loc, the GFlowNet): exact TV and KL(target‖q) from their
  enumerated law, and the exact ESS/N as N → ∞, ``1/(1 + χ²(target‖q))``;
- SIR: exact TV and KL(target‖p_K) from its exact output law ``p_K``
  (:func:`gfn_spin.exact.sir_output_law`, relative precision stated in the row);
- SMC, whose law has no closed form: ``|log Ẑ − log Z|`` per run against the enumerated
  ``log Z`` and the ESS/N of its final weights, averaged over independent runs until each
  standard error is at most a quarter of its mean (:func:`measure_smc`).

With real models nothing is enumerated: :func:`evaluate_estimated` reports ESS, log Ẑ and the
ELBO gap instead. Model tokens per draw and draws per second are measured on every sampler's
own draws.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gfn_spin.density import Density
from gfn_spin.exact import ExactDistribution, divergences, exact_distribution, sir_output_laws
from gfn_spin.options import option
from gfn_spin.policy import Policy
from samplers.base import Sampler, Samples
from samplers.gflownet import GFlowNetSampler
from samplers.weighting import ess_fraction, model_tokens


@dataclass
class EvaluationConfig:
    """Settings of the exact evaluation; every study comparing samplers extends this."""

    seed: int = option(0, "Seed of training batches and of every sampler's draws.")
    draws: int = option(
        8,
        "Draws per eval prompt for every sampler except SMC: they measure model "
        "tokens per draw and draws per second (errors of samplers with a law come from that "
        "law, not from these draws).",
    )
    smc_runs: int = option(
        8, "Independent SMC runs per eval prompt (|Δlog Z| and ESS/N are averaged over them)."
    )
    smc_max_runs: int = option(
        256,
        "Most SMC runs per eval prompt: runs are raised up to this until the standard "
        "error of each reported mean is at most a quarter of it; a point still above is dropped.",
    )
    sir_rtol: float = option(
        1e-8, "Relative precision required of SIR's exact output law (per response)."
    )


Components = list[tuple[ExactDistribution, ExactDistribution]]
"""Per eval prompt, the enumerated laws of π_base and π_t (same response order)."""


def enumerate_components(
    base: Policy, model: Policy, prompts: list[list[int]], cap: int
) -> Components:
    """π_base and π_t enumerated once per prompt: every α's exact target is their weighted sum."""
    components = [
        (exact_distribution(base, p, cap), exact_distribution(model, p, cap)) for p in prompts
    ]
    for b, s in components:
        if b.responses != s.responses:
            raise RuntimeError("base and π_t enumerations are not aligned")
    return components


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


def draw(entry: Entry, prompts: list[list[int]], draws: int, seed: int) -> tuple[Any, dict]:
    """``draws`` draws per prompt from the entry's sampler: the samples, and their ESS/N
    (from the sampler's own weights for SIR/SMC, from the draws' log-weights otherwise), model
    tokens per draw and draws per second."""
    samples = entry.sampler.sample(prompts, draws, generator=seed)
    stats = samples.stats
    per_prompt = len(samples) // len(prompts)
    if entry.density is None:  # SIR or SMC: the ESS of their own weights, absolute
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
    config: EvaluationConfig,
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


class EnumeratedLaws:
    """Each density's enumerated log-probabilities on the eval prompts, computed once (π_t's
    are its component enumeration), in the components' response order."""

    def __init__(
        self, init: Policy, components: list[tuple[Any, Any]], prompts: list[list[int]], cap: int
    ) -> None:
        self.init, self.components, self.prompts, self.cap = init, components, prompts, cap
        self.laws: dict[int, list[torch.Tensor]] = {}

    def __call__(self, density: Density) -> list[torch.Tensor]:
        if id(density) not in self.laws:
            if density is self.init:  # π_t itself: its enumeration is already there
                self.laws[id(density)] = [shifted.logprobs for _, shifted in self.components]
            else:
                laws = []
                for prompt, (base, _) in zip(self.prompts, self.components, strict=True):
                    q = exact_distribution(density, prompt, self.cap)
                    if q.responses != base.responses:
                        raise RuntimeError("enumeration orders differ; cannot align supports")
                    laws.append(q.logprobs)
                self.laws[id(density)] = laws
        return self.laws[id(density)]


def sir_laws_of(
    config: EvaluationConfig,
    entries: list[Entry],
    law_of: EnumeratedLaws,
    unnormalized: list[torch.Tensor],
    alpha: float,
    logger: Any,
) -> dict[tuple[int, int], list[Any]]:
    """SIR's exact output laws per (proposal id, K) and prompt: every K of one proposal in one
    pass per prompt."""
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
            len(law_of.prompts),
            time.perf_counter() - t0,
        )
    return sir_laws


def law_errors(
    row: dict[str, Any],
    entry: Entry,
    samples: Samples,
    laws: list[torch.Tensor],
    target_logprobs: list[torch.Tensor],
    exact_log_z: torch.Tensor,
) -> tuple[list[float], list[float]]:
    """Add to ``row`` the ESS/N of one sampler (exact for a density; for SIR the sampled one,
    with its log Ẑ error); returns the TVs and KLs of its law to the target, per prompt."""
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
        # SIR's sampled ESS/K and log Ẑ (from the timing draws: kept in results.json only).
        row["ess_fraction_sampled"] = row.pop("ess_fraction")
        row["ess_fraction"] = None
        estimate = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64).cpu()
        row["log_z_error_sampled"] = float((estimate - exact_log_z).abs().mean())
    return tvs, kls


def evaluate_exact(
    config: EvaluationConfig,
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
    law_of = EnumeratedLaws(init, components, prompts, cap)
    sir_laws = sir_laws_of(config, entries, law_of, unnormalized, alpha, logger)
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
        samples, drawn = draw(entry, prompts, config.draws, config.seed)
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
        tvs, kls = law_errors(row, entry, samples, laws, target_logprobs, exact_log_z)
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
    config: EvaluationConfig,
    alpha: float,
    entries: list[Entry],
    prompts: list[list[int]],
) -> list[dict[str, Any]]:
    """Real models: ESS, log Ẑ and (for samplers with a density) the ELBO gap KL(q‖target)."""
    rows, log_z_best = [], None
    drawn = []
    for entry in entries:
        samples, row = draw(entry, prompts, config.draws, config.seed)
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


def fit_sampler(
    sampler: GFlowNetSampler,
    prompts: list,
    output_dir: Path,
    *,
    checkpoint_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    teacher: Density | None = None,
) -> dict[str, Any]:
    """Fit (or resume) one GFlowNet, save it under ``output_dir``; its training record.

    Checkpoints go to ``checkpoint_root/<adapter name>`` when a root is given.
    """
    name = sampler.config.adapter_name
    checkpoint = None if checkpoint_root is None else Path(checkpoint_root) / name
    t0 = time.perf_counter()
    tokens0 = model_tokens(sampler.target, sampler.policy)
    sampler.fit(
        prompts, checkpoint_dir=checkpoint, resume=resume, progress=progress, teacher=teacher
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
