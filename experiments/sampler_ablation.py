"""Which sampler settings matter?  ``python -m experiments.sampler_ablation`` (issue 4, item 4).

Target: the geometric mixture π_base^(1-α) π_t^α of the tiny world (DESIGN §6), enumerated
exactly on a few held-out eval prompts. Sections (each behind a flag):

- **sweep**: SIR over K and SMC over N (empirical TV/KL from their draws, with the noise floor
  of as many exact draws), then GFlowNet settings varied one at a time around a base setting
  (training steps, SubTB λ, weighting, exploration, replay, LoRA rank, parametrization), each
  measured by exact TV and KL(target‖policy) of its enumerated policy;
- **torchgfn** (``--torchgfn``): an external baseline, a GFlowNet trained with torchgfn's own
  SubTBGFlowNet (default weighting) on a DiscreteEnv over the token sequences of ONE prompt,
  against ours on the same prompt at an equal number of target evaluations (scored responses);
- **amortization** (``--amortization``): is the GFlowNet's remaining error a matter of
  training steps, or of one adapter fitting many prompts? The base setting (constant learning
  rate) is fitted on the train prompts and, as a non-amortized reference, on the eval prompts
  themselves; exact TV after each of ``amortization_steps``, on the eval prompts and (for the
  amortized fit) on as many train prompts;
- **large** (``--large``): two random-init Llama models (vocabulary ≥ 256, cap ≥ 32, the
  second a perturbed copy of the first), which cannot be enumerated: ESS per model token of
  SIR, SMC and a briefly trained GFlowNet, and the GFlowNet's KL(q‖target) =
  E_q[log q − log G̃] + log Z with log Z from a large SMC run.

Output in ``--output-dir``: ``ablation.csv`` (one row per measurement), ``results.json``
(config, versions, git commit, rows), ``ablation.png``, ``run.log``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from experiments.common import (
    parse_config,
    parse_overrides,
    prepare_output_dir,
    setup_logging,
    world_config,
    write_results,
)
from experiments.geometric_mixture import Entry, evaluate_exact
from gfn_spin.exact import (
    ExactDistribution,
    divergences,
    exact_distribution,
    response_alphabet,
)
from gfn_spin.io import write_text_atomic
from gfn_spin.mixtures import GeometricMixture
from gfn_spin.policy import Policy
from gfn_spin.samples import pad_responses
from samplers import ImportanceResampler, SMCSampler
from samplers.gflownet import GFlowNetConfig, GFlowNetSampler

CSV_COLUMNS = (
    "section",
    "alpha",
    "name",
    "setting",
    "measure",
    "tv",
    "noise_floor_tv",
    "kl",
    "ess_fraction",
    "tokens_per_draw",
    "train_steps",
    "train_seconds",
    "target_evaluations",
    "log_z_error",
    "ess_per_token",
    "kl_q_target",
    "elbo",
    "log_z_spread",
)


@dataclass
class SamplerAblationConfig:
    """Sweep sampler settings on the tiny world; optional torchgfn and large-model sections."""

    output_dir: str = "outputs/sampler_ablation"
    """Directory for ablation.csv, results.json, ablation.png and run.log."""
    quick: bool = False
    """Small budgets everywhere (≤ 2 min on 2 CPU cores): overrides the sizes below."""
    alphas: tuple[float, ...] = (0.5,)
    """Values of α; the target is GeometricMixture([base, π_t], [1-α, α])."""
    seed: int = 0
    """Seed of every training run and every sampler's draws."""
    threads: int = 1
    """CPU threads for torch (the tiny models run fastest single-threaded; 0: torch's default)."""
    world_cache: str | None = None
    """Cache directory of the tiny world (default $GFN_SPIN_CACHE or ~/.cache/gfn_spin)."""
    world: tuple[str, ...] = ()
    """Tiny-world settings as field=value, fields of gfn_spin.toyworld.ToyWorldConfig (e.g.
    shift_rule=style sft_examples=8192: a shifted task that overlaps the base task); each
    distinct world is built once and cached."""
    num_eval_prompts: int = 4
    """Held-out prompts whose target is enumerated (each has 21,845 responses at L=7)."""
    draws: int = 64
    """Draws per eval prompt of SIR/SMC (their TV is empirical; the noise floor is reported)."""
    sir_candidates: tuple[int, ...] = (1, 4, 16, 64)
    """K values of SIR from the local product (K=1 is the local product itself)."""
    smc_particles: tuple[int, ...] = (4, 16, 64)
    """N values of SMC from the local product."""
    smc_runs: int = 8
    """Independent SMC runs per eval prompt (|Δlog Z| and ESS/N are averaged over them)."""
    smc_max_runs: int = 256
    """Most SMC runs per eval prompt: raised up to this until each standard error is at most a
    quarter of its mean; a point still above is dropped."""
    sir_rtol: float = 1e-8
    """Relative precision required of SIR's exact output law (per response)."""
    gfn_base: tuple[str, ...] = (
        "parametrization=twist",
        "steps=200",
        "learning_rate=3e-3",
        "prompts_per_step=32",
        "twist_updates=8",
        "explore_prob=0",
    )
    """GFlowNetConfig overrides of the base setting, as field=value (tuples as low:high)."""
    gfn_variants: tuple[str, ...] = (
        "steps=600",
        "twist_updates=1",
        "loss=log_variance",
        "loss=tb",
        "termination_gradient=anchor",
        "subtb_lambda=0.5",
        "weighting=geometric_within",
        "explore_prob=0.667",
        "replay_prob=0.3",
        "reward_temperature_start=2",
        "twist_width=64",
        "parametrization=residual,learning_rate=1e-3,prompts_per_step=16",
        "parametrization=lora,learning_rate=1e-3,prompts_per_step=16",
    )
    """Settings measured besides the base: each changes the base by comma-joined field=value."""
    torchgfn: bool = True
    """Run the torchgfn SubTB baseline on one eval prompt."""
    torchgfn_steps: int = 300
    """Training steps of both GFlowNets in the torchgfn comparison (64 trajectories each)."""
    amortization: bool = False
    """Run the amortization section: SubTB fitted on the train prompts and on the eval prompts,
    and the maximum-likelihood oracle (about 20 minutes at the default steps)."""
    amortization_steps: tuple[int, ...] = (500, 2000, 6000)
    """Cumulative training steps at which the amortization section measures both fits."""
    large: bool = True
    """Run the large (non-enumerable) random-Llama section."""
    large_vocab: int = 256
    """Vocabulary of the random Llama models (≥ 256)."""
    large_cap: int = 32
    """Length cap L of the large section (≥ 32)."""
    large_perturbation: float = 0.3
    """The second model's weights: w + perturbation · std(w) · noise (so the mixture is not trivial)."""
    large_sharpness: float = 20.0
    """Scale of the random LM heads (a random Llama is near-uniform; this makes it peaked)."""
    large_sir_candidates: tuple[int, ...] = (4, 16)
    """K values of SIR in the large section."""
    large_smc_particles: tuple[int, ...] = (16, 64)
    """N values of SMC in the large section."""
    large_draws: int = 16
    """Draws per held-out prompt of every sampler in the large section."""
    large_gfn_steps: int = 150
    """GFlowNet training steps in the large section."""
    large_learning_rate: float = 1e-4
    """GFlowNet peak learning rate in the large section (the sharp random heads need a small one)."""
    large_subtb_lambdas: tuple[float, ...] = (1.0, 0.5)
    """SubTB λ of the large section's GFlowNets, one trained per value (1: the published one)."""
    large_reference_particles: int = 512
    """N of the two SMC runs (two seeds) whose mean log Ẑ serves as log Z in KL(q‖target); their
    difference is reported as log_z_spread, the uncertainty of that KL."""
    progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        if not self.quick:
            return
        # --quick shrinks the sizes still at their defaults; a size given on the command line wins.
        quick = {
            "num_eval_prompts": 2,
            "draws": 32,
            "sir_candidates": (1, 4, 16),
            "smc_particles": (4, 16),
            "gfn_base": (*self.gfn_base, "steps=40"),
            "gfn_variants": ("twist_updates=1", "loss=log_variance", "parametrization=residual"),
            "torchgfn_steps": 60,
            "large_gfn_steps": 30,
            "large_reference_particles": 128,
            "amortization_steps": (100, 300),
        }
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in quick.items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def validate(self) -> None:
        """Raise on bad values before any model work."""
        world_config(self.world)  # a bad --world setting fails here, not after loading
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"alphas={self.alphas} must be non-empty values in [0, 1]")
        counts = ("num_eval_prompts", "draws", "torchgfn_steps", "large_gfn_steps", "large_draws")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.amortization_steps or min(self.amortization_steps) < 1:
            raise ValueError(f"amortization_steps={self.amortization_steps} must be >= 1")
        budgets = (*self.sir_candidates, *self.smc_particles, *self.large_sir_candidates)
        if any(k < 1 for k in (*budgets, *self.large_smc_particles)):
            raise ValueError("SIR candidates and SMC particles must be >= 1")
        if not self.large_subtb_lambdas or min(self.large_subtb_lambdas) < 0:
            raise ValueError(f"large_subtb_lambdas={self.large_subtb_lambdas} must be >= 0")
        if self.large_vocab < 256 or self.large_cap < 32:
            raise ValueError("large_vocab must be >= 256 and large_cap >= 32 (not enumerable)")
        for spec in ("", *self.gfn_variants):
            gfn_config(self, spec, 0.5, 7)  # every setting parses and validates up front


def gfn_config(
    config: SamplerAblationConfig, variant: str, alpha: float, cap: int
) -> GFlowNetConfig:
    """The base GFlowNet setting changed by ``variant`` (a unique adapter name per setting)."""
    values = {
        **parse_overrides(GFlowNetConfig, config.gfn_base),
        **parse_overrides(GFlowNetConfig, [variant]),
    }
    name = f"ablation_{alpha:g}_{variant or 'base'}"
    safe = "".join(c if c.isalnum() else "_" for c in name)
    return GFlowNetConfig(max_new_tokens=cap, seed=config.seed, adapter_name=safe, **values)


# -- section 1: the sweep on the tiny world -------------------------------------------------


def sweep(config, world, components, eval_prompts, alpha, logger, bar) -> list[dict[str, Any]]:
    """SIR/SMC over their budgets, then every GFlowNet setting, against the exact target."""
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    local = target.local_product()
    entries = [
        Entry(
            f"SIR K={k}",
            ImportanceResampler(target, local, k, max_new_tokens=cap),
            None,
            f"K={k}",
            local,
            k,
        )
        for k in config.sir_candidates
    ] + [
        Entry(f"SMC N={n}", SMCSampler(target, n, max_new_tokens=cap), None, f"N={n}")
        for n in config.smc_particles
    ]
    rows = evaluate_exact(
        config, world.shifted, cap, alpha, entries, components, eval_prompts, logger
    )
    # The draws' TV is noise-bound over 21,845 responses; log Ẑ has an exact reference.
    log_z = [
        torch.logsumexp((1 - alpha) * base.logprobs + alpha * shifted.logprobs, 0)
        for base, shifted in components
    ]
    for entry, row in zip(entries, rows, strict=True):
        row.update(section="sweep", setting=row.pop("budget"))
        if entry.kind == "sir":  # SMC's rows carry their measured |Δlog Z| already
            stats = entry.sampler.sample(eval_prompts, config.draws, generator=config.seed + 1)
            error = torch.as_tensor(stats.stats["log_z"], dtype=torch.float64) - torch.stack(log_z)
            row["log_z_error"] = float(error.abs().mean())
    bar.update(1)
    for variant in ("", *config.gfn_variants):
        gfn = gfn_config(config, variant, alpha, cap)
        gflownet = GFlowNetSampler(target, world.shifted, gfn)
        started = time.perf_counter()
        gflownet.fit(world.train_prompts, progress=False)
        seconds = time.perf_counter() - started
        entry = Entry(f"GFlowNet {variant or 'base'}", gflownet, gflownet.policy, "")
        (row,) = evaluate_exact(
            config, world.shifted, cap, alpha, [entry], components, eval_prompts, logger
        )
        row.update(
            section="sweep",
            setting=variant or "base: " + ",".join(config.gfn_base),
            train_steps=gfn.steps,
            train_seconds=seconds,
            target_evaluations=gfn.steps * gfn.prompts_per_step * gfn.samples_per_prompt,
        )
        logger.info(
            "α=%g %-45s TV %.4f KL %.4f (%d steps, %.0f s)",
            alpha, entry.name, row["tv"], row["kl"], gfn.steps, seconds,
        )  # fmt: skip
        rows.append(row)
        bar.update(1)
    return rows


# -- section 1b: one adapter for many prompts (amortization) ------------------------------


def likelihood_fit(
    sampler: GFlowNetSampler,
    prompts: list[list[int]],
    steps: int,
    generator: torch.Generator,
    exact: dict[tuple[int, ...], ExactDistribution],
) -> None:
    """The oracle, up to ``steps`` steps in all: maximum likelihood on exact target draws.

    The sampler's own policy, optimizer, batch shape, learning-rate schedule (its step count
    carries over, as in ``fit``) and clipping; only the training signal differs: each step's
    responses are exact target draws and the loss is ``-log q(y)``, an unbiased gradient of
    KL(target‖q). No training signal can do better for this parametrization, so an oracle no
    better than SubTB on held-out prompts says the limit is what one adapter can amortize, not
    the SubTB loss or its exploration. ``exact`` caches the enumerated target per prompt across
    calls (each prompt is enumerated when first drawn).
    """
    cfg = sampler.config
    while sampler.state.step < steps:
        for group in sampler.optimizer.param_groups:
            group["lr"] = sampler.learning_rate(sampler.state.step, steps)
        picks = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=generator)
        rows, responses = [], []
        for i in picks.tolist():
            key = tuple(prompts[i])
            if key not in exact:
                exact[key] = exact_distribution(sampler.target, prompts[i], cfg.max_new_tokens)
            target = exact[key]
            draws = target.sample_indices(cfg.samples_per_prompt, generator).tolist()
            rows += [list(prompts[i])] * len(draws)
            responses += [target.responses[d] for d in draws]
        ids, lengths = pad_responses(responses, cfg.max_new_tokens, sampler.init.pad_token_id)
        sampler.optimizer_step(-sampler.policy.score(rows, ids, lengths).sequence_logprob().mean())
        sampler.state.step += 1


def amortization(config, world, components, eval_prompts, alpha, logger) -> list[dict[str, Any]]:
    """The base GFlowNet setting fitted on the train prompts vs on the eval prompts themselves.

    Both fits run with a constant learning rate so that one fit is measured after each of
    ``amortization_steps`` (a cosine schedule depends on the total). If the amortized fit
    stalls while the one on 16 prompts keeps improving, and its TV on train prompts is no better
    than on held-out ones, the limit is fitting many prompts with one adapter, not steps or
    generalization. A third fit, the oracle of :func:`likelihood_fit` on the train prompts,
    tells the SubTB training signal apart from what the parametrization can amortize.
    """
    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    stride = max(1, len(world.train_prompts) // len(eval_prompts))
    train_probe = [list(p) for p in world.train_prompts[::stride][: len(eval_prompts)]]
    train_components = [
        (exact_distribution(world.base, p, cap), exact_distribution(world.shifted, p, cap))
        for p in train_probe
    ]
    measured = {"eval": (eval_prompts, components), "train": (train_probe, train_components)}
    # (name, fit prompts, oracle?, prompts measured on): the eval-prompt fit is the
    # non-amortized reference, so only its own prompts count.
    fits = (
        ("GFlowNet fit on train prompts", world.train_prompts, False, ("eval", "train")),
        ("GFlowNet fit on eval prompts", eval_prompts, False, ("eval",)),
        (
            "Likelihood fit on exact target draws (oracle) on train prompts",
            world.train_prompts,
            True,
            ("eval", "train"),
        ),
    )
    rows = []
    for fit_name, prompts, oracle, measured_on in fits:
        gfn = gfn_config(config, "lr_decay=constant", alpha, cap)
        gfn.adapter_name += "_" + "".join(c if c.isalnum() else "_" for c in fit_name.lower())
        sampler = GFlowNetSampler(target, world.shifted, gfn)
        generator, exact = torch.Generator().manual_seed(config.seed), {}
        seconds = 0.0
        for steps in sorted(config.amortization_steps):
            started = time.perf_counter()
            if oracle:
                likelihood_fit(sampler, prompts, steps, generator, exact)
            else:
                sampler.fit(prompts, steps=steps, progress=False)
            seconds += time.perf_counter() - started
            for on in measured_on:
                probe, probe_components = measured[on]
                name = f"{fit_name}, TV on {on} prompts"
                entry = Entry(name, sampler, sampler.policy, "")
                (row,) = evaluate_exact(
                    config, world.shifted, cap, alpha, [entry], probe_components, probe, logger
                )
                row.update(
                    section="amortization",
                    setting=f"{len(prompts)} fit prompts, {steps} steps",
                    train_steps=steps,
                    train_seconds=seconds,
                    # the oracle reads the enumerated target: no count of evaluations applies
                    target_evaluations=None
                    if oracle
                    else steps * gfn.prompts_per_step * gfn.samples_per_prompt,
                )
                logger.info("α=%g %s after %d steps: %.4f", alpha, name, steps, row["tv"])
                rows.append(row)
    return rows


# -- section 2: torchgfn's SubTB on one prompt ----------------------------------------------


def _token_sequence_env(target, prompt: list[int], alphabet: list[int], cap: int):
    """A torchgfn DiscreteEnv whose states are padded prefixes ``[L]`` of alphabet indices.

    Actions 0..A-1 append a symbol, action A is EOS (torchgfn's exit action, which leads to its
    sink state: the "done" flag). log_reward scores the terminal response under ``target``.
    """
    from gfn.env import DiscreteEnv
    from gfn.states import DiscreteStates

    symbols = torch.tensor(alphabet)
    n_actions = len(alphabet) + 1

    class TokenSequenceEnv(DiscreteEnv):
        def __init__(self) -> None:
            self.target_evaluations = 0
            super().__init__(
                n_actions,
                s0=torch.full((cap,), -1, dtype=torch.long),
                state_shape=(cap,),
                sf=torch.full((cap,), -2, dtype=torch.long),
            )

        def make_states_class(self) -> type[DiscreteStates]:
            class TokenStates(DiscreteStates):
                state_shape = (cap,)
                s0 = self.s0
                sf = self.sf
                make_random_states = self.make_random_states
                n_actions = self.n_actions

                def _compute_forward_masks(self) -> torch.Tensor:
                    length = (self.tensor >= 0).sum(-1)
                    masks = torch.ones((*self.batch_shape, n_actions), dtype=torch.bool)
                    masks[..., :-1] &= (length < cap)[..., None]
                    return masks

                def _compute_backward_masks(self) -> torch.Tensor:
                    # A tree: the only parent removes the last symbol.
                    length = (self.tensor >= 0).sum(-1)
                    last = self.tensor.gather(-1, (length - 1).clamp(min=0)[..., None])[..., 0]
                    masks = torch.zeros((*self.batch_shape, n_actions - 1), dtype=torch.bool)
                    rows = (length > 0).nonzero(as_tuple=True)
                    masks[(*rows, last[rows])] = True
                    return masks

            return TokenStates

        def step(self, states, actions):
            tensor = states.tensor.clone()
            length = (tensor >= 0).sum(-1, keepdim=True)
            tensor.scatter_(-1, length.clamp(max=cap - 1), actions.tensor)
            return self.States(tensor)

        def backward_step(self, states, actions):
            tensor = states.tensor.clone()
            length = (tensor >= 0).sum(-1, keepdim=True)
            tensor.scatter_(-1, (length - 1).clamp(min=0), -1)
            return self.States(tensor)

        def log_reward(self, states) -> torch.Tensor:
            tensor = states.tensor.reshape(-1, cap)
            lengths = (tensor >= 0).sum(-1)
            ids = symbols[tensor.clamp(min=0)]
            self.target_evaluations += len(tensor)
            with torch.no_grad():
                scores = target.log_prob([prompt] * len(tensor), ids, lengths)
            return scores.float().reshape(states.batch_shape)

    return TokenSequenceEnv()


def _one_hot_preprocessor(cap: int, alphabet_size: int):
    from gfn.preprocessors import Preprocessor

    class OneHotPrefix(Preprocessor):
        """States ``[..., L]`` → one-hot ``[..., L·(A+1)]`` (the extra class is padding)."""

        def __init__(self) -> None:
            super().__init__(output_dim=cap * (alphabet_size + 1))

        def preprocess(self, states) -> torch.Tensor:
            index = torch.where(states.tensor >= 0, states.tensor, alphabet_size)
            hot = torch.nn.functional.one_hot(index, alphabet_size + 1).float()
            return hot.flatten(-2)

    return OneHotPrefix()


def torchgfn_logprobs(pf, responses: list[tuple[int, ...]], alphabet: list[int], cap: int):
    """Exact log q(y) of a torchgfn forward policy for every enumerated response ``[R]``."""
    position = {token: i for i, token in enumerate(alphabet)}
    prefixes = sorted({r[:k] for r in responses for k in range(len(r) + 1)}, key=len)
    index = {p: i for i, p in enumerate(prefixes)}
    tensor = torch.full((len(prefixes), cap), -1, dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        tensor[i, : len(prefix)] = torch.tensor([position[t] for t in prefix], dtype=torch.long)
    with torch.no_grad():
        logits = pf.module(pf.preprocessor.preprocess(type("S", (), {"tensor": tensor})))
    allowed = torch.ones_like(logits, dtype=torch.bool)
    allowed[(tensor >= 0).sum(-1) == cap, :-1] = False
    step = torch.log_softmax(logits.masked_fill(~allowed, -math.inf).double(), -1)
    out = torch.empty(len(responses), dtype=torch.float64)
    for r, response in enumerate(responses):
        total = step[index[response], -1]
        for k, token in enumerate(response):
            total = total + step[index[response[:k]], position[token]]
        out[r] = total
    return out


def torchgfn_comparison(config, world, components, eval_prompts, alpha, logger):
    """torchgfn SubTB vs our GFlowNet on one eval prompt, equal target evaluations."""
    from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
    from gfn.gflownet import SubTBGFlowNet
    from gfn.utils.modules import MLP

    cap = world.max_new_tokens
    target = GeometricMixture([world.base, world.shifted], [1 - alpha, alpha])
    prompt, (base_exact, shifted_exact) = eval_prompts[0], components[0]
    target_lp = torch.log_softmax(
        (1 - alpha) * base_exact.logprobs + alpha * shifted_exact.logprobs, 0
    )
    alphabet = response_alphabet(target)
    gfn = gfn_config(config, f"steps={config.torchgfn_steps}", alpha, cap)
    batch = gfn.prompts_per_step * gfn.samples_per_prompt
    rows = []

    torch.manual_seed(config.seed)
    env = _token_sequence_env(target, prompt, alphabet, cap)
    preprocessor = _one_hot_preprocessor(cap, len(alphabet))
    width = preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(width, env.n_actions), env.n_actions, preprocessor)
    log_flow = ScalarEstimator(MLP(width, 1), preprocessor)
    gflownet = SubTBGFlowNet(pf, None, log_flow, constant_pb=True)  # tree: P_B = 1
    optimizer = torch.optim.Adam(gflownet.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in tqdm(range(config.torchgfn_steps), desc="torchgfn", disable=not config.progress):
        trajectories = gflownet.sample_trajectories(env, n=batch, save_logprobs=True)
        loss = gflownet.loss_from_trajectories(env, trajectories)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    q_lp = torchgfn_logprobs(pf, base_exact.responses, alphabet, cap)
    d = divergences(target_lp, q_lp)
    rows.append(
        {
            "section": "torchgfn",
            "alpha": alpha,
            "name": "torchgfn SubTBGFlowNet (MLP, geometric_within λ=0.9)",
            "setting": f"{config.torchgfn_steps} steps x {batch} trajectories, lr 1e-3",
            "measure": "exact",
            "tv": d["tv"],
            "kl": d["kl_pq"],
            "train_steps": config.torchgfn_steps,
            "train_seconds": seconds,
            "target_evaluations": env.target_evaluations,
        }
    )

    # Ours starts from the LMs (residual: the local product; lora: π_t), torchgfn's MLP from
    # scratch; the lora row is the nearer comparison (no local-product head start).
    for parametrization in dict.fromkeys((gfn.parametrization, "lora")):
        name = f"{gfn.adapter_name}_one_{parametrization}"
        ours = GFlowNetSampler(
            target, world.shifted, gfn, parametrization=parametrization, adapter_name=name
        )
        started = time.perf_counter()
        ours.fit([prompt], progress=config.progress)
        seconds = time.perf_counter() - started
        q = exact_distribution(ours.policy, prompt, cap)
        d = divergences(target_lp, q.logprobs)
        rows.append(
            {
                "section": "torchgfn",
                "alpha": alpha,
                "name": f"ours modified SubTB ({ours.parametrization})",
                "setting": f"{gfn.steps} steps x {batch} trajectories, base setting",
                "measure": "exact",
                "tv": d["tv"],
                "kl": d["kl_pq"],
                "train_steps": gfn.steps,
                "train_seconds": seconds,
                "target_evaluations": gfn.steps * batch,
            }
        )
    for row in rows:
        logger.info(
            "torchgfn α=%g %s: TV %.4f KL %.4f, %d target evaluations, %.0f s",
            alpha, row["name"], row["tv"], row["kl"], row["target_evaluations"],
            row["train_seconds"],
        )  # fmt: skip
    return rows


# -- section 3: a setting too large to enumerate ---------------------------------------------


def random_llama_pair(config: SamplerAblationConfig) -> tuple[Policy, Policy]:
    """Two random Llama policies: the second is the first with perturbed weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gfn_spin.toyworld import numbered_tokenizer

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


def large_setting(config: SamplerAblationConfig, logger) -> list[dict[str, Any]]:
    """ESS per model token of SIR, SMC and a GFlowNet; the GFlowNet's KL(q‖target)."""
    cap, alpha = config.large_cap, 0.5
    base, model = random_llama_pair(config)
    target = GeometricMixture([base, model], [1 - alpha, alpha])
    generator = torch.Generator().manual_seed(config.seed)
    prompts = torch.randint(2, config.large_vocab, (10, 6), generator=generator).tolist()
    train, evaluation = prompts[:8], prompts[8:]
    draws = config.large_draws
    # Two independent SMC estimates: their mean is the reference log Z, and their gap says how
    # far to trust KL = log Z − ELBO (the ELBO itself needs no reference: compare it across rows).
    references = [
        SMCSampler(target, config.large_reference_particles, max_new_tokens=cap).sample(
            evaluation, 1, generator=config.seed + offset
        )
        for offset in (0, 1)
    ]
    estimates = torch.tensor(
        [[float(z) for z in r.stats["log_z"]] for r in references], dtype=torch.float64
    )
    log_z, log_z_spread = estimates.mean(0), float((estimates[0] - estimates[1]).abs().mean())
    rows = []

    def record(name, setting, samples, size, per_draw, extra=None):
        # ``ess``: the absolute ESS of one population of ``size`` weighted proposals, which
        # cost ``per_draw`` draws' tokens (K candidates or N particles: one; GFlowNet: all).
        ess = torch.as_tensor(samples.stats["ess"], dtype=torch.float64).mean()
        tokens_per_draw = samples.stats["tokens"] / len(samples)
        row = {
            "section": "large",
            "alpha": alpha,
            "name": name,
            "setting": setting,
            "measure": "estimated",
            "ess_fraction": float(ess / size),
            "tokens_per_draw": tokens_per_draw,
            "ess_per_token": float(ess / (tokens_per_draw * per_draw)),
            **(extra or {}),
        }
        rows.append(row)

    for k in config.large_sir_candidates:
        sampler = ImportanceResampler(target, None, k, max_new_tokens=cap)
        record(
            f"SIR K={k}",
            "local product proposal",
            sampler.sample(evaluation, draws, generator=1),
            k,
            1,
        )
    for n in config.large_smc_particles:
        sampler = SMCSampler(target, n, max_new_tokens=cap)
        record(
            f"SMC N={n}",
            "local product proposal",
            sampler.sample(evaluation, draws, generator=1),
            n,
            1,
        )
    for index, subtb_lambda in enumerate(config.large_subtb_lambdas):
        gfn = gfn_config(config, f"steps={config.large_gfn_steps}", alpha, cap)
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
        # untrained (the local product for residual) once, then trained with each λ
        for steps in (0, gfn.steps) if index == 0 else (gfn.steps,):
            started = time.perf_counter()
            gflownet.fit(train, steps, progress=config.progress)
            seconds += time.perf_counter() - started
            samples = gflownet.sample(evaluation, draws, generator=1)
            elbo = torch.as_tensor(samples.stats["elbo"], dtype=torch.float64)
            samples.stats["ess"] = [e * draws for e in samples.stats["ess"]]
            record(
                f"GFlowNet {gflownet.parametrization} {steps} steps"
                + (f" λ={subtb_lambda:g}" if steps else ""),
                f"lr {gfn.learning_rate:g}, {gfn.prompts_per_step}x{gfn.samples_per_prompt} per step",
                samples,
                draws,
                draws,
                {
                    "kl_q_target": float((log_z - elbo).mean()),
                    "elbo": float(elbo.mean()),
                    "log_z_spread": log_z_spread,
                    "train_steps": steps,
                    "train_seconds": seconds,
                },
            )
    for row in rows:
        kl = (
            ""
            if row.get("kl_q_target") is None
            else f"  KL(q‖p) {row['kl_q_target']:.3f} (ELBO {row['elbo']:.3f}, log Ẑ spread "
            f"{row['log_z_spread']:.3f})"
        )
        logger.info(
            "large: %-28s ESS/N %.3f  ESS per model token %.2e  tokens/draw %.0f%s",
            row["name"], row["ess_fraction"], row["ess_per_token"], row["tokens_per_draw"], kl,
        )  # fmt: skip
    logger.info("large: log Z from SMC N=%d: %s", config.large_reference_particles, log_z.tolist())
    return rows


# -- output ---------------------------------------------------------------------------------


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    lines = [",".join(CSV_COLUMNS)]
    for row in rows:
        cells = []
        for column in CSV_COLUMNS:
            value = row.get(column)
            cells.append("" if value is None else str(value))
        lines.append(",".join(f'"{c}"' if "," in c else c for c in cells))
    write_text_atomic("\n".join(lines) + "\n", path)
    with path.open(encoding="utf-8") as handle:  # the file parses back as CSV
        assert len(list(csv.reader(handle))) == len(rows) + 1


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TV of SIR/SMC against budget, TV per GFlowNet setting, torchgfn vs ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    amortized = [r for r in rows if r["section"] == "amortization"]
    fig, axes = plt.subplots(1, 3 + bool(amortized), figsize=(17 + 5 * bool(amortized), 5))
    sweep_rows = [r for r in rows if r["section"] == "sweep"]
    for alpha in sorted({r["alpha"] for r in sweep_rows}):
        for family in ("SIR", "SMC"):
            mine = [
                r
                for r in sweep_rows
                if r["alpha"] == alpha
                and r["name"].startswith(family)
                and r.get("log_z_error") is not None  # SMC points below their noise floor
            ]
            if mine:
                axes[0].plot(
                    [int(r["setting"].split("=")[1]) for r in mine],
                    [r["log_z_error"] for r in mine],
                    "o-",
                    label=f"{family} α={alpha:g}",
                )  # fmt: skip
    axes[0].set(
        xscale="log", yscale="log", xlabel="K (SIR) or N (SMC)", ylabel="mean |log Ẑ − log Z|"
    )
    axes[0].legend(fontsize=7)
    gfn_rows = [r for r in sweep_rows if r["name"].startswith("GFlowNet")]
    labels = [f"{r['name'][9:]} α={r['alpha']:g}" for r in gfn_rows]
    axes[1].barh(range(len(gfn_rows)), [r["tv"] for r in gfn_rows])
    axes[1].set_yticks(range(len(gfn_rows)), labels, fontsize=7)
    axes[1].set(xlabel="exact TV of the GFlowNet policy")
    ext = [r for r in rows if r["section"] == "torchgfn"]
    axes[2].barh(range(len(ext)), [r["tv"] for r in ext])
    axes[2].set_yticks(
        range(len(ext)), [f"{r['name'][:28]} α={r['alpha']:g}" for r in ext], fontsize=7
    )
    axes[2].set(xlabel="exact TV, one prompt, equal target evaluations")
    for (alpha, name), group in _groups(amortized, ("alpha", "name")).items():
        axes[3].plot(
            [r["train_steps"] for r in group], [r["tv"] for r in group], "o-",
            label=name.replace("GFlowNet fit", "SubTB fit").replace(
                "Likelihood fit on exact target draws (oracle)", "oracle fit") + f" α={alpha:g}",
        )  # fmt: skip
    if amortized:
        axes[3].axhline(0.02, color="red", ls="--", lw=0.8)
        axes[3].set(xscale="log", xlabel="training steps", ylabel="exact TV")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _groups(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text: TV/KL exact for GFlowNets, |log Ẑ − log Z| for SIR/SMC, large figures."""

    def num(value: Any, spec: str = ".4f") -> str:
        return "-" if value is None or value == "" else format(value, spec)

    lines = [
        f"{'section':<9} {'α':>5} {'name':<50} {'TV':>7} {'KL':>8} {'|dlogZ|':>8} "
        f"{'ESS/N':>6} {'ESS/tok':>8} {'train s':>7}"
    ]
    for r in rows:
        kl = r.get("kl") if r.get("kl") is not None else r.get("kl_q_target")
        lines.append(
            f"{r['section']:<9} {r['alpha']:>5g} {r['name'][:50]:<50} {num(r.get('tv')):>7} "
            f"{num(kl):>8} {num(r.get('log_z_error')):>8} {num(r.get('ess_fraction'), '.3f'):>6} "
            f"{num(r.get('ess_per_token'), '.2e'):>8} {num(r.get('train_seconds'), '.0f'):>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the ablation; returns the results dict (also written to ``output_dir``)."""
    config = parse_config(SamplerAblationConfig, argv, description=__doc__.split("\n")[0])
    config.validate()
    output_dir = prepare_output_dir(config.output_dir)
    logger = setup_logging(output_dir, "experiments.sampler_ablation")
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    from gfn_spin.toyworld import build_world

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    world = build_world(world_config(config.world), cache_dir=config.world_cache)
    cap = world.max_new_tokens
    eval_prompts = [list(p) for p in world.eval_prompts[: config.num_eval_prompts]]
    components = [
        (exact_distribution(world.base, p, cap), exact_distribution(world.shifted, p, cap))
        for p in eval_prompts
    ]
    logger.info("world and enumeration ready in %.1f s", time.perf_counter() - started)
    rows: list[dict[str, Any]] = []
    csv_path = output_dir / "ablation.csv"
    units = len(config.alphas) * (2 + len(config.gfn_variants))
    with tqdm(total=units, desc="ablation", disable=not config.progress) as bar:
        for alpha in config.alphas:
            rows.extend(sweep(config, world, components, eval_prompts, alpha, logger, bar))
            write_csv(rows, csv_path)  # partial results survive an interrupted run
    if config.torchgfn:
        for alpha in config.alphas:
            rows.extend(torchgfn_comparison(config, world, components, eval_prompts, alpha, logger))
            write_csv(rows, csv_path)
    if config.amortization:
        for alpha in config.alphas:
            rows.extend(amortization(config, world, components, eval_prompts, alpha, logger))
            write_csv(rows, csv_path)
    if config.large:
        rows.extend(large_setting(config, logger))
    table = format_table(rows)
    print(table)
    logger.debug("\n%s", table)
    total = time.perf_counter() - started
    logger.info("total %.1f s; results in %s", total, output_dir)
    results = {"rows": rows, "seconds": total, "table": table}
    write_csv(rows, csv_path)
    write_results(results, output_dir, config)
    plot(rows, output_dir / "ablation.png")
    return results


if __name__ == "__main__":
    main()
