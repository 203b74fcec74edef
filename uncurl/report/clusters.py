"""The clusters chapter: what UNCURL's spectral clustering finds in each MoE layer, how stable it
is across seeds, whether a layer has cluster structure at all, and what the paper's suggestion
(greedy pruning in the first MoE layer) changes."""

import itertools

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score

from uncurl import layout
from uncurl.report.style import expert_color, listing, plain_values
from uncurl.report.tasks import interval

RANDOM_PARTITIONS = 200  # draws of the same-sized random partitions a layer is measured against


def load_reductions(runs, profile, method: str = "uncurl") -> pd.DataFrame:
    """One row per (reduction, MoE layer) of `method` under the profile's runs: the reduction's
    label, task and seed, and the layer's partition, spectral embedding (UNCURL's), selection
    counts and similarity matrix."""
    rows = []
    for path in layout.Runs(runs, profile.name).reductions():
        record = layout.read_json(path / layout.REDUCTION)
        if record["method"] != method:
            continue
        for planned, stats in zip(record["plan"]["layers"], record["layers"], strict=True):
            rows.append(
                {
                    **layout.parse_reduced(path.name),
                    **layout.parse_label(layout.parse_reduced(path.name)["label"]),
                    "layer": planned["layer"],
                    "partition": _labels(
                        [g["members"] for g in planned["groups"]], planned["source_n_expert"]
                    ),
                    "embedding": np.array(planned.get("embedding", [])),
                    "counts": np.array(stats["counts"]),
                    "similarity": np.array(stats["similarity"]),
                }
            )
    if not rows:
        raise FileNotFoundError(
            f"no {method} reductions under {runs}/{profile.name}/reduced: run "
            "the study's finetune step first"
        )
    return pd.DataFrame(rows)


def _labels(groups: list[list[int]], n: int) -> np.ndarray:
    """Each expert's group index."""
    labels = np.empty(n, int)
    for g, members in enumerate(groups):
        labels[members] = g
    return labels


def stability(layers: pd.DataFrame) -> pd.DataFrame:
    """Per reduction and layer: the mean adjusted Rand index between the partitions of every two
    seeds (1: the same partition; about 0: no more alike than chance), beside the same for
    random partitions of the same sizes."""
    rng = np.random.default_rng(0)
    rows = []
    for (label, task, layer), group in layers.groupby(["label", "task", "layer"]):
        parts = list(group["partition"])
        if len(parts) < 2:
            continue
        pairs = list(itertools.combinations(parts, 2))
        rows.append(
            {
                "reduction": label,
                "task": task,
                "layer": layer,
                "seeds": len(parts),
                "ari": float(np.mean([adjusted_rand_score(a, b) for a, b in pairs])),
                "ari_random": float(
                    np.mean([adjusted_rand_score(rng.permutation(a), b) for a, b in pairs])
                ),
            }
        )
    return pd.DataFrame(rows)


def structure(layers: pd.DataFrame) -> pd.DataFrame:
    """Per reduction, seed and layer: how much more alike the router-logit columns of experts in
    one cluster are than those of experts in different clusters (mean within minus mean between
    of the similarity UNCURL clusters), and the same for random partitions of the same sizes:
    a layer without cluster structure gains little over chance."""
    rng = np.random.default_rng(0)
    rows = []
    for r in layers.itertuples():
        chance = [
            _contrast(r.similarity, rng.permutation(r.partition)) for _ in range(RANDOM_PARTITIONS)
        ]
        rows.append(
            {
                "reduction": r.label,
                "task": r.task,
                "seed": r.seed,
                "layer": r.layer,
                "contrast": _contrast(r.similarity, r.partition),
                "contrast_random": float(np.mean(chance)),
                "contrast_random_sd": float(np.std(chance)),
            }
        )
    out = pd.DataFrame(rows)
    out["z"] = (out["contrast"] - out["contrast_random"]) / out["contrast_random_sd"]
    return out


def _contrast(similarity: np.ndarray, labels: np.ndarray) -> float:
    same = labels[:, None] == labels[None]
    off = ~np.eye(len(labels), dtype=bool)
    within, between = similarity[same & off], similarity[~same]
    return float(within.mean() - between.mean()) if within.size and between.size else 0.0


def cluster_sizes(layers: pd.DataFrame) -> pd.DataFrame:
    """Per layer: how many clusters have each size, over every reduction and seed."""
    rows = [
        {"reduction": r.label, "layer": r.layer, "size": int(size)}
        for r in layers.itertuples()
        for size in np.bincount(r.partition)
    ]
    return (
        pd.DataFrame(rows)
        .groupby(["reduction", "layer", "size"])
        .size()
        .rename("clusters")
        .reset_index()
    )


def plot_embeddings(layers: pd.DataFrame) -> Figure:
    """t-SNE of the spectral embedding of every MoE layer of one reduction (the one from the
    most experts; its first task and seed): one point per original expert, coloured by its
    cluster, sized by how often it was chosen."""
    example = layers.sort_values(["source_n_expert", "task", "seed"], ascending=[False, True, True])
    first = example.iloc[0]
    chosen = layers[
        (layers["label"] == first["label"])
        & (layers["task"] == first["task"])
        & (layers["seed"] == first["seed"])
    ]
    fig = Figure(figsize=(3.3 * len(chosen), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(chosen)))
    for ax, r in zip(axes, chosen.itertuples(), strict=True):
        points = _tsne(r.embedding)
        size = 20 + 200 * r.counts / max(1, r.counts.max())
        ax.scatter(
            points[:, 0],
            points[:, 1],
            c=r.partition,
            cmap="tab10",
            s=size,
            edgecolors="black",
            linewidths=0.3,
        )
        ax.set_title(f"MoE layer {r.layer}", fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
    axes[0].set_ylabel("t-SNE 2")
    fig.suptitle(f"{first['label']} on {first['task']}, seed {first['seed']}", fontsize="medium")
    return fig


def _tsne(embedding: np.ndarray) -> np.ndarray:
    n = len(embedding)
    return TSNE(
        2, perplexity=max(1.0, min(30.0, (n - 1) / 3)), init="pca", random_state=0
    ).fit_transform(embedding)


def plot_structure(table: pd.DataFrame) -> Figure:
    """Cluster contrast per layer (points: reductions and seeds) against random partitions."""
    layers = sorted(table["layer"].unique())
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, layer in enumerate(layers):
        rows = table[table["layer"] == layer]
        jitter = np.linspace(-0.15, 0.15, len(rows))
        ax.scatter(
            i + jitter,
            rows["contrast"],
            color=expert_color(16),
            s=18,
            label="UNCURL's clusters" if i == 0 else None,
        )
        ax.scatter(
            i + jitter,
            rows["contrast_random"],
            color="0.6",
            s=12,
            marker="x",
            label="random partitions, same sizes" if i == 0 else None,
        )
    ax.set_xticks(range(len(layers)), [f"MoE layer {la}" for la in layers])
    ax.set_ylabel("similarity within minus between clusters")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize="small")
    return fig


def headline(stable: pd.DataFrame, struct: pd.DataFrame) -> dict:
    """The numbers the chapter's prose pastes."""
    by_layer = struct.groupby("layer")["z"].median()
    first, rest = by_layer.index.min(), by_layer.index[by_layer.index > by_layer.index.min()]
    weakest = by_layer.idxmin()
    return plain_values(
        {
            "n_reductions": int(struct.groupby(["reduction", "task", "seed"]).ngroups),
            "layers": listing(str(la) for la in by_layer.index),
            "first_layer": int(first),
            "first_layer_z": float(by_layer.loc[first]),
            "other_layers_z": float(by_layer.loc[rest].median()) if len(rest) else float("nan"),
            "weakest_layer": int(weakest),
            "first_is_weakest": "is" if weakest == first else "is not",
            "median_ari": float(stable["ari"].median()) if len(stable) else float("nan"),
            "min_ari": float(stable["ari"].min()) if len(stable) else float("nan"),
            "max_ari": float(stable["ari"].max()) if len(stable) else float("nan"),
            "median_ari_random": float(stable["ari_random"].median())
            if len(stable)
            else float("nan"),
        }
    )


def variant_table(summary: pd.DataFrame) -> pd.DataFrame:
    """UNCURL everywhere against greedy pruning in the first MoE layer and UNCURL in the others,
    beside the from-scratch model of the same size: each task's mean [interval]."""
    rows = summary[summary["method"].isin(["uncurl", "greedy-first"])]
    targets = set(rows["target_n_expert"])
    scratch = summary[
        (summary["method"] == layout.SCRATCH) & summary["target_n_expert"].isin(targets)
    ]
    df = pd.concat([scratch, rows])
    scale = np.where(df["metric"] == "accuracy", 100.0, 1.0)
    df = df.assign(
        value=[
            interval(m, lo, hi, s, 1 if s > 1 else 3)
            for m, lo, hi, s in zip(df["mean"], df["ci_low"], df["ci_high"], scale, strict=True)
        ]
    )
    return df.pivot(index="model", columns="task", values="value").reset_index()
