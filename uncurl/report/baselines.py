"""The baselines chapter: the merging baselines of the paper (frequency-based merging, MC-SMoE
adapted) and newer peers (REAP, HC-SMoE with our merge and with its own, NAEE), random pruning,
and the greedy-first-layer variant, each against UNCURL on the same reduction and against the
from-scratch model."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uncurl import evaluate, intervals, layout
from uncurl.report.style import method_color, plain_values
from uncurl.report.threshold import advantages

OTHERS = (
    "greedy",
    "greedy-first",
    "freq-merge",
    "mcsmoe",
    "hcsmoe",
    "hcsmoe-tied",
    "reap",
    "naee",
    "random",
)


def over_scratch(results: list[dict]) -> pd.DataFrame:
    """Every method's advantage over the from-scratch model of its size (`advantages`)."""
    frames = [advantages(results, m).assign(method=m) for m in ("uncurl", *OTHERS)]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def over_uncurl(results: list[dict]) -> pd.DataFrame:
    """Each other method against UNCURL on the same source, target and task and paired seeds:
    the advantage (positive: the method beats UNCURL), its interval and Holm-adjusted call."""
    keys = {(r["model"]["model"], r["task"]) for r in results}
    rows = []
    for model, task in sorted(keys):
        label = layout.parse_label(model)
        if label["method"] not in OTHERS:
            continue
        uncurl = layout.model_label(label["target_n_expert"], "uncurl", label["source_n_expert"])
        if (uncurl, task) not in keys:
            continue
        seeds = sorted(_seeds(results, model, task) & _seeds(results, uncurl, task))
        metric = next(r["metric"] for r in results if r["task"] == task)
        sign, scale = (1.0, 100.0) if metric == "accuracy" else (-1.0, 1.0)
        a, b = (evaluate.score_matrix(results, m, task, seeds) for m in (model, uncurl))
        units = evaluate.score_units(results, task)
        groups = evaluate.pretrain_groups(results, model, task, seeds)
        mean, lo, hi, p = intervals.paired(sign * scale * a, sign * scale * b, units, groups=groups)
        rows.append(
            {
                "model": model,
                "method": label["method"],
                "task": task,
                "factor": label["source_n_expert"] // label["target_n_expert"],
                "seeds": len(seeds),
                "advantage": mean,
                "ci_low": lo,
                "ci_high": hi,
                "p": p,
                "verdict": intervals.verdict(lo, hi),
            }
        )
    out = pd.DataFrame(
        rows,
        columns=[
            "model",
            "method",
            "task",
            "factor",
            "seeds",
            "advantage",
            "ci_low",
            "ci_high",
            "p",
            "verdict",
        ],
    )
    if len(out):
        out["p_holm"] = intervals.holm(out["p"])
        out["verdict_holm"] = np.where(out["p_holm"] < 1 - intervals.LEVEL, out["verdict"], "=")
    return out


def _seeds(results, model, task) -> set[int]:
    return {r["seed"] for r in results if (r["model"]["model"], r["task"]) == (model, task)}


def plot(adv: pd.DataFrame) -> Figure:
    """One panel per task: every reduced model's advantage over from scratch, coloured by
    method."""
    names = sorted(adv["task"].unique())
    cols = min(3, len(names))
    rows_n = -(-len(names) // cols)
    models = list(dict.fromkeys(adv.sort_values(["factor", "model"])["model"]))
    fig = Figure(figsize=(4.2 * cols, 0.28 * len(models) * rows_n + 1.6), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False).ravel()
    for ax, task in zip(axes, names, strict=False):
        g = adv[adv["task"] == task].set_index("model").reindex(models).dropna(subset=["method"])
        y = np.arange(len(g))
        ax.errorbar(
            g["advantage"],
            y,
            xerr=[g["advantage"] - g["ci_low"], g["ci_high"] - g["advantage"]],
            fmt="none",
            ecolor="0.4",
            capsize=2,
        )
        ax.scatter(g["advantage"], y, c=[method_color(m) for m in g["method"]], zorder=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, g.index)
        ax.invert_yaxis()
        unit = "accuracy points" if g["metric"].iloc[0] == "accuracy" else "nats"
        ax.set_xlabel(f"better than from scratch by ({unit})")
        ax.set_title(task, fontsize="medium")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return fig


def headline(scratch: pd.DataFrame, uncurl: pd.DataFrame) -> dict:
    counts = uncurl["verdict_holm"].value_counts() if len(uncurl) else pd.Series(dtype=int)
    return plain_values(
        {
            "n_methods": int(scratch["method"].nunique()) if len(scratch) else 0,
            "n_against_uncurl": len(uncurl),
            "n_beat_uncurl": int(counts.get("+", 0)),
            "n_tie_uncurl": int(counts.get("=", 0)),
            "n_lose_uncurl": int(counts.get("-", 0)),
        }
    )
