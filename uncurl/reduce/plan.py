"""Reduction methods: statistics -> a plan of which original experts form each new expert.

A plan is JSON-serializable:
    {"method", "seed", "target_n_expert": [D per MoE layer],
     "layers": [{"layer", "source_n_expert", "groups": [group, ...], ...method details}]}
and a group is {"members", "anchor", "weights", "perms"}: the original experts merged into one
new expert; the anchor, its member most often chosen first on T (kept as is); merge weights
proportional to the members' first-choice counts on T (uniform if all are zero), the paper's
selection frequency, which is every choice's count when top_k = 1; and per member the
hidden-neuron order aligning it to the anchor (None until `align.align_plan` fills it; the anchor
stays None).

Methods (the book's Method chapter; each written from its paper):
- uncurl: spectral clustering of (1 + cos) / 2 of the router-logit columns, exactly D clusters
  (Sarkar et al. 2024, Algorithm 1).
- greedy: keep the D most-selected experts (Sarkar et al. 2024, Table 1).
- freq-merge: the D most-selected are centres; every other expert joins its most similar centre
  by the same router-logit similarity (Sarkar et al. 2024, Table 3).
- mcsmoe: dominant experts chosen by frequency globally across layers (D per layer on average),
  the rest join their most similar dominant expert in their layer (Li et al. 2024, arXiv
  2310.01334, without its low-rank compression and distillation). Every layer keeps at least
  top_k experts, so that routing stays possible.
- random: D experts drawn uniformly per layer, seeded (the floor).
- reap: keep the D experts with the highest mean of gate x ||expert output|| over the tokens
  routed to them (Lasby et al. 2025, arXiv 2510.13999).
- naee: the D-subset whose layer output on T is closest to the original, by enumeration (Lu et
  al. 2024, arXiv 2402.14800); layers of at most 16 experts.
- hcsmoe: average-linkage hierarchical clustering of the experts' mean outputs over all tokens,
  Euclidean distance, cut at exactly D groups (Chen et al. 2025, arXiv 2410.08589), merged as
  every other merging method here (aligned, frequency-weighted, a new router).
- hcsmoe-tied: HC-SMoE's own merge of the same clusters: members averaged with their
  frequency weights as they are (no alignment), and the router kept whole, each original
  expert's row dispatching to its cluster's merged expert (router "tie", tied experts).
- greedy-first: the paper's suggestion (Sarkar et al. 2024, Section 6.3): greedy pruning in the
  first MoE layer, whose router logits show no clusters, and UNCURL in the others.

A layer's plan may name its own router handling ("router"), which `apply_plan` prefers, and
leave its members unaligned ("align": false).
"""

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.manifold import spectral_embedding

from uncurl.config import ReduceConfig
from uncurl.reduce.stats import LayerStats

# statistics each method needs beyond counts and router logits (stats.collect_stats' `needs`)
NEEDS = {"reap": ("reap",), "naee": ("naee",), "hcsmoe": ("outputs",), "hcsmoe-tied": ("outputs",)}
# router handling each method implies: pruning keeps its rows, merging starts a fresh router,
# and HC-SMoE's own merge keeps every row, tied to its cluster's merged expert
PRUNING = ("greedy", "random", "reap", "naee")
TIED = ("hcsmoe-tied",)


def default_router(method: str) -> str:
    return "keep" if method in PRUNING else "tie" if method in TIED else "reinit"


def make_plan(
    stats: list[LayerStats], method: str, target_n_expert: int, cfg: ReduceConfig = ReduceConfig()
) -> dict:
    """Plan the reduction of every MoE layer to `target_n_expert` experts (on average for
    mcsmoe), with `cfg`'s seed and clustering settings."""
    counts = [st.n_expert for st in stats]
    check_request(method, target_n_expert, counts, stats[0].top_k, stats[0].cap_top_k)
    if not all(_has(st, need, target_n_expert) for st in stats for need in NEEDS.get(method, ())):
        raise ValueError(
            f"{method} needs statistics {NEEDS[method]}: collect them with "
            f"collect_stats(model, batches, needs={NEEDS[method]}, subset_size=D)"
        )
    layers = PLANNERS[method](stats, target_n_expert, cfg)
    return {
        "method": method,
        "seed": cfg.seed,
        "kmeans": {"n_init": cfg.kmeans_n_init, "max_iter": cfg.kmeans_max_iter},
        "target_n_expert": [len(clusters) for clusters, _ in layers],
        "layers": [
            {
                "layer": st.layer,
                "source_n_expert": st.n_expert,
                "groups": sorted(
                    (make_group(m, st.top1) for m in clusters), key=lambda g: g["anchor"]
                ),
                **details,
            }
            for st, (clusters, details) in zip(stats, layers, strict=True)
        ],
    }


def check_request(
    method: str, target_n_expert: int, counts: list[int], top_k: int, cap_top_k: bool = False
) -> None:
    """Refuse an unknown method or a target D outside [top_k, Z) (outside [1, Z) when the
    reduced model routes to min(top_k, D) experts, `cap_top_k`): each error names the fix."""
    if method not in PLANNERS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(PLANNERS)}")
    least = 1 if cap_top_k else max(1, top_k)
    if target_n_expert < least:
        needs = f"{least} expert(s)" if cap_top_k else f"top_k={top_k} expert(s)"
        raise ValueError(
            f"target_n_expert={target_n_expert} is too small: each MoE layer needs "
            f"at least {needs}; choose D >= {least}"
        )
    if target_n_expert >= min(counts):
        raise ValueError(
            f"target_n_expert={target_n_expert} does not reduce layers of {counts} "
            f"experts; choose D < {min(counts)}"
        )


def _has(st: LayerStats, need: str, d: int) -> bool:
    if need == "naee":
        return st.subsets is not None and st.subsets.shape[1] == d
    return {"reap": st.reap_sum, "outputs": st.output_sum}[need] is not None


def make_group(members, counts) -> dict:
    """Members sorted; anchor = most selected (lowest index on ties); frequency weights."""
    members = sorted(int(m) for m in members)
    c = np.array([counts[m] for m in members], dtype=float)
    weights = c / c.sum() if c.sum() > 0 else np.full(len(members), 1 / len(members))
    return {
        "members": members,
        "anchor": members[int(np.argmax(c))],
        "weights": weights.tolist(),
        "perms": [None] * len(members),
    }


def top(values, d: int) -> list[int]:
    """Indices of the d largest values, ties to the lower index, in index order."""
    order = np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=float)))
    return sorted(order[:d].tolist())


def _per_layer(fn):
    return lambda stats, d, cfg: [fn(st, d, cfg) for st in stats]


def _uncurl(st: LayerStats, d: int, cfg: ReduceConfig):
    """Spectral clustering as sklearn's SpectralClustering(affinity="precomputed"), in its two
    steps so that the embedding F (Z x D eigenvectors of the normalised Laplacian) is kept."""
    rng = np.random.RandomState(cfg.seed)  # one stream for both steps, as SpectralClustering
    embedding = spectral_embedding(
        st.similarity(), n_components=d, drop_first=False, random_state=rng
    )
    kmeans = KMeans(d, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter, random_state=rng)
    labels = kmeans.fit_predict(embedding)
    return _clusters(_split_to(labels, embedding, d)), {"embedding": embedding.tolist()}


def _split_to(labels: np.ndarray, points: np.ndarray, d: int) -> np.ndarray:
    """K-means returns fewer than d clusters only when points coincide; split the largest
    cluster's farthest point off until there are exactly d."""
    labels = np.unique(labels, return_inverse=True)[1]
    while labels.max() + 1 < d:
        members = np.flatnonzero(labels == np.bincount(labels).argmax())
        spread = ((points[members] - points[members].mean(0)) ** 2).sum(1)
        labels[members[np.argmax(spread)]] = labels.max() + 1
    return labels


def _clusters(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]


def _join(st: LayerStats, centres: list[int]) -> list[list[int]]:
    """Each non-centre expert joins the centre whose router-logit column is most similar."""
    sim = st.similarity()
    groups = {c: [c] for c in centres}
    for e in range(st.n_expert):
        if e not in groups:
            groups[centres[int(np.argmax(sim[e, centres]))]].append(e)
    return list(groups.values())


def _greedy(st: LayerStats, d: int, cfg: ReduceConfig):
    return [[e] for e in top(st.counts, d)], {}


def _random(st: LayerStats, d: int, cfg: ReduceConfig):
    keep = np.random.default_rng([cfg.seed, st.layer]).choice(st.n_expert, d, replace=False)
    return [[e] for e in sorted(keep.tolist())], {}


def _freq_merge(st: LayerStats, d: int, cfg: ReduceConfig):
    return _join(st, top(st.counts, d)), {}


def _mcsmoe(stats: list[LayerStats], d: int, cfg: ReduceConfig):
    """D x n_layers dominant experts by frequency across all layers, top_k of them per layer."""
    freqs = [st.frequency() for st in stats]
    dominant = [set(top(f, st.top_k)) for st, f in zip(stats, freqs, strict=True)]
    rest = sorted(
        (-f[e], i, e) for i, f in enumerate(freqs) for e in range(len(f)) if e not in dominant[i]
    )
    for _, i, e in rest[: sum(d - len(s) for s in dominant)]:
        dominant[i].add(e)
    return [(_join(st, sorted(s)), {}) for st, s in zip(stats, dominant, strict=True)]


def _reap(st: LayerStats, d: int, cfg: ReduceConfig):
    scores = st.reap_score()
    return [[e] for e in top(scores, d)], {"scores": scores.tolist()}


def _naee(st: LayerStats, d: int, cfg: ReduceConfig):
    best = int(np.argmin(st.subset_error))
    mse = st.subset_error[best] / max(1, st.n_tokens)
    return [[int(e)] for e in st.subsets[best]], {
        "error_per_token": mse,
        "n_subsets": len(st.subsets),
    }


def _hcsmoe(st: LayerStats, d: int, cfg: ReduceConfig):
    # Euclidean, as HC-SMoE: average linkage on squared distances groups differently
    distance = cdist(st.mean_output(), st.mean_output(), "euclidean")
    labels = AgglomerativeClustering(d, metric="precomputed", linkage="average").fit_predict(
        distance
    )
    return _clusters(labels), {}


def _hcsmoe_tied(st: LayerStats, d: int, cfg: ReduceConfig):
    clusters, details = _hcsmoe(st, d, cfg)
    return clusters, {**details, "align": False, "router": "tie"}


def _greedy_first(stats: list[LayerStats], d: int, cfg: ReduceConfig):
    """The paper's suggestion: the first MoE layer, which shows no cluster structure, pruned
    greedily (its router rows kept); UNCURL in the others."""
    first, *rest = stats
    clusters, details = _greedy(first, d, cfg)
    return [(clusters, {**details, "router": "keep"}), *(_uncurl(st, d, cfg) for st in rest)]


PLANNERS = {
    "uncurl": _per_layer(_uncurl),
    "greedy": _per_layer(_greedy),
    "freq-merge": _per_layer(_freq_merge),
    "mcsmoe": _mcsmoe,
    "random": _per_layer(_random),
    "reap": _per_layer(_reap),
    "naee": _per_layer(_naee),
    "hcsmoe": _per_layer(_hcsmoe),
    "hcsmoe-tied": _per_layer(_hcsmoe_tied),
    "greedy-first": _greedy_first,
}
