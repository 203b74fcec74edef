"""The dense-equivalent chapter: Clark et al.'s routed scaling law for the paper's models and
ours."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uncurl.config import get_profile
from uncurl.model import count_parameters
from uncurl.report import paper
from uncurl.report.style import (
    LOSS_LABEL,
    display_table,
    expert_color,
    expert_label,
    human,
    plain_axis,
    plain_values,
)


def plot_dense_equivalent(comparison: pd.DataFrame, fitted: dict, total_params: dict) -> Figure:
    """N' of the paper's backbone with X experts: its read-off values, Clark et al.'s law, a fit
    to the paper."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    e = comparison["n_expert"]
    ax.plot(e, comparison["paper"], "o", color="black", label="Sarkar et al. Fig. 2b (read off)")
    ax.plot(
        e,
        comparison["dense_equivalent"],
        "-",
        marker="s",
        markersize=4,
        color="C0",
        label="Clark et al. S-BASE: a log N' + d = log L",
    )
    ax.plot(
        e,
        comparison["effective_params"],
        "--",
        marker="^",
        markersize=4,
        color="C0",
        label="Clark et al. S-BASE: L(N', 1) = L(N, E)",
    )
    ax.plot(
        list(fitted),
        list(fitted.values()),
        ":",
        color="C3",
        label="law's form fitted to the paper's values",
    )
    ax.plot(
        list(total_params),
        list(total_params.values()),
        "-",
        color="0.6",
        linewidth=1,
        label=f"total parameters of {human(paper.BACKBONE_PARAMS)}+Xe",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_axis(ax.xaxis)
    plain_axis(ax.yaxis, human)
    ax.set_xlabel("experts per MoE layer, X")
    ax.set_ylabel("dense parameters N' (log scale)")
    ax.legend(fontsize="small")
    return fig


def plot_fixed_size_fit(
    models: pd.DataFrame, fit, ratios: pd.DataFrame, clark_ratio: dict, law
) -> Figure:
    """Our models: the fit of log L on log Ê (left) and the implied N'/N (right)."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    grid = np.geomspace(1, models["n_expert"].max(), 100)
    s = np.log10(law.saturate(grid))
    y, lo, hi = fit.predict(s)
    left.plot(grid, 10**y, color="C3", label="fit: log L = alpha + beta log Ê")
    left.fill_between(grid, 10**lo, 10**hi, color="C3", alpha=0.2, label="95% band")
    for row in models.itertuples():
        left.scatter(row.n_expert, row.val_loss, color=expert_color(row.n_expert), s=40, zorder=3)
    left.set_xscale("log", base=2)
    plain_axis(left.xaxis)
    left.set_xlabel("experts per MoE layer")
    left.set_ylabel(LOSS_LABEL)
    left.legend(fontsize="small")
    left.set_title("(a) final loss of our models")
    right.plot(ratios["n_expert"], ratios["ratio"], marker="o", color="C3", label="our fit")
    right.fill_between(
        ratios["n_expert"],
        ratios["ratio_lo"],
        ratios["ratio_hi"],
        color="C3",
        alpha=0.2,
        label="95% interval (beta only)",
    )
    right.plot(
        list(clark_ratio),
        list(clark_ratio.values()),
        "--",
        color="C0",
        label="Clark et al. S-BASE at our size (extrapolated)",
    )
    right.axhline(1, color="black", linewidth=0.8)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    plain_axis(right.xaxis)
    plain_axis(right.yaxis)
    right.set_xlabel("experts per MoE layer")
    right.set_ylabel("dense-equivalent size N' / N (log scale)")
    right.legend(fontsize="small")
    right.set_title("(b) implied dense-equivalent size")
    return fig


def paper_model_sizes(expert_counts) -> dict[int, int]:
    """Total parameters of 354M+Xe by our own count (the `paper` profile with GPT-2's BPE)."""
    cfg = get_profile("paper")
    return {
        int(n): count_parameters(cfg.model_config(n_expert=int(n), vocab_size=paper.GPT2_VOCAB))[
            "total"
        ]
        for n in expert_counts
    }


def dense_equivalent_table(comparison: pd.DataFrame, fitted: dict, sizes: dict):
    df = pd.DataFrame(
        {
            "experts X": comparison["n_expert"],
            "total parameters (paper)": comparison["n_expert"].map(
                lambda n: human(paper.TOTAL_PARAMS[n]) if n in paper.TOTAL_PARAMS else ""
            ),
            "total parameters (our count)": comparison["n_expert"].map(lambda n: human(sizes[n])),
            "N' paper Fig. 2b": comparison["paper"].map(human),
            "N' law, a log N' + d = log L": comparison["dense_equivalent"].map(human),
            "N' law, L(N', 1) = L(N, E)": comparison["effective_params"].map(human),
            "N' form fitted to the paper": comparison["n_expert"].map(lambda n: human(fitted[n])),
        }
    )
    return display_table(df)


def ratios_table(ratios: pd.DataFrame, level: float):
    pct = f"{level:.0%}"
    df = pd.DataFrame(
        {
            "model": ratios["n_expert"].map(expert_label),
            "N' / N": ratios["ratio"],
            f"{pct} interval, low": ratios["ratio_lo"],
            f"{pct} interval, high": ratios["ratio_hi"],
        }
    )
    return display_table(df, {c: "{:.3g}" for c in df.columns[1:]})


def dense_equivalent_headline(
    comparison: pd.DataFrame,
    k: float,
    k_se: float,
    fit,
    ratios: pd.DataFrame,
    models: pd.DataFrame,
    law,
    level: float,
) -> dict:
    """The numbers and phrases of the dense-equivalent chapter."""
    row = comparison.set_index("n_expert")
    first, last = row.index.min(), row.index.max()
    n_ours = backbone_params(models)
    top = ratios.iloc[-1]
    lo, hi = fit.slope_interval(level)
    if fit.dof == 0:
        sign = "with two models the line passes through both and no interval exists"
    elif lo > 0:
        sign = "more experts raise the loss: the MoE models are worth smaller dense models"
    elif hi < 0:
        sign = "more experts lower the loss: the MoE models are worth larger dense models"
    else:
        sign = "the data cannot tell whether more experts lower or raise the loss"
    return plain_values(
        {
            "paper_first_x": int(first),
            "paper_last_x": int(last),
            "paper_first_b": row.loc[first, "paper"] / 1e9,
            "law_first_b": row.loc[first, "dense_equivalent"] / 1e9,
            "epc_first_b": row.loc[first, "effective_params"] / 1e9,
            "paper_last_b": row.loc[last, "paper"] / 1e9,
            "law_last_b": row.loc[last, "dense_equivalent"] / 1e9,
            "epc_last_b": row.loc[last, "effective_params"] / 1e9,
            "e_max": law.e_max,
            "paper_k": k,
            "paper_k_se": k_se,
            "our_n_models": len(models),
            "our_dof": fit.dof,
            "our_params": human(n_ours),
            "our_beta": fit.slope,
            "our_beta_lo": lo,
            "our_beta_hi": hi,
            "our_r2": fit.r2,
            "our_resid_sd": fit.residual_sd,
            "level_pct": f"{level:.0%}",
            "dense_exponent": law.dense_exponent,
            "our_max_x": int(top["n_expert"]),
            "our_ratio_max": float(top["ratio"]),
            "our_ratio_max_lo": float(top["ratio_lo"]),
            "our_ratio_max_hi": float(top["ratio_hi"]),
            "clark_ratio_max": float(law.effective_params(n_ours, top["n_expert"]) / n_ours),
            "our_sign": sign,
            **paper.headline(),
        }
    )


def backbone_params(models: pd.DataFrame) -> float:
    """N of the law for our models: the dense model's parameter count (else the fewest active)."""
    dense = models[models["n_expert"] == 1]
    return float(dense["total_params"].iloc[0] if len(dense) else models["active_params"].min())


def clark_ratios(law, n_params: float, expert_counts) -> dict[int, float]:
    """N'/N by Clark et al.'s law (Effective Parameter Count) at one backbone size."""
    return {int(n): float(law.effective_params(n_params, n) / n_params) for n in expert_counts}
