"""Pick the cheapest sampler of a geometric mixture for a requested accuracy, from a pilot.

For users who want draws at a given exactness and do not want to pay for a GFlowNet where SIR
from the local product is enough, nor run SIR where it needs K in the hundreds.
:func:`choose_sampler` measures, then compares whole costs (fit included, :mod:`samplers.costs`):

1. **Pilot** (on up to ``pilot_prompts`` of the prompts): SIR from the local product with
   ``pilot_draws`` candidates, one draw per prompt. It gives ``pilot_draws`` importance
   weights per prompt, and its tokens the cost of one candidate. While the K it asks for
   (step 2) is above half its weights per prompt, it draws as many again, up to
   ``max_pilot_draws``: n weights say little about SIR with K ≫ n candidates.
2. **SIR's K** for the accuracy (the mean exact TV of one draw's law to the target, over
   prompts), by the ``rule``. K = 1 is the local product alone.

   - ``"estimate"`` (default): the smallest K whose plug-in estimate meets the accuracy
     (``sir_tv_estimates``: the exact TV of SIR's law with the proposal replaced by the
     pilot's draws). It asks for what is needed, so the choice is close to the cheapest, and
     misses the accuracy by the estimate's error: its noise, and what is left of its low bias
     where weights are heavy-tailed (the pilot's n draws miss the large weights; after the
     jackknife 2-13% of the TV at n = 16 on the tiny world's α = 0.5 pair).
   - ``"bound"``: ``sir_candidates_for``, from the pilot's ``χ² = N/ESS − 1`` through a
     bound. It meets the accuracy whenever the pilot's χ² is right, at up to 2-4 times the
     candidates needed.
3. **A GFlowNet**, when one is given, or fitted by ``fit_gflownet`` when SIR would need more
   than ``max_candidates`` and a fit may pay: its ``fit_rollouts`` draws cost at least as many
   local-product candidates, so a GFlowNet whose total is above SIR's even with that fit and
   the local product's price per draw is never fitted. A pilot of its own draws gives its
   weights and tokens per draw; its TV is predicted by the rule at K = 1 (or bounded by
   ``√(KL/2)`` from a given ``gflownet_kl``, Pinsker); SIR with it as proposal gets its K by
   the same rule. Their fit tokens are spread over ``len(prompts) × draws_per_prompt`` draws.
4. The option that meets the accuracy at the fewest total tokens per draw wins; every option
   compared comes back with its figures.

Both rules for K, the bound's derivation and their checks are in :mod:`samplers.sir_candidates`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gfn_spin.density import Density, PromptLike
from gfn_spin.devices import resolve_generator
from samplers.base import Sampler, Samples
from samplers.costs import total_tokens_per_draw
from samplers.gflownet import GFlowNetSampler
from samplers.importance import ImportanceResampler
from samplers.sir_candidates import Rule, candidates_for, proposal_tv
from samplers.weighting import ess_fraction, log_weights_by_prompt


@dataclass(frozen=True)
class SamplerOption:
    """One sampler :func:`choose_sampler` compared, with what its pilot measured.

    Attributes:
        name: "local product", "SIR K=<k>", "GFlowNet" or "SIR(GFlowNet) K=<k>".
        predicted_tv: the pilot's bound on the mean exact TV of one draw to the target.
        tokens_per_draw: model tokens per draw to sample (measured on the pilot; SIR(GFlowNet):
            K GFlowNet draws, plus K local-product candidates, the scoring pass's price, when
            its weights are not read while decoding).
        fit_tokens: model tokens of the fit it needs (0 without one).
        total_tokens_per_draw: ``tokens_per_draw`` plus the fit spread over the draws asked for.
        meets_accuracy: ``predicted_tv`` is at most the accuracy asked for.
    """

    name: str
    predicted_tv: float
    tokens_per_draw: float
    fit_tokens: int
    total_tokens_per_draw: float
    meets_accuracy: bool


@dataclass
class SamplerChoice:
    """What :func:`choose_sampler` picked and why.

    Attributes:
        sampler: the chosen sampler, ready to ``sample``.
        chosen: its :class:`SamplerOption`.
        options: every option compared, cheapest total first among those meeting the accuracy.
        ess_fraction: ``[P']`` the local product's ESS/N on each pilot prompt.
        pilot_log_weights: ``[P', n]`` its pilot's importance log-weights, n per prompt.
        pilot_tokens: model tokens the pilots spent (not in any option's totals: every option
            paid them).
        notes: what the choice did beyond the pilot (a GFlowNet fitted for it).
    """

    sampler: Sampler
    chosen: SamplerOption
    options: list[SamplerOption]
    ess_fraction: torch.Tensor
    pilot_log_weights: torch.Tensor
    pilot_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def pilot_subset(prompts: Sequence[PromptLike], size: int) -> list[PromptLike]:
    """``size`` prompts spread evenly over ``prompts`` (all of them when there are fewer)."""
    if len(prompts) <= size:
        return list(prompts)
    return [prompts[i * len(prompts) // size] for i in range(size)]


_Option = tuple[SamplerOption, Callable[[], Sampler]]


def _option(
    name: str,
    tv: float,
    tokens: float,
    fit: int,
    build: Callable[[], Sampler],
    accuracy: float,
    draws: int,
) -> _Option:
    """One candidate priced over ``draws`` draws, with the builder of its sampler."""
    total = total_tokens_per_draw(tokens, fit, draws)
    return SamplerOption(name, tv, tokens, fit, total, tv <= accuracy), build


def _gflownet_options(
    target: Density,
    gflownet: GFlowNetSampler,
    own: Samples,
    pilot_draws: int,
    fit_tokens: int,
    kl: float | None,
    per_candidate: float,
    accuracy: float,
    draws: int,
    cap: dict[str, int],
    rule: Rule,
) -> list[_Option]:
    """The GFlowNet alone and, when its pilot ``own`` (``pilot_draws`` per prompt) says one draw
    is not enough, SIR over it.

    Its own TV is Pinsker's bound from ``kl`` when known, else predicted from its pilot by
    ``rule`` at K = 1.
    """
    log_w = log_weights_by_prompt(own.log_target, own.log_q, pilot_draws)
    gfn_tokens = own.stats.tokens / len(own)
    tv = math.sqrt(kl / 2) if kl is not None else proposal_tv(log_w, rule)
    options = [_option("GFlowNet", tv, gfn_tokens, fit_tokens, lambda: gflownet, accuracy, draws)]
    k_gfn, predicted = candidates_for(log_w, accuracy, rule)
    if k_gfn > 1:
        over = ImportanceResampler(target, gflownet.policy, k_gfn, **cap)
        # weights read while decoding (a policy on the local product), else a scoring pass of
        # the components, priced as a local-product candidate
        scoring = 0.0 if over.weights_from == "decoding" else per_candidate
        options.append(
            _option(
                f"SIR(GFlowNet) K={k_gfn}",
                predicted,
                k_gfn * (gfn_tokens + scoring),
                fit_tokens,
                lambda: over,
                accuracy,
                draws,
            )
        )
    return options


def _local_pilot(
    target: Density,
    local: Density,
    subset: Sequence[PromptLike],
    sizes: tuple[int, int],
    accuracy: float,
    rule: Rule,
    cap: dict[str, int],
    generator: torch.Generator | int | None,
) -> tuple[torch.Tensor, int, int, float]:
    """The local product's pilot on ``subset``: SIR with ``sizes[0]`` candidates, one draw per
    prompt, its candidates doubled (fresh ones added) while the K the ``rule`` asks for is
    above half of them, up to ``sizes[1]`` (a pilot of n weights says little about K ≫ n: on
    the many-prompt stress world 16 weights asked for K = 51 where 87 were needed). Returns
    its ``[P, n]`` log-weights, its tokens, and K with its predicted TV."""
    generator = resolve_generator(generator, local.device)
    log_weights, tokens = torch.empty(len(subset), 0, dtype=torch.float64), 0
    more = sizes[0]
    while True:
        pilot = ImportanceResampler(target, local, more, **cap).sample(
            subset, 1, generator=generator
        )
        # [P, 1, n]: one draw of n candidates per prompt
        log_weights = torch.cat([log_weights, pilot.stats.log_weights.flatten(1)], 1)
        tokens += pilot.stats.tokens
        k, predicted = candidates_for(log_weights, accuracy, rule)
        n = log_weights.shape[1]
        if 2 * k <= n or n >= sizes[1]:
            return log_weights, tokens, k, predicted
        more = min(n, sizes[1] - n)


def _local_option(
    target: Density,
    local: Density,
    k: int,
    predicted: float,
    per_candidate: float,
    cap: dict[str, int],
    accuracy: float,
    draws: int,
) -> _Option:
    """The baseline: the local product itself (K = 1), else SIR over it with K candidates."""
    # K = 1 is the local product's own law. SIR with one candidate draws it and accumulates
    # log G̃ while decoding; an AncestralSampler with the target would score every draw in a
    # second, teacher-forced pass (twice the tokens: 2.1x on the many-prompt overlap world).
    return _option(
        "local product" if k == 1 else f"SIR K={k}",
        predicted,
        k * per_candidate,
        0,
        lambda: ImportanceResampler(target, local, k, **cap),
        accuracy,
        draws,
    )


def _checked_local_product(
    target: Density, draws_per_prompt: int, pilot_prompts: int, pilot_draws: tuple[int, int]
) -> Density:
    """The target's local product, once the settings of :func:`choose_sampler` are checked
    (``pilot_draws``: its first and largest pilot size)."""
    if draws_per_prompt < 1:
        raise ValueError(f"draws_per_prompt={draws_per_prompt} must be >= 1")
    if pilot_draws[0] < 2 or pilot_prompts < 1 or pilot_draws[1] < pilot_draws[0]:
        raise ValueError(
            f"pilot_draws={pilot_draws[0]} must be >= 2, max_pilot_draws={pilot_draws[1]} at "
            f"least that, and pilot_prompts={pilot_prompts} >= 1"
        )
    local_product = getattr(target, "local_product", None)
    if local_product is None:
        raise ValueError("choose_sampler needs a GeometricMixture target (its local product)")
    return local_product()


def choose_sampler(
    target: Density,
    prompts: Sequence[PromptLike],
    *,
    accuracy: float,
    draws_per_prompt: int,
    max_new_tokens: int,
    pilot_prompts: int = 16,
    pilot_draws: int = 16,
    max_pilot_draws: int = 256,
    max_candidates: int = 64,
    gflownet: GFlowNetSampler | None = None,
    gflownet_fit_tokens: int = 0,
    gflownet_kl: float | None = None,
    fit_gflownet: Callable[[], tuple[GFlowNetSampler, int]] | None = None,
    fit_rollouts: int = 0,
    rule: Rule = "estimate",
    generator: torch.Generator | int | None = None,
) -> SamplerChoice:
    """The cheapest sampler of ``target`` whose pilot says it reaches ``accuracy`` (module docstring).

    Args:
        target: a geometric mixture (its local product is the baseline proposal).
        prompts: the prompts the sampler will serve; pilots run on ``pilot_prompts`` of them.
        accuracy: the mean exact TV of one draw's law to the target, over prompts, wanted.
        draws_per_prompt: draws the caller will make per prompt: a fit is spread over
            ``len(prompts) × draws_per_prompt`` draws.
        max_new_tokens: the length cap L.
        pilot_prompts, pilot_draws: the pilot's size (weights per prompt: ``pilot_draws``).
        max_pilot_draws: the local product's pilot doubles its weights per prompt while the K
            it asks for is above half of them, up to this many.
        max_candidates: above this K, SIR is "in the hundreds": ``fit_gflownet`` is tried.
        gflownet: an already fitted GFlowNet to compare, with its ``gflownet_fit_tokens``.
        gflownet_kl: an exact or estimated KL between the target and the GFlowNet's law (either
            direction; it bounds the TV by Pinsker); None: predicted from its pilot by ``rule``.
        fit_gflownet: called (at most once, only when SIR needs more than ``max_candidates``
            and a fit may pay) to fit a GFlowNet; returns it and its fit's model tokens.
        fit_rollouts: responses that fit draws (steps × prompts per step × samples per
            prompt; 0: unknown), each priced at least one local-product candidate.
        rule: how the pilot's weights predict a sampler's TV (:mod:`samplers.sir_candidates`):
            ``"estimate"`` (the default: the smallest K whose plug-in estimate meets the
            accuracy, which can undershoot by the estimate's noise and where weights are
            heavy-tailed) or ``"bound"`` (up to 2-4 times the candidates needed, but the
            accuracy is met whenever the pilot's χ² is right).
        generator: seed or generator of the pilots.
    """
    local = _checked_local_product(
        target, draws_per_prompt, pilot_prompts, (pilot_draws, max_pilot_draws)
    )
    subset = pilot_subset(prompts, pilot_prompts)
    draws = len(prompts) * draws_per_prompt
    cap = {"max_new_tokens": max_new_tokens}
    log_weights, pilot_tokens, k, predicted = _local_pilot(
        target, local, subset, (pilot_draws, max_pilot_draws), accuracy, rule, cap, generator
    )
    per_candidate = pilot_tokens / log_weights.numel()
    baseline = _local_option(target, local, k, predicted, per_candidate, cap, accuracy, draws)
    options = [baseline]
    sir_total = baseline[0].total_tokens_per_draw
    notes = []
    may_pay = total_tokens_per_draw(per_candidate, fit_rollouts * per_candidate, draws) < sir_total
    if gflownet is None and fit_gflownet is not None and k > max_candidates and may_pay:
        gflownet, gflownet_fit_tokens = fit_gflownet()
        notes.append(f"fitted a GFlowNet ({gflownet_fit_tokens:,} model tokens)")
    if gflownet is not None:
        own = gflownet.sample(subset, pilot_draws, generator=generator)
        pilot_tokens += own.stats.tokens
        options += _gflownet_options(
            target,
            gflownet,
            own,
            pilot_draws,
            gflownet_fit_tokens,
            gflownet_kl,
            per_candidate,
            accuracy,
            draws,
            cap,
            rule,
        )
    options.sort(key=lambda item: (not item[0].meets_accuracy, item[0].total_tokens_per_draw))
    chosen, build = options[0]
    return SamplerChoice(
        sampler=build(),
        chosen=chosen,
        options=[option for option, _ in options],
        ess_fraction=ess_fraction(log_weights),
        pilot_log_weights=log_weights,
        pilot_tokens=pilot_tokens,
        notes=notes,
    )
