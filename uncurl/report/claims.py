"""The claims chapter: every claim of the paper's abstract, introduction and conclusion as a row,
with the paper's evidence, this build's evidence (read from the other chapters' tables), and a
verdict by a rule stated in the row: reproduced, not reproduced, or inconclusive at this scale.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from uncurl import layout
from uncurl.report import paper
from uncurl.report.style import listing

# the chapters whose tables the claims read: study step -> its notebook (the results folder)
CHAPTERS = {
    "pretraining": "02_pretraining_report",
    "dense_equivalent": "03_dense_equivalent",
    "inference": "05_inference_cost",
    "clusters": "07_clusters",
    "threshold": "08_threshold",
    "baselines": "09_baselines",
}
REPRODUCED, NOT, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this scale"


def load(build) -> dict:
    """Each chapter's tables (name -> DataFrame) and values, from its results folder."""
    out = {}
    for name, stem in CHAPTERS.items():
        folder = Path(build) / stem
        record = layout.read_json(folder / layout.RESULTS)
        tables = {t: pd.read_csv(folder / f) for t, f in record["tables"].items()}
        out[name] = {"values": record["values"], **tables}
    return out


def table(chapters: dict) -> pd.DataFrame:
    """One row per claim: claim, the paper's evidence, ours, verdict, why."""
    rows = [check(chapters) for check in CHECKS]
    return pd.DataFrame(rows, columns=["claim", "paper", "ours", "verdict", "why"])


def _premise(c) -> dict:
    models = c["pretraining"]["models"]
    dense = float(models.loc[models["n_expert"] == 1, "val_loss"].iloc[0])
    moe = models[models["n_expert"] > 1]
    below = int((moe["val_loss"] < dense).sum())
    verdict = REPRODUCED if below == len(moe) else NOT if below == 0 else INCONCLUSIVE
    return _row(
        "More experts give a lower validation loss at equal tokens and compute per token",
        "Fig. 6: every added expert lowers the loss throughout pretraining",
        f"{below} of {len(moe)} MoE models end below dense",
        verdict,
        "rule: all MoE models below dense (one pretraining seed each)",
    )


def _dense_equivalent(c) -> dict:
    v = c["dense_equivalent"]["values"]
    lo, hi = v["our_beta_lo"], v["our_beta_hi"]
    verdict = REPRODUCED if hi < 0 else NOT if lo > 0 else INCONCLUSIVE
    return _row(
        "An SMoE is worth a much larger dense model (unified scaling law)",
        "Fig. 2b: the dense-equivalent size grows with the expert count",
        f"slope of log loss on log experts: interval {lo:.4f} to {hi:.4f}",
        verdict,
        "rule: the interval of the slope lies below zero",
    )


def _latency(c) -> dict:
    models = c["inference"]["models"]
    trained = models[models["source"] != "reduced"]
    experts = trained["experts"].astype(float)
    rho = float(spearmanr(experts, trained["latency (ms)"]).statistic)
    verdict = REPRODUCED if rho > 0.8 else NOT if rho < 0 else INCONCLUSIVE
    return _row(
        "Inference latency and memory grow with the number of experts",
        "Fig. 2a: forward latency from dense to 128 experts",
        f"rank correlation of latency with expert count {rho:.2f}",
        verdict,
        "rule: Spearman's rho above 0.8 (one process, this CPU)",
    )


def _all2all(c) -> dict:
    layer = c["inference"]["layer"]
    ours = layer[(layer["implementation"] == "uncurl") & (layer["P"] > 1)]
    if ours.empty:
        return _row(*_A2A, "not measured", INCONCLUSIVE, "no expert-parallel run")
    top = ours.sort_values("experts").iloc[-1]
    ratio = float(top["All2All / computation"])
    verdict = REPRODUCED if ratio > 1 else INCONCLUSIVE
    return _row(
        *_A2A,
        f"All2All / expert computation {ratio:.2f} at {int(top['experts'])} "
        f"experts, P = {int(top['P'])}",
        verdict,
        "rule: the exchanges take longer than the experts (gloo on one machine, not "
        "GPUs over links)",
    )


_A2A = (
    "Under expert parallelism the All2All exchanges outweigh the expert computation",
    "Fig. 4: All2All against compute of one MoE layer, 8 to 128 experts",
)


def _threshold(c) -> dict:
    thr = c["threshold"]["thresholds"]
    found = (
        listing(
            f"{r.threshold} at {r.source_n_expert} experts [{r.ci_low}, {r.ci_high}]"
            for r in thr.itertuples()
        )
        or "none"
    )
    if thr.empty:
        verdict = INCONCLUSIVE
    elif (thr["ci_low"] >= 2).any():
        verdict = REPRODUCED
    else:
        verdict = NOT if (thr["ci_high"] < 2).all() else INCONCLUSIVE
    return _row(
        "Reduced to D for a task, a model pretrained with Z experts beats the D-expert "
        "model from scratch up to a threshold factor",
        "Section 6.2, Tables 1 and 2",
        found,
        verdict,
        "rule: some pretraining expert count wins at least a halving in the interval",
    )


def _threshold_moves(c) -> dict:
    thr = c["threshold"]["thresholds"].set_index("source_n_expert")
    shared = [z for z in paper.THRESHOLD if z in thr.index]
    if not shared:
        return _row(
            *_MOVES,
            "no source model of the paper's expert counts",
            INCONCLUSIVE,
            "this scale trains fewer experts than the paper",
        )
    inside = [thr.loc[z, "ci_low"] <= paper.THRESHOLD[z] <= thr.loc[z, "ci_high"] for z in shared]
    verdict = REPRODUCED if all(inside) else NOT if not any(inside) else INCONCLUSIVE
    return _row(
        *_MOVES,
        listing(f"{thr.loc[z, 'threshold']} at {z} experts" for z in shared),
        verdict,
        "rule: the paper's threshold lies in our interval at each shared count",
    )


_MOVES = (
    "The threshold depends on the pretraining expert count",
    listing(f"factor {f} at {z} experts" for z, f in paper.THRESHOLD.items()),
)


def _versus(method: str, claim: str, evidence: str, beats: bool):
    def check(c) -> dict:
        rows = c["baselines"]["over_uncurl"]
        rows = rows[rows["method"] == method]
        if rows.empty:
            return _row(claim, evidence, "not compared here", INCONCLUSIVE, "method not run")
        calls = rows["verdict_holm"].value_counts()
        worse, better = int(calls.get("-", 0)), int(calls.get("+", 0))
        ours = (
            f"after Holm: UNCURL better on {worse}, tie on {int(calls.get('=', 0))}, "
            f"{method} better on {better} of {len(rows)}"
        )
        if beats:
            verdict = REPRODUCED if worse > len(rows) / 2 else NOT if better else INCONCLUSIVE
        else:
            verdict = NOT if better > len(rows) / 2 else REPRODUCED if not better else INCONCLUSIVE
        rule = (
            "rule: UNCURL better on most comparisons"
            if beats
            else "rule: the other method better on none"
        )
        return _row(claim, evidence, ours, verdict, rule)

    return check


def _first_layer(c) -> dict:
    v = c["clusters"]["values"]
    first, rest = v["first_layer_z"], v["other_layers_z"]
    if not np.isfinite(rest):
        return _row(*_FIRST, "one MoE layer only", INCONCLUSIVE, "no later layer to compare")
    verdict = REPRODUCED if first < rest else NOT
    return _row(
        *_FIRST,
        f"cluster contrast {first:.1f} in the first MoE layer, {rest:.1f} "
        "later (standard deviations of random partitions)",
        verdict,
        "rule: the first MoE layer has the least cluster structure",
    )


_FIRST = (
    "The first MoE layer's experts show no cluster structure",
    "Fig. 7: t-SNE of the spectral embedding, layers 0, 2, 20 and 22 of 64 experts",
)


def _row(claim, evidence, ours, verdict, why) -> dict:
    return {"claim": claim, "paper": evidence, "ours": ours, "verdict": verdict, "why": why}


CHECKS = (
    _premise,
    _dense_equivalent,
    _latency,
    _all2all,
    _threshold,
    _threshold_moves,
    _versus("greedy", "UNCURL beats greedy frequency pruning", "Tables 1 and 2", beats=True),
    _versus(
        "freq-merge",
        "UNCURL is at least as good as frequency-based merging",
        "Table 3",
        beats=False,
    ),
    _versus("mcsmoe", "UNCURL is at least as good as MC-SMoE (adapted)", "Table 4", beats=False),
    _first_layer,
)


def headline(claims: pd.DataFrame) -> dict:
    counts = claims["verdict"].value_counts()
    return {
        "n_claims": len(claims),
        "n_reproduced": int(counts.get(REPRODUCED, 0)),
        "n_not": int(counts.get(NOT, 0)),
        "n_inconclusive": int(counts.get(INCONCLUSIVE, 0)),
    }
