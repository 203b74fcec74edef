"""What Sarkar et al. (2024) report, kept for side-by-side comparison.

Source: Sarkar, Lausen, Cevher, Zha, Brox, Karypis, "Revisiting SMoE Language Models by Evaluating
Inefficiencies with Task Specific Expert Pruning", NeurIPS 2024 ENLSP workshop, PMLR 262:165-181.
Values marked "read off the plot" carry the reading error of a figure (a few per cent).
"""

import numpy as np
import pandas as pd

from uncurl import layout
from uncurl.report.style import expert_range, human

CITATION = (
    "Sarkar, Lausen, Cevher, Zha, Brox, Karypis. Revisiting SMoE Language Models by Evaluating "
    "Inefficiencies with Task Specific Expert Pruning. NeurIPS 2024 ENLSP workshop, "
    "PMLR 262:165-181."
)
BACKBONE_PARAMS = 354e6  # the dense 354M backbone (GPT-2 medium shape)
GPT2_VOCAB = 50257  # GPT-2 BPE, the paper's tokenizer

# Total parameters of 354M+Xe as the paper states them.
TOTAL_PARAMS = {1: 354e6, 8: 1.05e9, 32: 3.4e9, 64: 6.7e9, 128: 13e9}

# Fig. 6: validation loss over pretraining tokens (read off the plot).
PRETRAINING_TOKENS = (5e9, 10e9, 15e9, 20e9, 30e9, 50e9)
PRETRAINING_VAL_LOSS = {
    1: (3.86, 3.48, 3.28, 3.12, 2.98, 2.80),
    8: (3.81, 3.45, 3.22, 3.06, 2.90, 2.72),
    32: (3.70, 3.32, 3.14, 2.99, 2.83, 2.65),
    64: (3.64, 3.28, 3.10, 2.95, 2.80, 2.59),
    128: (3.63, 3.25, 3.08, 2.91, 2.75, 2.56),
}
TOKENS = PRETRAINING_TOKENS[-1]  # section 4: each model is pretrained for 50B tokens, Fig. 6's end

# Fig. 2b: performance-equivalent dense size of 354M+Xe by Clark et al.'s law (read off the plot).
DENSE_EQUIVALENT = {
    8: 1.0e9,
    16: 1.3e9,
    32: 1.75e9,
    64: 2.35e9,
    128: 3.25e9,
    256: 4.85e9,
    512: 7.8e9,
    1024: 13.5e9,
}


def headline() -> dict:
    """The paper's pretraining setup as the chapters' prose states it."""
    return {
        "paper_backbone": human(BACKBONE_PARAMS),
        "paper_experts": expert_range(PRETRAINING_VAL_LOSS),
        "paper_tokens": human(TOKENS),
    }


def pretraining_curves() -> pd.DataFrame:
    """Fig. 6 as a tidy table: one row per (n_expert, tokens)."""
    return pd.DataFrame(
        [
            {"n_expert": n, "tokens": t, "val_loss": loss}
            for n, losses in PRETRAINING_VAL_LOSS.items()
            for t, loss in zip(PRETRAINING_TOKENS, losses, strict=True)
        ]
    )


def dense_equivalent() -> pd.DataFrame:
    """Fig. 2b as a tidy table: n_expert, dense_equivalent (parameters)."""
    return pd.DataFrame(
        {"n_expert": list(DENSE_EQUIVALENT), "dense_equivalent": list(DENSE_EQUIVALENT.values())}
    )


# Table 1 (with Table 3's and 4's rows): accuracy (%) after fine-tuning on six SuperGLUE tasks,
# single runs. Model labels follow this study's: e{X} from scratch, e{Z}-{method}-d{D} reduced.
SUPERGLUE_TASKS = ("RTE", "BoolQ", "COPA", "CB", "ReCoRD", "WSC")
SUPERGLUE = {
    "dense": (64.21, 65.33, 56.61, 51.32, 63.14, 65.35),
    "e8": (66.03, 67.35, 58.4, 50.87, 65.17, 68.16),
    "e32": (66.86, 68.27, 59.13, 51.86, 67.75, 70.87),
    "e64": (67.64, 69.09, 60.05, 52.17, 68.85, 71.68),
    "e128": (68.58, 70.13, 61.3, 52.04, 69.83, 72.18),
    "e32-greedy-d8": (64.86, 66.71, 58.12, 49.53, 64.77, 67.59),
    "e64-greedy-d32": (66.36, 68.21, 58.74, 50.09, 66.86, 69.43),
    "e128-greedy-d64": (66.91, 68.22, 58.31, 50.98, 67.22, 70.09),
    "e32-uncurl-d8": (66.48, 69.13, 58.96, 50.65, 66.34, 69.86),
    "e64-uncurl-d8": (66.17, 67.27, 58.11, 50.16, 65.01, 68.11),
    "e64-uncurl-d32": (67.14, 68.86, 59.96, 51.94, 67.96, 69.94),
    "e128-uncurl-d8": (62.91, 66.93, 56.56, 49.31, 64.32, 64.98),
    "e128-uncurl-d32": (65.17, 67.17, 59.04, 50.17, 67.02, 71.04),
    "e128-uncurl-d64": (67.73, 69.28, 60.82, 51.81, 68.91, 71.73),
}


def superglue(models=None) -> pd.DataFrame:
    """Table 1 as a tidy table (model, task, accuracy), optionally only `models`."""
    return pd.DataFrame(
        [
            {"model": m, "task": t, "accuracy": a}
            for m, accs in SUPERGLUE.items()
            if models is None or m in models
            for t, a in zip(SUPERGLUE_TASKS, accs, strict=True)
        ]
    )


# Sarkar et al. 2024, Section 6.2: the largest pruning factor at which UNCURL's reduction beats
# the smaller SMoE trained from scratch on most tasks, per pretraining expert count
THRESHOLD = {32: 4, 64: 2, 128: 2}


def advantages(method: str) -> pd.DataFrame:
    """The paper's reduced models against its from-scratch model of the target size (Table 1):
    accuracy points by which the reduction is better, per SuperGLUE task, and the share of
    tasks it wins."""
    rows = []
    for model, accs in SUPERGLUE.items():
        label = layout.parse_label(model)
        if label["method"] != method:
            continue
        reference = SUPERGLUE[layout.model_label(label["target_n_expert"])]
        diffs = [a - b for a, b in zip(accs, reference, strict=True)]
        rows.append(
            {
                "model": model,
                "factor": label["source_n_expert"] // label["target_n_expert"],
                **dict(zip(SUPERGLUE_TASKS, diffs, strict=True)),
                "tasks won (%)": 100 * np.mean([d > 0 for d in diffs]),
            }
        )
    return pd.DataFrame(rows).sort_values(["factor", "model"], ignore_index=True)


# Sarkar et al. 2024, Tables 3 and 4: merging baselines, accuracy on RTE, BoolQ and COPA only
BASELINE_TASKS = ("RTE", "BoolQ", "COPA")
BASELINES = {
    "e32-freq-merge-d8": (64.54, 65.12, 56.19),
    "e32-mcsmoe-d8": (66.91, 67.83, 59.01),
    "e64-mcsmoe-d32": (67.07, 67.96, 58.62),
    "e128-mcsmoe-d64": (67.41, 68.47, 59.14),
}


def baselines() -> pd.DataFrame:
    """The paper's merging baselines beside its UNCURL reduction of the same source and target
    (accuracy %, the three tasks it reports them on)."""
    rows = []
    for model, accs in BASELINES.items():
        label = layout.parse_label(model)
        uncurl = SUPERGLUE.get(
            layout.model_label(label["target_n_expert"], "uncurl", label["source_n_expert"])
        )
        row = {"model": model, **dict(zip(BASELINE_TASKS, accs, strict=True))}
        for task in BASELINE_TASKS:
            row[f"{task}, UNCURL"] = uncurl[SUPERGLUE_TASKS.index(task)] if uncurl else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
