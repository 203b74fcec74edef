"""What the study's report notebooks call: load results, draw figures, make tables, record them.

Figures are `matplotlib.figure.Figure` objects (no pyplot state, so nothing is shown twice);
`save_figure` writes a PNG and returns an image that MyST-NB's `glue` can paste into the book.
Only `write_results` (provenance) and `paper_model_sizes` import torch, and only when called.
"""

import datetime
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Image
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from uncurl import paper
from uncurl.config import Profile, get_profile, load_profiles

RESULTS = "results.json"
SWEEP_COLUMNS = ("variant", "n_expert", "seed", "n_embd", "vocab_size", "tokens", "val_loss",
                 "wall_time_s", "total_params", "active_params", "git", "run")
LOSS_LABEL = "validation loss (nats per token)"


# ----------------------------------------------------------------------------- style and labels

def use_style() -> None:
    """One look for every figure of the book: readable at book width."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.95)
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight"})


def expert_label(n_expert: int) -> str:
    return "dense" if n_expert == 1 else f"{n_expert} experts"


def expert_color(n_expert: int):
    """The same colour for an expert count in every figure (dense is black)."""
    if n_expert == 1:
        return (0.1, 0.1, 0.1)
    return mpl.colormaps["viridis"](min(math.log2(n_expert), 7) / 7 * 0.9)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def plain_axis(axis, fmt=lambda v: f"{v:g}") -> None:
    """Tick labels as plain numbers ('8', '0.9', '1.2M') instead of powers on log axes."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_formatter(NullFormatter())


def listing(items) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------------- loading

def load_pretraining(runs, profile: Profile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The profile's trained models (one row each) and their validation curves (tidy).

    Reads every run folder under `runs/<profile>/` and picks, for each of the profile's expert
    counts, the run with that count; a run trained with other settings than the profile's is an
    error (it would be plotted as if it were the profile's).
    """
    folder = Path(runs) / profile.name
    data_hash = load_data_meta(profile)["hash"] if (profile.data_dir / "meta.json").exists() \
        else None
    found: dict[int, list[dict]] = {}
    for path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        summary["folder"] = path.parent
        found.setdefault(summary["model"]["n_expert"], []).append(summary)
    models, curves = [], []
    for n in profile.expert_counts:
        runs_n = found.get(n, [])
        if len(runs_n) != 1:
            what = "no finished run" if not runs_n else f"{len(runs_n)} runs"
            raise FileNotFoundError(f"{what} with {n} expert(s) under {folder}; "
                                    f"run `python -m uncurl.study --profile {profile.name}`")
        s = runs_n[0]
        _check_settings(s, profile)
        if data_hash and s.get("data_hash") not in (None, data_hash):
            raise ValueError(f"{s['folder']} was trained on other data than the profile's "
                             f"current {profile.data_dir}; delete it and rerun the study")
        env = s.get("environment", {})
        models.append({
            "n_expert": n, "run": s["folder"].name, "total_params": s["parameters"]["total"],
            "active_params": s["parameters"]["active"], "tokens": s["tokens"], "steps": s["step"],
            "val_loss": s["val_loss"], "wall_time_s": s["wall_time_s"], "finished": s["finished"],
            "git": env.get("git"), "cpus": env.get("cpus"),
            "torch_threads": env.get("torch_threads"), "platform": env.get("platform"),
        })
        for line in (s["folder"] / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "val_loss" in rec:
                curves.append({"n_expert": n, "step": rec["step"], "tokens": rec["tokens"],
                               "val_loss": rec["val_loss"]})
    return pd.DataFrame(models), pd.DataFrame(curves)


def _check_settings(summary: dict, profile: Profile) -> None:
    stale = {k: (summary["model"].get(k), v) for k, v in profile.model.items()
             if summary["model"].get(k) != v}
    stale |= {k: (summary["train"].get(k), v) for k, v in profile.train.items()
              if summary["train"].get(k) != v}
    if stale:
        details = ", ".join(f"{k}: run {a!r}, profile {b!r}" for k, (a, b) in stale.items())
        raise ValueError(f"{summary['folder']} was trained with other settings than profile "
                         f"{profile.name!r} ({details}); delete it and rerun the study")


def load_data_meta(profile: Profile) -> dict:
    """meta.json of the profile's prepared data (written by `python -m uncurl.data prepare`)."""
    path = profile.data_dir / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m uncurl.data prepare "
                                f"--profile {profile.name}`")
    return json.loads(path.read_text())


def load_sweep(path) -> pd.DataFrame:
    """The premise sweep's results (`python -m uncurl.sweep`), checked for the expected columns."""
    df = pd.read_csv(path)
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected {list(SWEEP_COLUMNS)}")
    return df


# ---------------------------------------------------------------------------------- figures

def plot_loss_curves(curves: pd.DataFrame, paper_curves: pd.DataFrame, profile: str) -> Figure:
    """Validation loss against tokens: ours (left) beside the paper's Fig. 6 (right)."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ours, theirs = fig.subplots(1, 2)
    for ax, df in ((ours, curves), (theirs, paper_curves)):
        for n, group in df.groupby("n_expert"):
            ax.plot(group["tokens"], group["val_loss"], marker="o", markersize=3,
                    color=expert_color(n), label=expert_label(n))
        ax.set_xlabel("training tokens")
        plain_axis(ax.xaxis, human)
        ax.set_ylabel(LOSS_LABEL)
        ax.legend(fontsize="small")
    ours.set_title(f"(a) this study, {profile} profile")
    theirs.set_title("(b) Sarkar et al. 2024, 354M backbone")
    return fig


def plot_loss_vs_params(models: pd.DataFrame) -> Figure:
    """Final validation loss against total (left) and active (right) parameters."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, what in zip(axes, ("total_params", "active_params"), ("total", "active"),
                                strict=True):
        for row in models.itertuples():
            ax.scatter(getattr(row, column), row.val_loss, color=expert_color(row.n_expert),
                       s=40, zorder=3)
            ax.annotate(expert_label(row.n_expert), (getattr(row, column), row.val_loss),
                        textcoords="offset points", xytext=(5, 4), fontsize="small")
        ax.set_xscale("log")
        plain_axis(ax.xaxis, human)
        ax.set_xlabel(f"{what} parameters (log scale)")
    axes[0].set_ylabel(LOSS_LABEL)
    axes[0].set_title("(a) against total parameters")
    axes[1].set_title("(b) against active parameters per token")
    return fig


def plot_sweep(df: pd.DataFrame) -> Figure:
    """Each sweep variant: validation loss per expert count (left), MoE minus dense (right)."""
    gaps = sweep_gaps(df)
    variants = list(dict.fromkeys(df["variant"]))
    fig = Figure(figsize=(10, 0.7 * len(variants) + 1.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    y = {v: i for i, v in enumerate(variants)}
    for n, group in df.groupby("n_expert"):
        left.scatter(group["val_loss"], [y[v] for v in group["variant"]], s=45,
                     color=expert_color(n), label=expert_label(n), zorder=3)
    left.set_yticks(range(len(variants)), [_wrap(v) for v in variants])
    left.invert_yaxis()
    left.set_ylabel("sweep variant")
    left.set_xlabel(LOSS_LABEL)
    left.legend(fontsize="small")
    left.set_title("(a) final validation loss")
    # several expert counts in one variant share its row: each gets its own slice of the row
    slot = gaps.groupby("variant").cumcount()
    width = 0.8 / gaps.groupby("variant")["n_expert"].transform("size")
    offset = -0.4 + width * (slot + 0.5)
    for n, group in gaps.groupby("n_expert"):
        right.barh([y[v] for v in group["variant"]] + offset[group.index], group["gap"],
                   height=width[group.index], color=expert_color(n), label=expert_label(n))
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel("MoE minus dense validation loss (nats per token)")
    right.set_title("(b) > 0: the MoE model is worse")
    return fig


def _wrap(text: str, width: int = 32) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def plot_dense_equivalent(comparison: pd.DataFrame, fitted: dict, total_params: dict) -> Figure:
    """N' of 354M+Xe: the paper's read-off values, Clark et al.'s law, a fit to the paper."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    e = comparison["n_expert"]
    ax.plot(e, comparison["paper"], "o", color="black", label="Sarkar et al. Fig. 2b (read off)")
    ax.plot(e, comparison["dense_equivalent"], "-", marker="s", markersize=4, color="C0",
            label="Clark et al. S-BASE: a log N' + d = log L")
    ax.plot(e, comparison["effective_params"], "--", marker="^", markersize=4, color="C0",
            label="Clark et al. S-BASE: L(N', 1) = L(N, E)")
    ax.plot(list(fitted), list(fitted.values()), ":", color="C3",
            label="law's form fitted to the paper's values")
    ax.plot(list(total_params), list(total_params.values()), "-", color="0.6", linewidth=1,
            label="total parameters of 354M+Xe")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_axis(ax.xaxis)
    plain_axis(ax.yaxis, human)
    ax.set_xlabel("experts per MoE layer, X")
    ax.set_ylabel("dense parameters N' (log scale)")
    ax.legend(fontsize="small")
    return fig


def plot_fixed_size_fit(models: pd.DataFrame, fit, ratios: pd.DataFrame, clark_ratio: dict,
                        law) -> Figure:
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
    right.fill_between(ratios["n_expert"], ratios["ratio_lo"], ratios["ratio_hi"], color="C3",
                       alpha=0.2, label="95% interval (beta only)")
    right.plot(list(clark_ratio), list(clark_ratio.values()), "--", color="C0",
               label="Clark et al. S-BASE at our size (extrapolated)")
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


def save_figure(fig: Figure, path) -> Image:
    """Write `fig` as PNG and return it as an image for `glue`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Image(filename=str(path))


# ----------------------------------------------------------------------------------- tables

def display_table(df: pd.DataFrame, formats: dict | str | None = None):
    """A table for the book: no index; `formats` as for pandas' `Styler.format`."""
    return df.style.hide(axis="index").format(formats or {})


def models_table(models: pd.DataFrame):
    df = pd.DataFrame({
        "model": models["n_expert"].map(expert_label),
        "total parameters": models["total_params"].map(human),
        "active parameters": models["active_params"].map(human),
        "tokens": models["tokens"].map(human),
        "validation loss": models["val_loss"],
        "wall time (s)": models["wall_time_s"],
    })
    return display_table(df, {"validation loss": "{:.3f}", "wall time (s)": "{:.0f}"})


def corpus_table(meta: dict) -> pd.DataFrame:
    """Documents, characters and tokens per split and domain of a prepared dataset."""
    rows = []
    for split, counts in meta["splits"].items():
        for domain, c in sorted(counts["domains"].items()):
            rows.append({"split": split, "domain": domain, "documents": c["documents"],
                         "MB": c["chars"] / 1e6, "tokens": c["tokens"]})
    return pd.DataFrame(rows)


def profiles_table() -> pd.DataFrame:
    """Every profile of profiles.toml: model shape, expert counts, tokens per model."""
    rows = []
    for p in load_profiles().values():
        m, t = p.model_config(), p.train_config()
        rows.append({
            "profile": p.name, "experts": ", ".join(map(str, p.expert_counts)),
            "layers": m.n_layer, "d_model": m.n_embd, "context": m.block_size,
            "vocabulary": p.data.get("vocab_size", p.data.get("tokenizer")),
            "steps": t.max_steps, "tokens per model": human(t.max_steps * t.batch_size
                                                            * m.block_size),
        })
    return pd.DataFrame(rows)


def sweep_base(variant: str) -> str:
    """The setting a sweep variant names, seed aside: 'small profile, seed 1' -> 'small profile'.

    `uncurl.sweep` labels variants 'name: description' and marks seeds as ', seed N'.
    """
    return re.sub(r",?\s*seed \d+", "", variant.split(":")[0]).strip()


def sweep_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """Each MoE run of the sweep against its dense reference: MoE minus dense validation loss.

    The reference is the dense run of the same variant and seed or, for variants that change
    only the MoE layers (the router, say) and train no dense model, the dense run with the same
    width, vocabulary, tokens and seed.
    """
    dense = df[df["n_expert"] == 1]
    rows = []
    for r in df[df["n_expert"] > 1].itertuples():
        ref = dense[(dense["variant"] == r.variant) & (dense["seed"] == r.seed)]
        if ref.empty:
            ref = dense[(dense["n_embd"] == r.n_embd) & (dense["vocab_size"] == r.vocab_size)
                        & (dense["tokens"] == r.tokens) & (dense["seed"] == r.seed)]
        if ref.empty:
            continue
        d = ref.iloc[0]
        rows.append({"variant": r.variant, "seed": r.seed, "n_expert": r.n_expert,
                     "dense_variant": d["variant"], "dense_loss": d["val_loss"],
                     "moe_loss": r.val_loss, "gap": r.val_loss - d["val_loss"]})
    return pd.DataFrame(rows, columns=["variant", "seed", "n_expert", "dense_variant",
                                       "dense_loss", "moe_loss", "gap"])


def seed_spread(df: pd.DataFrame) -> pd.Series:
    """Largest minus smallest validation loss among runs that differ only in their seed."""
    keys = [df["variant"].map(sweep_base), "n_expert", "n_embd", "vocab_size", "tokens"]
    groups = df.groupby(keys)
    spread = groups["val_loss"].agg(lambda s: s.max() - s.min())
    replicated = (groups["seed"].nunique() > 1) & (groups["seed"].nunique() == groups.size())
    return spread[replicated]


def sweep_table(df: pd.DataFrame):
    gaps = sweep_gaps(df)
    show = pd.DataFrame({
        "variant": gaps["variant"], "seed": gaps["seed"], "experts": gaps["n_expert"],
        "MoE loss": gaps["moe_loss"], "dense loss": gaps["dense_loss"],
        "dense run": gaps["dense_variant"].where(gaps["dense_variant"] != gaps["variant"],
                                                 "same variant"),
        "MoE minus dense": gaps["gap"],
    })
    return display_table(show, {"dense loss": "{:.3f}", "MoE loss": "{:.3f}",
                                "MoE minus dense": "{:+.3f}"})


# ------------------------------------------------------------------------- headline numbers

def pretraining_headline(models: pd.DataFrame, profile: Profile) -> dict:
    """The numbers and phrases the pretraining chapter (and the introduction) quote."""
    dense = models[models["n_expert"] == 1]
    moe = models[models["n_expert"] > 1]
    values = {
        "profile": profile.name,
        "n_models": len(models),
        "expert_counts": listing(models["n_expert"].map(
            lambda n: "dense" if n == 1 else str(n))),
        "tokens": human(models["tokens"].max()),
        "steps": int(models["steps"].max()),
        "total_train_time": duration(models["wall_time_s"].sum()),
        "longest_train_time": duration(models["wall_time_s"].max()),
        "hardware": hardware(models),
    }
    if len(dense) and len(moe):
        d = float(dense["val_loss"].iloc[0])
        best = moe.loc[moe["val_loss"].idxmin()]
        worse = int((moe["val_loss"] > d).sum())
        values |= {
            "dense_val_loss": d,
            "best_moe": expert_label(int(best["n_expert"])),
            "best_moe_val_loss": float(best["val_loss"]),
            "best_moe_vs_dense": (f"{abs(float(best['val_loss']) - d):.3f} nats per token "
                                  f"{'above' if best['val_loss'] > d else 'below'}"),
            "moe_vs_dense": _moe_vs_dense(worse, len(moe)),
        }
    return plain_values(values)


def plain_values(values: dict) -> dict:
    """numpy scalars as Python numbers, so that glue pastes `0.8` and not `np.float64(0.8)`."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}


def _moe_vs_dense(worse: int, total: int) -> str:
    if total == 1:
        return f"the MoE model ends with a {'higher' if worse else 'lower'} validation loss " \
               "than the dense model"
    if worse == total:
        return f"every one of the {total} MoE models ends with a higher validation loss than " \
               "the dense model"
    if worse == 0:
        return f"every one of the {total} MoE models ends with a lower validation loss than " \
               "the dense model"
    return f"{total - worse} of the {total} MoE models end below the dense model and {worse} " \
           "above it"


def duration(seconds: float) -> str:
    """'42 s', '12.5 minutes', '3.2 hours'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"


def hardware(models: pd.DataFrame) -> str:
    """'2 CPU cores, 1 thread per run (Linux x86_64)' from what the runs recorded."""
    row = models.iloc[0]
    system = str(row.get("platform") or platform.platform()).split("-")
    return (f"{row.get('cpus')} CPU cores, {row.get('torch_threads')} thread(s) per run "
            f"({system[0]} {platform.machine()})")


def sweep_headline(df: pd.DataFrame) -> dict:
    gaps = sweep_gaps(df)
    spread = seed_spread(df)
    return plain_values({
        "n_variants": int(df["variant"].nunique()),
        "n_runs": len(df),
        "n_moe_worse": int((gaps["gap"] > 0).sum()),
        "n_pairs": len(gaps),
        "min_gap": float(gaps["gap"].min()),
        "max_gap": float(gaps["gap"].max()),
        "seed_spread": f"{spread.max():.3f}" if len(spread) else "not measured",
        "seed_sentence": (f"Runs that differ only in their seed differ by up to "
                          f"{spread.max():.3f} nats per token, the scale below which a "
                          f"difference between two single runs means little." if len(spread)
                          else "No setting ran with more than one seed, so the noise from the "
                          "seed alone is not measured."),
        "sweep_time": duration(df["wall_time_s"].sum()),
    })


def paper_model_sizes(expert_counts) -> dict[int, int]:
    """Total parameters of 354M+Xe by our own count (the `paper` profile with GPT-2's BPE)."""
    from uncurl.model import count_parameters  # imports torch: only here

    cfg = get_profile("paper")
    return {int(n): count_parameters(cfg.model_config(n_expert=int(n),
                                                      vocab_size=paper.GPT2_VOCAB))["total"]
            for n in expert_counts}


def dense_equivalent_table(comparison: pd.DataFrame, fitted: dict, sizes: dict):
    df = pd.DataFrame({
        "experts X": comparison["n_expert"],
        "total parameters (paper)": comparison["n_expert"].map(
            lambda n: human(paper.TOTAL_PARAMS[n]) if n in paper.TOTAL_PARAMS else ""),
        "total parameters (our count)": comparison["n_expert"].map(lambda n: human(sizes[n])),
        "N' paper Fig. 2b": comparison["paper"].map(human),
        "N' law, a log N' + d = log L": comparison["dense_equivalent"].map(human),
        "N' law, L(N', 1) = L(N, E)": comparison["effective_params"].map(human),
        "N' form fitted to the paper": comparison["n_expert"].map(lambda n: human(fitted[n])),
    })
    return display_table(df)


def ratios_table(ratios: pd.DataFrame, level: float):
    pct = f"{level:.0%}"
    df = pd.DataFrame({
        "model": ratios["n_expert"].map(expert_label), "N' / N": ratios["ratio"],
        f"{pct} interval, low": ratios["ratio_lo"], f"{pct} interval, high": ratios["ratio_hi"],
    })
    return display_table(df, {c: "{:.3g}" for c in df.columns[1:]})


def dense_equivalent_headline(comparison: pd.DataFrame, k: float, k_se: float, fit,
                              ratios: pd.DataFrame, models: pd.DataFrame, law,
                              level: float) -> dict:
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
    return plain_values({
        "paper_first_x": int(first), "paper_last_x": int(last),
        "paper_first_b": row.loc[first, "paper"] / 1e9,
        "law_first_b": row.loc[first, "dense_equivalent"] / 1e9,
        "epc_first_b": row.loc[first, "effective_params"] / 1e9,
        "paper_last_b": row.loc[last, "paper"] / 1e9,
        "law_last_b": row.loc[last, "dense_equivalent"] / 1e9,
        "epc_last_b": row.loc[last, "effective_params"] / 1e9,
        "e_max": law.e_max, "paper_k": k, "paper_k_se": k_se,
        "our_n_models": len(models), "our_dof": fit.dof, "our_params": human(n_ours),
        "our_beta": fit.slope, "our_beta_lo": lo, "our_beta_hi": hi, "our_r2": fit.r2,
        "our_resid_sd": fit.residual_sd, "level_pct": f"{level:.0%}",
        "dense_exponent": law.dense_exponent, "our_max_x": int(top["n_expert"]),
        "our_ratio_max": float(top["ratio"]), "our_ratio_max_lo": float(top["ratio_lo"]),
        "our_ratio_max_hi": float(top["ratio_hi"]),
        "clark_ratio_max": float(law.effective_params(n_ours, top["n_expert"]) / n_ours),
        "our_sign": sign,
    })


def backbone_params(models: pd.DataFrame) -> float:
    """N of the law for our models: the dense model's parameter count (else the fewest active)."""
    dense = models[models["n_expert"] == 1]
    return float(dense["total_params"].iloc[0] if len(dense) else models["active_params"].min())


def clark_ratios(law, n_params: float, expert_counts) -> dict[int, float]:
    """N'/N by Clark et al.'s law (Effective Parameter Count) at one backbone size."""
    return {int(n): float(law.effective_params(n_params, n) / n_params) for n in expert_counts}


# ---------------------------------------------------------------------------------- records

def write_results(out, parameters: dict, started: float, tables: dict | None = None,
                  values: dict | None = None, outputs=()) -> Path:
    """Record a step: tables as CSV and `results.json` with parameters, values and provenance.

    `started` is `time.time()` at the start of the notebook; `outputs` are files the step wrote
    outside `out` (the study runner checks that they still exist before reusing the step).
    """
    from uncurl.provenance import git_revision, package_versions  # imports torch: only here

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, table in (tables or {}).items():
        files[name] = f"{name}.csv"
        table.to_csv(out / files[name], index=False)
    record = {
        "parameters": parameters, "values": values or {}, "tables": files,
        "outputs": [str(p) for p in outputs], "git": git_revision(),
        "python": platform.python_version(), "packages": package_versions(),
        "library": library_modules(), "wall_time_s": time.time() - started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path = out / RESULTS
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    return path


def library_modules() -> list[str]:
    """Source files of the uncurl modules this process has imported, relative to the repository
    (the study runner reruns a step when one of them changes)."""
    root = Path(__file__).resolve().parent.parent
    files = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())
             if (name == "uncurl" or name.startswith("uncurl.")) and getattr(m, "__file__", None)}
    return sorted(str(f.relative_to(root)) for f in files)


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
