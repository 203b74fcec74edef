"""The pretraining chapter: every model's validation curve and final loss, beside the paper's."""

import json
import platform

import pandas as pd
from matplotlib.figure import Figure

from uncurl import data, layout
from uncurl.config import Profile, load_profiles
from uncurl.report import paper
from uncurl.report.style import (
    LOSS_LABEL,
    display_table,
    duration,
    expert_color,
    expert_label,
    human,
    listing,
    plain_axis,
    plain_values,
)


def load_pretraining(runs, profile: Profile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The profile's trained models (one row each) and their validation curves (tidy).

    Reads the run of each of the profile's expert counts (`layout.Runs.pretrained`); a run
    trained with other settings than the profile's is an error (it would be plotted as if it were
    the profile's).
    """
    folder = layout.Runs(runs, profile.name)
    meta = profile.data_dir / layout.META
    data_hash = data.load_meta(profile.data_dir)["hash"] if meta.exists() else None
    models, curves = [], []
    for n in profile.expert_counts:
        run = folder.pretrained(n)
        if not (run / layout.SUMMARY).exists():
            raise FileNotFoundError(
                f"no finished run with {n} expert(s) at {run}; "
                f"run `python -m uncurl.study --profile {profile.name}`"
            )
        s = {**layout.read_json(run / layout.SUMMARY), "folder": run}
        _check_settings(s, profile)
        if data_hash and s.get("data_hash") not in (None, data_hash):
            raise ValueError(
                f"{s['folder']} was trained on other data than the profile's "
                f"current {profile.data_dir}; delete it and rerun the study"
            )
        env = s.get("environment", {})
        models.append(
            {
                "n_expert": n,
                "run": s["folder"].name,
                "total_params": s["parameters"]["total"],
                "active_params": s["parameters"]["active"],
                "tokens": s["tokens"],
                "steps": s["step"],
                "val_loss": s["val_loss"],
                "wall_time_s": s["wall_time_s"],
                "finished": s["finished"],
                "git": env.get("git"),
                "cpus": env.get("cpus"),
                "torch_threads": env.get("torch_threads"),
                "platform": env.get("platform"),
            }
        )
        for line in (run / layout.METRICS).read_text().splitlines():
            rec = json.loads(line)
            if "val_loss" in rec:
                curves.append(
                    {
                        "n_expert": n,
                        "step": rec["step"],
                        "tokens": rec["tokens"],
                        "val_loss": rec["val_loss"],
                    }
                )
    return pd.DataFrame(models), pd.DataFrame(curves)


def _check_settings(summary: dict, profile: Profile) -> None:
    stale = {
        k: (summary["model"].get(k), v)
        for k, v in profile.model.items()
        if summary["model"].get(k) != v
    }
    stale |= {
        k: (summary["train"].get(k), v)
        for k, v in profile.train.items()
        if summary["train"].get(k) != v
    }
    if stale:
        details = ", ".join(f"{k}: run {a!r}, profile {b!r}" for k, (a, b) in stale.items())
        raise ValueError(
            f"{summary['folder']} was trained with other settings than profile "
            f"{profile.name!r} ({details}); delete it and rerun the study"
        )


def corpus_table(meta: dict) -> pd.DataFrame:
    """Documents, characters and tokens per split and domain of a prepared dataset."""
    rows = []
    for split, counts in meta["splits"].items():
        for domain, c in sorted(counts["domains"].items()):
            rows.append(
                {
                    "split": split,
                    "domain": domain,
                    "documents": c["documents"],
                    "MB": c["chars"] / 1e6,
                    "tokens": c["tokens"],
                }
            )
    return pd.DataFrame(rows)


def profiles_table() -> pd.DataFrame:
    """Every profile of profiles.toml: model shape, expert counts, tokens per model."""
    rows = []
    for p in load_profiles().values():
        m, t = p.model_config(), p.train_config()
        rows.append(
            {
                "profile": p.name,
                "experts": ", ".join(map(str, p.expert_counts)),
                "layers": m.n_layer,
                "d_model": m.n_embd,
                "context": m.block_size,
                "vocabulary": p.data.get("vocab_size", p.data.get("tokenizer")),
                "steps": t.max_steps,
                "tokens per model": human(t.max_steps * t.batch_size * m.block_size),
            }
        )
    return pd.DataFrame(rows)


def models_table(models: pd.DataFrame):
    df = pd.DataFrame(
        {
            "model": models["n_expert"].map(expert_label),
            "total parameters": models["total_params"].map(human),
            "active parameters": models["active_params"].map(human),
            "tokens": models["tokens"].map(human),
            "validation loss": models["val_loss"],
            "wall time (s)": models["wall_time_s"],
        }
    )
    return display_table(df, {"validation loss": "{:.3f}", "wall time (s)": "{:.0f}"})


def plot_loss_curves(curves: pd.DataFrame, paper_curves: pd.DataFrame, profile: str) -> Figure:
    """Validation loss against tokens: ours (left) beside the paper's Fig. 6 (right)."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ours, theirs = fig.subplots(1, 2)
    for ax, df in ((ours, curves), (theirs, paper_curves)):
        for n, group in df.groupby("n_expert"):
            ax.plot(
                group["tokens"],
                group["val_loss"],
                marker="o",
                markersize=3,
                color=expert_color(n),
                label=expert_label(n),
            )
        ax.set_xlabel("training tokens")
        plain_axis(ax.xaxis, human)
        ax.set_ylabel(LOSS_LABEL)
        ax.legend(fontsize="small")
    ours.set_title(f"(a) this study, {profile} profile")
    theirs.set_title(f"(b) Sarkar et al. 2024, {human(paper.BACKBONE_PARAMS)} backbone")
    return fig


def plot_loss_vs_params(models: pd.DataFrame) -> Figure:
    """Final validation loss against total (left) and active (right) parameters."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, column, what in zip(
        axes, ("total_params", "active_params"), ("total", "active"), strict=True
    ):
        for row in models.itertuples():
            ax.scatter(
                getattr(row, column), row.val_loss, color=expert_color(row.n_expert), s=40, zorder=3
            )
            ax.annotate(
                expert_label(row.n_expert),
                (getattr(row, column), row.val_loss),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize="small",
            )
        ax.set_xscale("log")
        plain_axis(ax.xaxis, human)
        ax.set_xlabel(f"{what} parameters (log scale)")
    axes[0].set_ylabel(LOSS_LABEL)
    axes[0].set_title("(a) against total parameters")
    axes[1].set_title("(b) against active parameters per token")
    return fig


def pretraining_headline(models: pd.DataFrame, profile: Profile) -> dict:
    """The numbers and phrases the pretraining chapter (and the introduction) quote."""
    dense = models[models["n_expert"] == 1]
    moe = models[models["n_expert"] > 1]
    values = {
        "profile": profile.name,
        "n_models": len(models),
        "expert_counts": listing(models["n_expert"].map(lambda n: "dense" if n == 1 else str(n))),
        "tokens": human(models["tokens"].max()),
        "steps": int(models["steps"].max()),
        "total_train_time": duration(models["wall_time_s"].sum()),
        "longest_train_time": duration(models["wall_time_s"].max()),
        "hardware": hardware(models),
        "reductions": reductions(profile),
        **paper.headline(),
    }
    if len(dense) and len(moe):
        d = float(dense["val_loss"].iloc[0])
        best = moe.loc[moe["val_loss"].idxmin()]
        worse = int((moe["val_loss"] > d).sum())
        values |= {
            "dense_val_loss": d,
            "best_moe": expert_label(int(best["n_expert"])),
            "best_moe_val_loss": float(best["val_loss"]),
            "best_moe_vs_dense": (
                f"{abs(float(best['val_loss']) - d):.3f} nats per token "
                f"{'above' if best['val_loss'] > d else 'below'}"
            ),
            "moe_vs_dense": _moe_vs_dense(worse, len(moe)),
        }
    return plain_values(values)


def reductions(profile: Profile) -> str:
    """The profile's reductions, grouped by their methods: 'uncurl and greedy on 64 to 32 and 32
    to 8 experts; ...', or 'none'."""
    by_methods = {}
    for r in profile.reductions:
        pair = f"{r['source_n_expert']} to {r['target_n_expert']}"
        by_methods.setdefault(tuple(r["methods"]), []).append(pair)
    return (
        "; ".join(f"{listing(m)} on {listing(p)} experts" for m, p in by_methods.items()) or "none"
    )


def _moe_vs_dense(worse: int, total: int) -> str:
    if total == 1:
        return (
            f"the MoE model ends with a {'higher' if worse else 'lower'} validation loss "
            "than the dense model"
        )
    if worse == total:
        return (
            f"every one of the {total} MoE models ends with a higher validation loss than "
            "the dense model"
        )
    if worse == 0:
        return (
            f"every one of the {total} MoE models ends with a lower validation loss than "
            "the dense model"
        )
    return (
        f"{total - worse} of the {total} MoE models end below the dense model and {worse} above it"
    )


def hardware(models: pd.DataFrame) -> str:
    """'2 CPU cores, 1 thread per run (Linux x86_64)' from what the runs recorded."""
    row = models.iloc[0]
    system = str(row.get("platform") or platform.platform()).split("-")
    return (
        f"{row.get('cpus')} CPU cores, {row.get('torch_threads')} thread(s) per run "
        f"({system[0]} {platform.machine()})"
    )
