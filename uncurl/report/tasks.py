"""Tables and figures of the tasks chapter: which tasks the models learn, and how reduced models
compare with their from-scratch equivalents, every number with its bootstrap interval at
`LEVEL`."""

import tempfile

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uncurl import data, evaluate, harness, layout, tasks
from uncurl.intervals import LEVEL
from uncurl.protocol import label, study_models
from uncurl.report import paper
from uncurl.report.style import method_color


def task_table(results: list[dict], profile) -> pd.DataFrame:
    """The registry's row of every task of the profile, with the sizes its runs used and, for
    labelled tasks, chance and the majority-class share of the validation examples (and of the
    held-out ones)."""
    rows = []
    for row in tasks.registry_table():
        runs = [r for r in results if r["task"] == row["task"]]
        if row["task"] not in profile.all_tasks or not runs:
            continue
        sizes, metrics = runs[0]["sizes"], runs[0]["metrics"]
        rows.append(
            {
                **row,
                "train": sizes["train"],
                "heldout": sizes["heldout"],
                "val": sizes["val"],
                "max steps": runs[0]["params"]["finetune"]["max_steps"],
                "batch tokens": runs[0]["params"]["finetune"]["batch_tokens"],
                "chance": metrics.get("chance", np.nan),
                "majority": metrics.get("majority", np.nan),
                "heldout_majority": metrics.get("heldout_majority", np.nan),
                "appendix": row["task"] in profile.appendix_tasks,
            }
        )
    return pd.DataFrame(rows)


def from_scratch(summary: pd.DataFrame, heldout: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Labelled tasks: each from-scratch model's validation accuracy (`summary`) and held-out
    accuracy (`heldout`, `evaluate.summary` of the held-out split) against the majority-class
    baseline. A task counts as learned when the held-out interval's lower end is above the
    held-out majority share: decided on part of the training split, so that the validation
    examples, whose verdicts the decision filters, do not also choose which verdicts count."""
    columns = ["model", "task", "mean", "ci_low", "ci_high"]
    labelled = table[table["kind"] == "choice"][
        ["task", "chance", "majority", "heldout_majority", "appendix"]
    ]
    held = heldout[heldout["method"] == layout.SCRATCH][columns].rename(
        columns={c: f"heldout_{c}" for c in columns[2:]}
    )
    out = labelled.merge(summary[summary["method"] == layout.SCRATCH][columns], on="task")
    out = out.merge(held, on=["model", "task"])
    out["margin"] = out["heldout_ci_low"] - out["heldout_majority"]
    out["learned"] = out["margin"] > 0
    return out


def learned_tasks(scratch: pd.DataFrame) -> set[str]:
    """Labelled tasks that every from-scratch model learned."""
    return set(scratch.groupby("task")["learned"].all().loc[lambda s: s].index)


def readable_tasks(table: pd.DataFrame, scratch: pd.DataFrame) -> list[str]:
    """Tasks whose comparisons say something about reduction: the domain tasks and the labelled
    tasks of the main list that the from-scratch models learned."""
    learned = learned_tasks(scratch)
    return [
        t
        for t, kind, appendix in zip(table["task"], table["kind"], table["appendix"], strict=True)
        if not appendix and (kind == "lm" or t in learned)
    ]


def appendix_table(scratch: pd.DataFrame, readable: list[str]) -> pd.DataFrame:
    """Labelled tasks left out of the verdicts: the paper-like appendix tasks and any main task
    the from-scratch models did not learn, with chance, majority and their accuracy."""
    rows, accuracy = scratch[~scratch["task"].isin(readable)].copy(), f"accuracy ({LEVEL:.0%} CI)"
    rows[accuracy] = [
        interval(m, lo, hi, 100.0)
        for m, lo, hi in zip(rows["mean"], rows["ci_low"], rows["ci_high"], strict=True)
    ]
    rows["chance"], rows["majority"] = rows["chance"] * 100, rows["majority"] * 100
    return rows[["task", "model", "chance", "majority", accuracy, "learned"]]


def interval(mean: float, lo: float, hi: float, scale: float = 1.0, digits: int = 1) -> str:
    return f"{mean * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def results_table(summary: pd.DataFrame, profile) -> pd.DataFrame:
    """Model x task: accuracy (%) or validation loss, mean [interval] (seeds and examples)."""
    df = summary.copy()
    scale = np.where(df["metric"] == "accuracy", 100.0, 1.0)
    digits = np.where(df["metric"] == "accuracy", 1, 3)
    df["value"] = [
        interval(m, lo, hi, s, d)
        for m, lo, hi, s, d in zip(
            df["mean"], df["ci_low"], df["ci_high"], scale, digits, strict=True
        )
    ]
    df["task"] = [
        f"{t} ({'acc. %' if m == 'accuracy' else 'loss'})"
        for t, m in zip(df["task"], df["metric"], strict=True)
    ]
    order = [label(m) for m in study_models(profile)]
    wide = df.pivot(index="model", columns="task", values="value")
    return wide.reindex([m for m in order if m in wide.index]).reset_index()


def comparison_table(comp: pd.DataFrame) -> pd.DataFrame:
    """Reduced minus from-scratch, per task: difference [interval], the raw verdict and the
    verdict after Holm's adjustment."""
    df = comp.copy()
    scale = np.where(df["metric"] == "accuracy", 100.0, 1.0)
    df["difference"] = [
        interval(m, lo, hi, s, 1 if s > 1 else 3)
        for m, lo, hi, s in zip(df["difference"], df["ci_low"], df["ci_high"], scale, strict=True)
    ]
    df["unit"] = np.where(df["metric"] == "accuracy", "accuracy points", "loss")
    df["p"] = [f"{p:.3f}" for p in df["p"]]
    df = df.rename(columns={"verdict": "verdict (raw)", "verdict_holm": "verdict (Holm)"})
    return df[
        [
            "model",
            "reference",
            "task",
            "unit",
            "seeds",
            "difference",
            "p",
            "verdict (raw)",
            "verdict (Holm)",
        ]
    ]


def verdict_counts(comp: pd.DataFrame, readable: list[str]) -> pd.DataFrame:
    """How often each reduced model wins (+), ties (=) or loses (-) against from scratch, on the
    readable tasks, after Holm's adjustment."""
    rows = comp[comp["task"].isin(readable)]
    counts = rows.groupby(["model", "verdict_holm"]).size().unstack(fill_value=0)
    return counts.reindex(columns=["+", "=", "-"], fill_value=0).reset_index()


def plot_tasks(summary: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """One panel per task: every model's mean and interval; chance and majority marked."""
    task_order = list(table["task"])
    n = len(task_order)
    cols = min(3, n)
    models = list(dict.fromkeys(summary["model"]))
    height = 1.2 + 0.22 * len(models)  # a row per model, readable at any grid
    fig = Figure(figsize=(4.6 * cols, height * -(-n // cols)), layout="constrained")
    axes = fig.subplots(-(-n // cols), cols, squeeze=False).ravel()
    colors = {m: method_color(layout.parse_label(m)["method"]) for m in models}
    for ax, task in zip(axes[:n], task_order, strict=True):
        rows = (
            summary[summary["task"] == task]
            .set_index("model")
            .reindex(models)
            .dropna(subset=["mean"])
        )
        scale = 100.0 if rows["metric"].iloc[0] == "accuracy" else 1.0
        y = np.arange(len(rows))
        ax.errorbar(
            rows["mean"] * scale,
            y,
            fmt="none",
            ecolor="0.3",
            capsize=3,
            xerr=[
                (rows["mean"] - rows["ci_low"]) * scale,
                (rows["ci_high"] - rows["mean"]) * scale,
            ],
        )
        ax.scatter(rows["mean"] * scale, y, c=[colors[m] for m in rows.index], zorder=3)
        ax.set_yticks(y, rows.index)
        ax.invert_yaxis()
        info = table.set_index("task").loc[task]
        if info["kind"] == "choice":
            ax.axvline(info["majority"] * 100, color="0.5", ls="--", lw=1, label="majority")
            ax.axvline(info["chance"] * 100, color="0.7", ls=":", lw=1, label="chance")
            ax.set_xlabel("accuracy (%)")
        else:
            ax.set_xlabel("validation loss (lower is better)")
        ax.set_title(task + (" (appendix)" if info["appendix"] else ""), fontsize=10)
    for ax in axes[n:]:
        ax.set_visible(False)
    handles, labels = (
        axes[list(table["kind"]).index("choice")].get_legend_handles_labels()
        if "choice" in set(table["kind"])
        else ([], [])
    )
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    return fig


PAPER_ANALOG = ("e8", "e32-greedy-d8", "e32-uncurl-d8")  # 32 -> 8, the paper's first pair


def paper_table(profile) -> pd.DataFrame:
    """The paper's Table 1 rows for the models this profile fine-tunes (SuperGLUE accuracy %),
    or for its 32 -> 8 reductions when the profile has none of its models."""
    names = [label(m) for m in study_models(profile)]
    names = [n for n in names if n in paper.SUPERGLUE] or list(PAPER_ANALOG)
    df = paper.superglue(names)
    wide = df.pivot(index="model", columns="task", values="accuracy")
    return wide.reindex(names)[list(paper.SUPERGLUE_TASKS)].reset_index()


def wall_times(results: list[dict]) -> pd.Series:
    return pd.Series([r["wall_s"] for r in results])


def headline(results, table, scratch, comp, profile) -> dict:
    """The numbers the chapter's prose pastes (verdicts counted on the readable tasks only)."""
    cfg = profile.finetune_config()
    learned = learned_tasks(scratch)
    main = [t for t in profile.tasks if tasks.get_task(t).kind == "choice"]
    walls = wall_times(results)
    readable = comp[comp["task"].isin(readable_tasks(table, scratch))]
    counts = readable["verdict"].value_counts()
    adjusted = readable["verdict_holm"].value_counts()
    return {
        "n_tasks": len(table),
        "n_lm_tasks": int((table["kind"] == "lm").sum()),
        "n_labelled_tasks": int((table["kind"] == "choice").sum()),
        "n_learned": len(learned),
        "learned": ", ".join(sorted(learned)) or "none",
        "not_learned": ", ".join(
            sorted(set(table.loc[table["kind"] == "choice", "task"]) - learned)
        )
        or "none",
        "main_not_learned": ", ".join(sorted(set(main) - learned)) or "none",
        "n_runs": len(results),
        "seeds": cfg.seeds,
        "pretrain_seeds": len(profile.pretrain_seeds),
        "max_steps": cfg.max_steps,
        "lr": cfg.lr,
        "batch_tokens": cfg.batch_tokens,
        "patience": cfg.patience,
        "eval_interval": cfg.eval_interval,
        "router_warmup_steps": cfg.router_warmup_steps,
        "median_run_s": float(walls.median()),
        "total_run_min": float(walls.sum() / 60),
        "n_plus": int(counts.get("+", 0)),
        "n_equal": int(counts.get("=", 0)),
        "n_minus": int(counts.get("-", 0)),
        "n_comparisons": len(readable),
        "n_plus_holm": int(adjusted.get("+", 0)),
        "n_equal_holm": int(adjusted.get("=", 0)),
        "n_minus_holm": int(adjusted.get("-", 0)),
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "threads": cfg.threads,
        "task_adjustments": "; ".join(
            f"{t}: " + ", ".join(f"{k} = {v}" for k, v in o.items())
            for t, o in profile.task_finetune.items()
            if t in profile.all_tasks
        )
        or "none",
        "level_pct": f"{LEVEL:.0%}",
        "window_tokens": profile.model_config().block_size,
        "val_documents": val_documents(table, profile),
        "val_units": val_units(results, table),
        "unit_windows": cfg.val_unit_windows,
        "unit_tokens": cfg.val_unit_windows * profile.model_config().block_size,
        **paper.headline(),
    }


def harness_check(runs, profile) -> tuple[str, pd.DataFrame]:
    """lm-evaluation-harness's accuracy beside ours on every labelled task of the profile
    (`uncurl.harness.cross_check`), for the pretrained model the reductions start from, before
    any fine-tuning; lm-eval's files in a temporary folder."""
    n_expert = profile.reductions[0]["source_n_expert"]
    checkpoint = layout.Runs(runs, profile.name).pretrained(n_expert)
    with tempfile.TemporaryDirectory() as tmp:
        return layout.model_label(n_expert), harness.cross_check(checkpoint, profile, out=tmp)


def harness_values(model: str, checked: pd.DataFrame) -> dict:
    """What the chapter says of `harness_check`: examples, agreements, and per task lm-eval's
    accuracy beside ours."""
    return {
        "harness_model": model,
        "harness_examples": int(checked["examples"].sum()),
        "harness_agree": int(checked["agree"].sum()),
        "harness_tasks": "; ".join(
            f"{r.task} {r.lm_eval:.1%} and {r.ours:.1%}" for r in checked.itertuples()
        ),
        "harness_retokenised": int(checked["tokenised_otherwise"].sum()),
        "harness_their_ids_agree": int(checked["ours_on_their_ids_agree"].sum()),
    }


def val_documents(table: pd.DataFrame, profile) -> str:
    """Validation documents of each lm task's domain: 'drama 2, scripture 6'."""
    domains = data.load_meta(profile.data_dir)["splits"]["val"]["domains"]
    lm = [tasks.get_task(t).domain for t in table.loc[table["kind"] == "lm", "task"]]
    return ", ".join(f"{d} {domains[d]['documents']}" for d in lm) or "none"


def val_units(results: list[dict], table: pd.DataFrame) -> str:
    """Bootstrap units of each lm task's scored windows: 'drama 32, scripture 34'."""
    lm = table.loc[table["kind"] == "lm", "task"]
    return ", ".join(f"{t} {len(set(evaluate.score_units(results, t)))}" for t in lm) or "none"


def load(runs, profile) -> list[dict]:
    """Every fine-tuning result of the profile (`layout.Runs.finetune`)."""
    results = evaluate.load_results(layout.Runs(runs, profile.name).finetune)
    return [r for r in results if r["task"] in profile.all_tasks]
