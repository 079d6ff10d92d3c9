"""The main job's outputs: the fixed-width tables and the error-against-cost figure.

For a reader of ``python -m experiments.geometric_mixture``'s output: rows are those of
:mod:`experiments.evaluation` (measure "exact", "exact SIR law", "smc" or "estimated").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from samplers.costs import format_break_even

EXACT_MEASURES = ("exact", "exact SIR law")


def _num(value: Any, width: int, digits: int, style: str = "f") -> str:
    """``value`` right-aligned; style "f" (``digits`` decimals) or "g" (``digits`` significant)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if style == "g":
        return f"{value:>#{width}.{digits}g}"
    return f"{value:>{width}.{digits}f}"


def _block(title: str, header: str, lines: list[str]) -> str:
    """One table of the comparison: its title, a header, a rule, then its rows."""
    return "\n".join([title, header, "-" * len(header), *lines])


def format_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as fixed-width text: exact laws, then SMC, then estimates (real models)."""
    blocks = []
    exact = [r for r in rows if r["measure"] in EXACT_MEASURES]
    if exact:
        lines = [
            f"{row['alpha']:>5g} {row['name']:<20} {row['measure']:<13} "
            f"{_num(row['tv'], 9, 3, 'g')} {_num(row['kl'], 9, 3, 'g')} "
            f"{_num(row['ess_fraction'], 6, 3)} "
            f"{_num(row['tokens_per_draw'], 9, 1)} {_num(row['draws_per_second'], 8, 0)}"
            for row in exact
        ]
        sir = [r["law_precision"] for r in exact if r["measure"] == "exact SIR law"]
        if sir:
            lines.append(
                f"SIR laws: relative precision ≤ {max(sir):.1e} per response, so their TV and KL "
                "are exact to that"
            )
        blocks.append(
            _block(
                "Exact laws (TV and KL(target‖sampler) from the enumerated law; ESS/N as N → ∞)",
                f"{'α':>5} {'sampler':<20} {'law':<13} {'TV':>9} {'KL(p‖q)':>9} {'ESS/N':>6} "
                f"{'tok/draw':>9} {'draws/s':>8}",
                lines,
            )
        )
    smc = [r for r in rows if r["measure"] == "smc"]
    if smc:
        lines = []
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
        blocks.append(
            _block(
                "SMC (no computable law): |log Ẑ − log Z| per run against the enumerated log Z, "
                "and the final ESS/N; mean over runs × prompts ± standard error",
                f"{'α':>5} {'sampler':<20} {'runs':>5} {'|ΔlogZ|':>9} {'± SE':>8} {'ESS/N':>6} "
                f"{'± SE':>6} {'Ẑ/Z':>6} {'± SE':>6} {'tok/draw':>9} {'draws/s':>8}",
                lines,
            )
        )
    estimated = [r for r in rows if r["measure"] == "estimated"]
    if estimated:
        blocks.append(
            _block(
                "Estimates (nothing enumerable): ELBO gap ≈ KL(q‖target) with log Z from SMC",
                f"{'α':>5} {'sampler':<20} {'ELBO gap':>9} {'log Ẑ':>9} {'ESS/N':>6} "
                f"{'tok/draw':>9} {'draws/s':>8}",
                [
                    f"{row['alpha']:>5g} {row['name']:<20} {_num(row.get('elbo_gap'), 9, 4)} "
                    f"{_num(row.get('log_z'), 9, 4)} {_num(row['ess_fraction'], 6, 3)} "
                    f"{_num(row['tokens_per_draw'], 9, 1)} {_num(row['draws_per_second'], 8, 0)}"
                    for row in estimated
                ],
            )
        )
    return "\n\n".join(blocks)


def format_cost_table(rows: list[dict[str, Any]]) -> str:
    """Total cost of every fitted sampler against its match at equal exact TV ("" if none).

    Rows are those :func:`experiments.evaluation.add_total_costs` completed: total tokens per
    draw (sampling plus the fit spread over the draws made), the cheapest sampler with no fit
    as exact, total ÷ match, and the break-even in draws per prompt.
    """
    fitted = [r for r in rows if r.get("matched")]
    if not fitted:
        return ""
    lines = [
        f"{row['alpha']:>5g} {row['name']:<20} {_num(row['tv'], 9, 3, 'g')} "
        f"{_num(row['tokens_per_draw'], 9, 1)} {row['fit_tokens']:>10,} {row['fit_draws']:>6} "
        f"{_num(row['total_tokens_per_draw'], 10, 1)}  {row['matched']['name']:<14}"
        f"{_num(row['matched']['tv'], 9, 3, 'g')} {_num(row['matched']['tokens_per_draw'], 9, 1)} "
        f"{_num(row['total_ratio'], 8, 2)} {format_break_even(row['break_even_draws_per_prompt']):>11}"
        for row in fitted
    ]
    lines.append(
        "total/draw = tok/draw + fit tokens ÷ draws; matched: the cheapest SIR from the local "
        "product (no fit) whose exact TV is at most the row's (SMC has no exact TV: not "
        "matched); break-even: draws per prompt after which the fit has paid for itself "
        "against the match"
    )
    return _block(
        "Total cost, fit included (model tokens; the fit spread over the draws made)",
        f"{'α':>5} {'sampler':<20} {'TV':>9} {'tok/draw':>9} {'fit tokens':>10} {'draws':>6} "
        f"{'total/draw':>10}  {'matched':<14}{'TV':>9} {'tok/draw':>9} {'÷ match':>8} "
        f"{'break-even':>11}",
        lines,
    )


def _family(name: str) -> str:
    """Series a row belongs to in the plot: SIR from q_loc, SIR from the GFlowNet, or itself."""
    if name.startswith("SIR(GFlowNet)"):
        return "SIR(GFlowNet)"
    return name.split(" ")[0] if name.startswith(("SIR", "SMC")) else name


def _total(row: dict[str, Any]) -> float:
    """Model tokens per draw with the fit spread over the draws made (rows without: sampling)."""
    return row.get("total_tokens_per_draw", row["tokens_per_draw"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per α: exact TV and KL against model tokens per draw, fit included (a fitted sampler's
    sampling cost alone is a hollow point joined to it); SMC's |Δlog Z| in its own panel.

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
            ax.set_xlabel(
                "model tokens per draw\n(fitted samplers: ○ sampling only, ● fit spread over "
                "the draws made)",
                fontsize=8,
            )
            families = _plot_exact_panel(ax, block, alpha, colours)
            colour = colours[families % len(colours)]
            _plot_smc_panel(axes_row[1], ax, block, alpha, colour)
        else:
            _plot_elbo_panel(ax, block, alpha)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _plot_exact_panel(ax: Any, block: list[dict[str, Any]], alpha: float, colours: list) -> int:
    """One α's exact TV and KL per sampler family against the whole cost; returns the count of
    families drawn (the next colour is SMC's)."""
    exact = [r for r in block if r["measure"] in EXACT_MEASURES]
    families = list(dict.fromkeys(_family(r["name"]) for r in exact))
    for i, family in enumerate(families):
        series = [r for r in exact if _family(r["name"]) == family]
        series.sort(key=_total)
        colour = colours[i % len(colours)]
        x = [_total(r) for r in series]
        ax.plot(x, [r["tv"] for r in series], "o-", color=colour, label=family)
        positive = [(xi, r["kl"]) for xi, r in zip(x, series, strict=True) if r["kl"] > 0]
        if positive:
            ax.plot(*zip(*positive, strict=True), "s--", color=colour, mfc="none")
        for r in series:
            label = r["budget"] if r["name"].startswith("SIR") else ""
            if r.get("fit_tokens"):
                # The sampling cost alone, hollow, joined to the total it leaves out.
                ax.plot(
                    [r["tokens_per_draw"], _total(r)],
                    [r["tv"], r["tv"]],
                    "o:",
                    color=colour,
                    mfc="none",
                    markevery=[0],
                )
                if "matched" in r:
                    even = format_break_even(r["break_even_draws_per_prompt"])
                    label = f"{label} break-even {even} draws/prompt".strip()
            if label:
                ax.annotate(label, (_total(r), r["tv"]), fontsize=7)
    ax.set_ylabel("exact error to the target (● TV, □ KL(target‖sampler))")
    ax.set_title(f"α = {alpha:g}: exact laws")
    ax.legend(fontsize=7)
    return len(families)


def _plot_smc_panel(
    ax2: Any, ax: Any, block: list[dict[str, Any]], alpha: float, colour: str
) -> None:
    """One α's SMC |Δlog Z| against its cost, on the cost axis of the exact panel ``ax``."""
    smc = [r for r in block if r["measure"] == "smc" and r["floor_met"]]
    smc.sort(key=lambda r: r["tokens_per_draw"])
    if smc:
        ax2.errorbar(
            [r["tokens_per_draw"] for r in smc],
            [r["log_z_error"] for r in smc],
            yerr=[r["log_z_error_se"] for r in smc],
            fmt="o-",
            capsize=3,
            color=colour,
        )
        for r in smc:
            ax2.annotate(r["budget"], (r["tokens_per_draw"], r["log_z_error"]), fontsize=7)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(ax.get_xlim())  # the same cost axis as the exact panel
    ax2.set_xlabel("model tokens per draw (no fit)")
    ax2.set_ylabel("SMC: mean |log Ẑ − log Z| per run (± SE)")
    ax2.set_title(f"α = {alpha:g}: SMC (no computable law)")


def _plot_elbo_panel(ax: Any, block: list[dict[str, Any]], alpha: float) -> None:
    """One α's ELBO gap per sampler with a density (real models: nothing enumerable)."""
    for r in block:
        if r.get("elbo_gap") is None:
            continue
        ax.scatter(r["tokens_per_draw"], max(r["elbo_gap"], 1e-4))
        ax.annotate(r["name"], (r["tokens_per_draw"], max(r["elbo_gap"], 1e-4)), fontsize=7)
    ax.set_ylabel("ELBO gap ≈ KL(sampler‖target)")
    ax.set_title(f"α = {alpha:g}")
