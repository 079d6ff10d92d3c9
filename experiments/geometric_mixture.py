"""How exactly can we sample π_base^(1-α) · π_t^α?  The main job: ``python -m experiments.geometric_mixture``.

On the tiny world (DESIGN §6) every density is enumerated, so each sampler's error to the
geometric mixture is a number. For each α the job trains one GFlowNet adapter on the train
prompts (amortized), then compares on the held-out eval prompts, at stated budgets:

- ancestral sampling from π_t (what people do without a geometric sampler),
- the local product q_loc (token-level product),
- SIR from q_loc with K candidates, SMC from q_loc with N particles,
- the GFlowNet, and SIR with the GFlowNet as proposal.

Metrics per sampler, averaged over eval prompts: TV and KL(target‖sampler) — exact for
samplers with a density (their density is enumerated), empirical for SIR/SMC (their draws'
histogram, with the noise floor of as many exact draws beside it); ESS/N of the target/sampler
weights; model tokens per draw; draws per second. Output: a printed table, ``results.json``
(config, package versions, git commit), ``error_vs_cost.png`` and ``run.log`` in
``--output-dir``.

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
    parse_config,
    prepare_output_dir,
    setup_logging,
    world_config,
    write_results,
)
from gfn_spin.density import Density
from gfn_spin.exact import divergences, exact_distribution
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from samplers import AncestralSampler, ImportanceResampler, SMCSampler
from samplers.base import Sampler
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler, ess_fraction

DEFAULT_PROMPTS = ("a b", "c d a", "b b c d", "d a")


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
    world: tuple[str, ...] = ()
    """Tiny-world settings as field=value, fields of gfn_spin.toyworld.ToyWorldConfig (e.g.
    shift_rule=style sft_examples=8192: a shifted task that overlaps the base task); each
    distinct world is built once and cached."""
    prompts_file: str | None = None
    """Real models only: a text file of prompts, one per line (the last quarter is held out)."""
    max_new_tokens: int = 32
    """Real models only: the length cap L (the tiny world's cap is 7)."""
    num_eval_prompts: int = 16
    """Held-out prompts evaluated (at most the world's 16)."""
    draws: int = 24
    """Draws per eval prompt for every sampler (the empirical TV of SIR/SMC uses them; their
    noise floor is reported beside them: raise this for a finer comparison, at a cost)."""
    sir_candidates: tuple[int, ...] = (4, 16, 64)
    """K values of SIR from the local product."""
    smc_particles: tuple[int, ...] = (16, 64)
    """N values of SMC from the local product."""
    gfn_sir_candidates: int = 4
    """K of SIR with the trained GFlowNet as proposal."""
    gfn_parametrization: str = "residual"
    """GFlowNet policy: "residual" (local product + LoRA correction) or "lora" (LoRA on π_t)."""
    gfn_steps: int = 500
    """GFlowNet training steps per α."""
    gfn_learning_rate: float = 1e-3
    """GFlowNet peak learning rate (cosine decay)."""
    gfn_lora_rank: int = 32
    """GFlowNet LoRA rank."""
    gfn_prompts_per_step: int = 16
    """Prompts per GFlowNet training batch."""
    gfn_samples_per_prompt: int = 4
    """Responses per prompt per GFlowNet training batch."""
    gfn_subtb_lambda: float = 1.0
    """SubTB λ."""
    gfn_explore_prob: float = 0.0
    """Fraction of training batches sampled at a random temperature in [0.5, 2]."""
    gfn_replay_prob: float = 0.0
    """Fraction of training batches replayed from the buffer of high-reward responses."""
    checkpoint_dir: str | None = None
    """Where GFlowNet checkpoints go (one subdirectory per α); None: no checkpoints."""
    resume: bool = False
    """Resume GFlowNet training from the latest checkpoint in checkpoint_dir."""
    progress: bool = True
    """Show tqdm progress bars."""

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        world_config(self.world)  # a bad --world setting fails here, not after loading
        if not self.alphas:
            raise ValueError("alphas is empty: give at least one α")
        for name in ("draws", "num_eval_prompts", "max_new_tokens", "gfn_sir_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if any(k < 1 for k in (*self.sir_candidates, *self.smc_particles)):
            raise ValueError("sir_candidates and smc_particles must be >= 1")
        if (self.model is None) != (self.base is None):
            raise ValueError("give both --model and --base (real models), or neither (tiny world)")
        if self.model is not None and self.world:
            raise ValueError("--world sets up the tiny world; it does not apply with --model")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0")
        self.gfn_config(0.5, 7)  # validates the GFlowNet fields

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
            explore_prob=self.gfn_explore_prob,
            replay_prob=self.gfn_replay_prob,
            adapter_name=f"gflownet_alpha_{alpha:g}".replace(".", "_"),
            seed=self.seed,
        )


# -- the comparison ---------------------------------------------------------------------------


@dataclass
class Entry:
    """One sampler of the comparison; ``density`` is set when its law can be enumerated."""

    name: str
    sampler: Sampler
    density: Density | None
    budget: str


def build_samplers(
    config: GeometricMixtureConfig,
    target: GeometricMixture,
    init: Policy,
    gflownet: GFlowNetSampler,
    max_new_tokens: int,
) -> list[Entry]:
    local = target.local_product()
    cap = {"max_new_tokens": max_new_tokens}
    entries = [
        Entry("ancestral π_t", AncestralSampler(init, target=target, **cap), init, "1 draw"),
        Entry("local product", AncestralSampler(local, target=target, **cap), local, "1 draw"),
    ]
    for k in config.sir_candidates:
        entries.append(
            Entry(f"SIR K={k}", ImportanceResampler(target, local, k, **cap), None, f"K={k}")
        )
    for n in config.smc_particles:
        entries.append(Entry(f"SMC N={n}", SMCSampler(target, n, **cap), None, f"N={n}"))
    entries.append(
        Entry("GFlowNet", gflownet, gflownet.policy, f"{gflownet.config.steps} train steps")
    )
    k = config.gfn_sir_candidates
    entries.append(
        Entry(
            f"SIR(GFlowNet) K={k}",
            ImportanceResampler(target, gflownet.policy, k, **cap),
            None,
            f"K={k}",
        )
    )
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
        "draws_per_second": len(samples) / max(stats["seconds"], 1e-9),
        "seconds": stats["seconds"],
    }


def _empirical_kl(emp_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> float:
    """KL(empirical ‖ target), finite whenever draws lie in the target's support."""
    return divergences(target_logprobs, emp_logprobs)["kl_qp"]


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
    """Exact / empirical TV and KL of every sampler to the enumerated target on ``prompts``."""
    unnormalized = [
        (1 - alpha) * base.logprobs + alpha * shifted.logprobs for base, shifted in components
    ]
    target_logprobs = [torch.log_softmax(g, 0) for g in unnormalized]
    # Exact log Z of each prompt's target (the components' enumerations are normalized): SIR and
    # SMC estimate it, and |log Ẑ - log Z| separates them where 24 draws' TV cannot.
    exact_log_z = torch.stack([torch.logsumexp(g, 0) for g in unnormalized])
    generator = torch.Generator().manual_seed(config.seed)
    floor_tv, floor_kl = [], []
    for target_lp in target_logprobs:
        draws = torch.multinomial(
            target_lp.exp(), config.draws, replacement=True, generator=generator
        )
        emp = torch.bincount(draws, minlength=len(target_lp)).double().div(config.draws).log()
        floor_tv.append(divergences(target_lp, emp)["tv"])
        floor_kl.append(_empirical_kl(emp, target_lp))
    rows = []
    for entry in entries:
        started = time.perf_counter()
        samples, row = _draw(entry, prompts, config.draws, config.seed)
        tvs, kls, exact_ess = [], [], []
        responses = samples.responses()
        for i, (target_lp, (base, shifted)) in enumerate(
            zip(target_logprobs, components, strict=True)
        ):
            if entry.density is None:
                mine = responses[i * config.draws : (i + 1) * config.draws]
                emp = base.empirical_logprobs(mine)
                tvs.append(divergences(target_lp, emp)["tv"])
                kls.append(_empirical_kl(emp, target_lp))
            else:
                if entry.density is init:  # π_t itself: its enumeration is already there
                    q_lp = shifted.logprobs
                else:
                    q = exact_distribution(entry.density, prompts[i], cap)
                    if q.responses != base.responses:
                        raise RuntimeError("enumeration orders differ; cannot align supports")
                    q_lp = q.logprobs
                d = divergences(target_lp, q_lp)
                tvs.append(d["tv"])
                kls.append(d["kl_pq"])
                # ESS/N as N → ∞: 1 / E_q[(p/q)²] = 1 / Σ p²/q, exact from the enumeration.
                chi = torch.logsumexp(2 * target_lp - q_lp, 0)
                exact_ess.append(float(torch.exp(-chi)))
        exact = entry.density is not None
        if samples.stats.get("log_z") is not None:
            estimate = torch.as_tensor(samples.stats["log_z"], dtype=torch.float64).cpu()
            row["log_z_error"] = float((estimate - exact_log_z).abs().mean())
        if exact:
            row["ess_fraction_sampled"] = row["ess_fraction"]
            row["ess_fraction"] = sum(exact_ess) / len(exact_ess)
        row.update(
            name=entry.name,
            alpha=alpha,
            budget=entry.budget,
            measure="exact" if exact else "empirical",
            tv=sum(tvs) / len(tvs),
            kl=sum(kls) / len(kls),
            tv_per_prompt=tvs,
            kl_per_prompt=kls,
            noise_floor_tv=None if exact else sum(floor_tv) / len(floor_tv),
            noise_floor_kl=None if exact else sum(floor_kl) / len(floor_kl),
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


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (one block per α)."""
    header = (
        f"{'α':>5} {'sampler':<22} {'measure':<9} {'TV':>7} {'floor':>6} {'KL':>8} "
        f"{'floor':>6} {'|ΔlogZ|':>8} {'ESS/N':>6} {'tok/draw':>9} {'draws/s':>8}"
    )
    lines = [header, "-" * len(header)]

    def num(value: Any, width: int, digits: int) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'-':>{width}}"
        return f"{value:>{width}.{digits}f}"

    for row in rows:
        kl = row.get("kl") if row.get("kl") is not None else row.get("elbo_gap")
        lines.append(
            f"{row['alpha']:>5g} {row['name']:<22} {row['measure']:<9} {num(row.get('tv'), 7, 4)} "
            f"{num(row.get('noise_floor_tv'), 6, 3)} {num(kl, 8, 4)} "
            f"{num(row.get('noise_floor_kl'), 6, 3)} {num(row.get('log_z_error'), 8, 4)} "
            f"{num(row['ess_fraction'], 6, 3)} "
            f"{num(row['tokens_per_draw'], 9, 1)} {num(row['draws_per_second'], 8, 0)}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Error (TV, or ELBO gap for real models) against model tokens per draw, one panel per α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({row["alpha"] for row in rows})
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4.2), squeeze=False)
    for ax, alpha in zip(axes[0], alphas, strict=True):
        for row in (r for r in rows if r["alpha"] == alpha):
            error = row.get("tv") if row.get("tv") is not None else row.get("elbo_gap")
            if error is None:
                continue
            marker = "o" if row["measure"] == "exact" else "^"
            ax.scatter(row["tokens_per_draw"], max(error, 1e-4), marker=marker)
            ax.annotate(row["name"], (row["tokens_per_draw"], max(error, 1e-4)), fontsize=7)
            if row.get("noise_floor_tv") is not None:
                ax.axhline(row["noise_floor_tv"], color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model tokens per draw")
        ax.set_ylabel("TV to target (o exact, ^ empirical; dotted: noise floor)")
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
        world = build_world(world_config(config.world), cache_dir=config.world_cache, device=device)
        logger.info(
            "tiny world ready in %.1f s (%s)", time.perf_counter() - started, world.directory
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
        lines = Path(config.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = list(DEFAULT_PROMPTS)
    held = max(1, len(prompts) // 4)
    train, evaluation = prompts[:-held] or prompts, prompts[-held:]
    return None, base, model, train, evaluation[: config.num_eval_prompts], config.max_new_tokens


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict (also written to ``output_dir/results.json``)."""
    config = parse_config(GeometricMixtureConfig, argv, description=__doc__.split("\n")[0])
    config.validate()
    output_dir = prepare_output_dir(config.output_dir)
    if config.prompts_file is not None and not Path(config.prompts_file).is_file():
        raise FileNotFoundError(f"prompts_file={config.prompts_file!r} is not a file")
    logger = setup_logging(output_dir, "experiments.geometric_mixture")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if config.device == "auto"
        else config.device
    )
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    world, base, model, train_prompts, eval_prompts, cap = _load_models(config, device, logger)
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
        gfn_config = config.gfn_config(alpha, cap)
        gflownet = GFlowNetSampler(target, model, gfn_config)
        t0 = time.perf_counter()
        tokens0 = gflownet.policy.tokens_evaluated + target.tokens_evaluated
        checkpoint = None
        if config.checkpoint_dir is not None:
            checkpoint = Path(config.checkpoint_dir) / gfn_config.adapter_name
        gflownet.fit(
            train_prompts, checkpoint_dir=checkpoint, resume=config.resume, progress=config.progress
        )
        train_seconds = time.perf_counter() - t0
        train_tokens = gflownet.policy.tokens_evaluated + target.tokens_evaluated - tokens0
        last = gflownet.metrics[-1] if gflownet.metrics else {}
        logger.info(
            "α=%g: GFlowNet (%s) trained %d steps in %.1f s, final loss %.4g",
            alpha,
            gfn_config.parametrization,
            gfn_config.steps,
            train_seconds,
            last.get("loss", float("nan")),
        )
        training.append(
            {
                "alpha": alpha,
                "seconds": train_seconds,
                "model_tokens": train_tokens,
                "steps": gfn_config.steps,
                "metrics": gflownet.metrics,
            }
        )
        gflownet.save(output_dir / gfn_config.adapter_name)
        entries = build_samplers(config, target, model, gflownet, cap)
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
    logger.info("total %.1f s; results in %s", total, output_dir)
    results = {"rows": rows, "training": training, "seconds": total, "table": table}
    write_results(results, output_dir, config)
    plot(rows, output_dir / "error_vs_cost.png")
    return results


if __name__ == "__main__":
    main()
