"""The threshold pruning factor: up to which factor Z/D a model pretrained with Z experts and
reduced to D beats the D-expert model trained from scratch, for each pretraining expert count.

A reduced model beats its reference on a task when its advantage (accuracy above, or loss
below, the reference's) is positive. A factor is won when the reduction wins more than half of
the tasks; the threshold of a source model is the largest factor such that it and every smaller
factor are won (1: no reduction wins). Its uncertainty comes from the same hierarchical
bootstrap as every interval (`uncurl.intervals`): each draw resamples every comparison's seeds
and units (an lm task's: blocks of windows), and the threshold is read off each draw.
"""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uncurl import evaluate, intervals, layout
from uncurl.report.style import expert_color, expert_label, listing, plain_axis, plain_values


def advantages(
    results: list[dict], method: str = "uncurl", n_boot: int = intervals.N_BOOT
) -> pd.DataFrame:
    """One row per (source Z, target D, task) of `method`: the reduced model's advantage over
    the from-scratch D-expert model on the seeds both have (accuracy points x 100 or nats, the
    sign such that positive means the reduced model is better), its interval, and the
    bootstrap draws the threshold reads."""
    groups = {(r["model"]["model"], r["task"]): r for r in results}
    rows = []
    for (model, task), r in groups.items():
        m = r["model"]
        ref = layout.model_label(m["target_n_expert"])
        if m["method"] != method or (ref, task) not in groups:
            continue
        seeds = sorted(
            {x["seed"] for x in results if (x["model"]["model"], x["task"]) == (model, task)}
            & {x["seed"] for x in results if (x["model"]["model"], x["task"]) == (ref, task)}
        )
        sign, scale = (1.0, 100.0) if r["metric"] == "accuracy" else (-1.0, 1.0)
        diff = (
            sign
            * scale
            * (
                evaluate.score_matrix(results, model, task, seeds)
                - evaluate.score_matrix(results, ref, task, seeds)
            )
        )
        boots = intervals.draws(
            diff,
            evaluate.score_units(results, task),
            n_boot=n_boot,
            groups=evaluate.pretrain_groups(results, model, task, seeds),
        )
        lo, hi = np.quantile(boots, [(1 - intervals.LEVEL) / 2, (1 + intervals.LEVEL) / 2])
        rows.append(
            {
                "model": model,
                "reference": ref,
                "task": task,
                "metric": r["metric"],
                "source_n_expert": m["source_n_expert"],
                "target_n_expert": m["target_n_expert"],
                "factor": m["source_n_expert"] // m["target_n_expert"],
                "seeds": len(seeds),
                "advantage": float(diff.mean()),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "draws": boots,
            }
        )
    return pd.DataFrame(rows)


def win_shares(adv: pd.DataFrame) -> pd.DataFrame:
    """Per (source Z, factor): the share of tasks the reduction wins, and its interval over the
    bootstrap draws."""
    rows = []
    for (z, factor), g in adv.groupby(["source_n_expert", "factor"]):
        wins = np.stack(list(g["draws"])) > 0  # (tasks, draws)
        share = wins.mean(0)
        lo, hi = np.quantile(share, [(1 - intervals.LEVEL) / 2, (1 + intervals.LEVEL) / 2])
        rows.append(
            {
                "source_n_expert": z,
                "factor": factor,
                "tasks": len(g),
                "won": float((g["advantage"] > 0).mean()),
                "ci_low": float(lo),
                "ci_high": float(hi),
            }
        )
    return pd.DataFrame(rows)


def thresholds(adv: pd.DataFrame) -> pd.DataFrame:
    """Per source Z: the threshold pruning factor of the point estimates, and how often each
    factor is the threshold over the bootstrap draws (with the interval those draws give)."""
    rows = []
    for z, g in adv.groupby("source_n_expert"):
        factors = sorted(g["factor"].unique())
        wins = np.stack([np.stack(list(g[g["factor"] == f]["draws"])) > 0 for f in factors])
        won = wins.mean(1) > 0.5  # (factors, draws): won by more than half of the tasks
        per_draw = _largest_run(won, factors)
        point = _largest_run(
            np.array([[(g[g["factor"] == f]["advantage"] > 0).mean() > 0.5] for f in factors]),
            factors,
        )[0]
        lo, hi = np.quantile(per_draw, [(1 - intervals.LEVEL) / 2, (1 + intervals.LEVEL) / 2])
        rows.append(
            {
                "source_n_expert": int(z),
                "threshold": int(point),
                "ci_low": int(lo),
                "ci_high": int(hi),
                "factors": ", ".join(map(str, factors)),
                "p_at_least_2": float(np.mean(per_draw >= 2)),
            }
        )
    return pd.DataFrame(rows)


def per_task(adv: pd.DataFrame) -> pd.DataFrame:
    """`thresholds` of each task on its own (a factor is won when that task is)."""
    parts = [thresholds(g).assign(task=t) for t, g in adv.groupby("task")]
    columns = ["task", "source_n_expert", "threshold", "ci_low", "ci_high", "p_at_least_2"]
    return pd.concat(parts)[columns] if parts else pd.DataFrame(columns=columns)


def _largest_run(won: np.ndarray, factors: list[int]) -> np.ndarray:
    """Per column: the largest factor such that it and every smaller one are won; 1 if the
    smallest is lost."""
    prefix = np.cumprod(won, axis=0).astype(bool)  # won at this factor and every smaller one
    values = np.array(factors)[:, None] * prefix
    return np.maximum(values.max(0), 1)


def plot_advantages(adv: pd.DataFrame, shares: pd.DataFrame) -> Figure:
    """The reduced model's advantage over its from-scratch equivalent against the pruning
    factor, one line per pretraining expert count: one panel per task, and the share of tasks
    won (pooled)."""
    task_names = sorted(adv["task"].unique())
    n = len(task_names) + 1
    cols = min(3, n)
    fig = Figure(figsize=(3.6 * cols, 2.9 * -(-n // cols)), layout="constrained")
    axes = fig.subplots(-(-n // cols), cols, squeeze=False).ravel()
    for ax, task in zip(axes, task_names, strict=False):
        rows = adv[adv["task"] == task]
        for z, g in rows.groupby("source_n_expert"):
            g = g.sort_values("factor")
            ax.errorbar(
                g["factor"],
                g["advantage"],
                yerr=[g["advantage"] - g["ci_low"], g["ci_high"] - g["advantage"]],
                marker="o",
                capsize=3,
                color=expert_color(z),
                label=expert_label(z),
            )
        ax.axhline(0, color="black", linewidth=0.8)
        unit = "accuracy points" if rows["metric"].iloc[0] == "accuracy" else "nats saved"
        ax.set_ylabel("advantage")
        ax.set_title(f"{task} ({unit})", fontsize="medium")
    pooled = axes[len(task_names)]
    for z, g in shares.groupby("source_n_expert"):
        g = g.sort_values("factor")
        pooled.plot(
            g["factor"], 100 * g["won"], marker="o", color=expert_color(z), label=expert_label(z)
        )
        pooled.fill_between(
            g["factor"], 100 * g["ci_low"], 100 * g["ci_high"], color=expert_color(z), alpha=0.15
        )
    pooled.axhline(50, color="black", linewidth=0.8, linestyle="--")
    pooled.set_ylim(-5, 105)
    pooled.set_ylabel("tasks won (%)")
    pooled.set_title("pooled: share of tasks won", fontsize="medium")
    handles, labels = pooled.get_legend_handles_labels()  # below the panels: it hid points
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    for ax in axes[:n]:
        ax.set_xscale("log", base=2)
        plain_axis(ax.xaxis)
        ax.set_xlabel("pruning factor Z/D")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def table(adv: pd.DataFrame) -> pd.DataFrame:
    """Reduced against from scratch, per reduction and task: advantage [interval]."""
    df = adv.assign(
        value=[
            f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            for m, lo, hi in zip(adv["advantage"], adv["ci_low"], adv["ci_high"], strict=True)
        ]
    )
    wide = df.pivot(index=["model", "factor"], columns="task", values="value")
    return wide.reset_index().sort_values(["factor", "model"])


def headline(adv: pd.DataFrame, thr: pd.DataFrame, method: str) -> dict:
    """The numbers the chapter and the introduction paste."""
    phrase = (
        listing(
            f"{r.threshold} for {r.source_n_expert} experts ({intervals.LEVEL:.0%} interval "
            f"{r.ci_low} to {r.ci_high})"
            for r in thr.itertuples()
        )
        if len(thr)
        else "not measured (no reductions were fine-tuned)"
    )
    return plain_values(
        {
            "method": method,
            "n_reductions": int(adv["model"].nunique()) if len(adv) else 0,
            "n_tasks": int(adv["task"].nunique()) if len(adv) else 0,
            "thresholds": phrase,
            "sources": listing(str(z) for z in thr["source_n_expert"]) if len(thr) else "none",
            "answer": answer(thr),
        }
    )


def answer(thr: pd.DataFrame) -> str:
    """The reader's question answered from the thresholds: which pretrained models may be
    reduced for a task, by how much, and when to pretrain small instead."""
    if not len(thr):
        return "This build fine-tuned no reductions, so it cannot say."
    won = thr[thr["threshold"] > 1]
    if not len(won):
        return (
            "At this scale, no reduction of any pretrained model beat the model of its size "
            "trained from scratch on most tasks, even by a factor of 2: for these tasks, "
            "pretrain with the expert count you will serve rather than reduce a larger model."
        )
    reducible = listing(
        f"by {r.threshold} from {r.source_n_expert} experts" for r in won.itertuples()
    )
    return (
        f"So a model may be reduced for its task {reducible} and still beat the model of that "
        "size trained from scratch; beyond that factor, and from the other expert counts, the "
        "model pretrained with fewer experts did better."
    )


def readable(thr: pd.DataFrame) -> pd.DataFrame:
    """`thresholds` or `per_task` for the page: named columns, the interval in one."""
    interval = [f"{lo} to {hi}" for lo, hi in zip(thr["ci_low"], thr["ci_high"], strict=True)]
    df = thr.assign(interval=interval).drop(columns=["ci_low", "ci_high"])
    names = {
        "source_n_expert": "pretrained experts Z",
        "interval": f"{intervals.LEVEL:.0%} interval",
        "factors": "factors measured",
        "p_at_least_2": "draws with threshold ≥ 2",
    }
    order = [
        c
        for c in ("task", "source_n_expert", "threshold", "interval", "factors", "p_at_least_2")
        if c in df.columns
    ]
    return df[order].rename(columns=names)
