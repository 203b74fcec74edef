"""The premise-sweep appendix: does more experts mean lower loss at this scale?"""

import re

import pandas as pd
from matplotlib.figure import Figure

from uncurl.report.style import (
    LOSS_LABEL,
    display_table,
    duration,
    expert_color,
    expert_label,
    listing,
    plain_values,
)

SWEEP_PROFILE = "small"  # the profile `uncurl.sweep` varies; its last variant is the profile itself

SWEEP_COLUMNS = (
    "variant",
    "n_expert",
    "seed",
    "n_embd",
    "vocab_size",
    "router_init_std",
    "steps",
    "tokens",
    "val_loss",
    "wall_time_s",
    "total_params",
    "active_params",
    "git",
    "run",
)


def load_sweep(path) -> pd.DataFrame:
    """The premise sweep's results (`python -m uncurl.sweep`), checked for the expected columns."""
    df = pd.read_csv(path)
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected {list(SWEEP_COLUMNS)}")
    return df


def plot_sweep(df: pd.DataFrame) -> Figure:
    """Each sweep variant: validation loss per expert count (left), MoE minus dense (right)."""
    gaps = sweep_gaps(df)
    variants = list(dict.fromkeys(df["variant"]))
    fig = Figure(figsize=(10, 0.7 * len(variants) + 1.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    y = {v: i for i, v in enumerate(variants)}
    for n, group in df.groupby("n_expert"):
        left.scatter(
            group["val_loss"],
            [y[v] for v in group["variant"]],
            s=45,
            color=expert_color(n),
            label=expert_label(n),
            zorder=3,
        )
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
        right.barh(
            [y[v] for v in group["variant"]] + offset[group.index],
            group["gap"],
            height=width[group.index],
            color=expert_color(n),
            label=expert_label(n),
        )
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
            ref = dense[
                (dense["n_embd"] == r.n_embd)
                & (dense["vocab_size"] == r.vocab_size)
                & (dense["tokens"] == r.tokens)
                & (dense["seed"] == r.seed)
            ]
        if ref.empty:
            continue
        d = ref.iloc[0]
        rows.append(
            {
                "variant": r.variant,
                "seed": r.seed,
                "n_expert": r.n_expert,
                "dense_variant": d["variant"],
                "dense_loss": d["val_loss"],
                "moe_loss": r.val_loss,
                "gap": r.val_loss - d["val_loss"],
            }
        )
    return pd.DataFrame(
        rows,
        columns=["variant", "seed", "n_expert", "dense_variant", "dense_loss", "moe_loss", "gap"],
    )


def seed_spread(df: pd.DataFrame) -> pd.Series:
    """Largest minus smallest validation loss among runs that differ only in their seed."""
    keys = [df["variant"].map(sweep_base), "n_expert", "n_embd", "vocab_size", "tokens"]
    groups = df.groupby(keys)
    spread = groups["val_loss"].agg(lambda s: s.max() - s.min())
    replicated = (groups["seed"].nunique() > 1) & (groups["seed"].nunique() == groups.size())
    return spread[replicated]


def sweep_table(df: pd.DataFrame):
    gaps = sweep_gaps(df)
    show = pd.DataFrame(
        {
            "variant": gaps["variant"],
            "seed": gaps["seed"],
            "experts": gaps["n_expert"],
            "MoE loss": gaps["moe_loss"],
            "dense loss": gaps["dense_loss"],
            "dense run": gaps["dense_variant"].where(
                gaps["dense_variant"] != gaps["variant"], "same variant"
            ),
            "MoE minus dense": gaps["gap"],
        }
    )
    return display_table(
        show, {"dense loss": "{:.3f}", "MoE loss": "{:.3f}", "MoE minus dense": "{:+.3f}"}
    )


def sweep_headline(df: pd.DataFrame) -> dict:
    gaps = sweep_gaps(df)
    spread = seed_spread(df)
    return plain_values(
        {
            "n_variants": int(df["variant"].nunique()),
            "n_runs": len(df),
            "n_moe_worse": int((gaps["gap"] > 0).sum()),
            "n_pairs": len(gaps),
            "min_gap": float(gaps["gap"].min()),
            "max_gap": float(gaps["gap"].max()),
            "seed_spread": f"{spread.max():.3f}" if len(spread) else "not measured",
            "seed_sentence": (
                f"Runs that differ only in their seed differ by up to "
                f"{spread.max():.3f} nats per token, the scale below which a "
                f"difference between two single runs means little."
                if len(spread)
                else "No setting ran with more than one seed, so the noise from the "
                "seed alone is not measured."
            ),
            "sweep_time": duration(df["wall_time_s"].sum()),
            **router_settings(df),
            **last_setting(df),
        }
    )


def router_settings(df: pd.DataFrame) -> dict:
    """The router initialisations the appendix contrasts, as the sweep ran them: GPT-2's (its
    first variant) and the one the profile adopted (its last: the profile itself), with that
    one's training steps."""
    first, last = (
        df[df["variant"] == v].iloc[0] for v in (df["variant"].iloc[0], df["variant"].iloc[-1])
    )
    return {
        "old_router_std": float(first["router_init_std"]),
        "sweep_profile": SWEEP_PROFILE,
        "router_std": float(last["router_init_std"]),
        "profile_steps": int(last["steps"]),
    }


def last_setting(df: pd.DataFrame) -> dict:
    """The sweep's last setting (the profile's own) against dense, per expert count: where it
    ends below or above dense (mean over seeds), where the sign flips between seeds, and which
    advantages exceed the spread between seeds at that setting."""
    last = sweep_base(df["variant"].iloc[-1])
    gaps = sweep_gaps(df)
    by_count = gaps[gaps["variant"].map(sweep_base) == last].groupby("n_expert")["gap"]
    mean, seeds = by_count.mean(), by_count.size()
    flips = by_count.agg(lambda g: g.min() < 0 < g.max())
    spread = seed_spread(df)
    noise = spread[spread.index.get_level_values(0) == last].max()
    beyond = [
        f"{n} experts ({seeds[n]} seed{'' if seeds[n] == 1 else 's'})"
        for n in mean.index
        if -mean[n] > noise
    ]
    return {
        "below": _experts(mean.index[mean < 0]),
        "above": _experts(mean.index[mean > 0]),
        "flips": _experts(flips.index[flips]),
        "last_spread": "not measured" if pd.isna(noise) else f"{noise:.3f} nats per token",
        "beyond_spread": listing(beyond) if beyond else "no expert count",
    }


def _experts(counts) -> str:
    return f"{listing(counts)} experts" if len(counts) else "no expert count"
