"""Score models on tasks, and compare them with their uncertainty.

    python -m uncurl.evaluate --runs runs/small/finetune --out results.csv
    python -m uncurl.evaluate --checkpoint runs/small/e8 --task rotten_tomatoes   # no fine-tuning

Scoring: a choice task ranks each example's candidate answers by the summed log-likelihood of
their tokens after the prompt (lm-evaluation-harness's `acc`); an lm task takes the mean loss of
each validation window. A labelled task's held-out examples (part of the training split) are
scored the same way, to decide whether the task is learned at all. Scoring is dropless (no expert
capacity), so an example's score does not depend on which other examples share its batch
(`GPT.forward(dropless=True)`).

Comparison: every (model, task) has a score per validation example per fine-tuning seed. Means get
a hierarchical bootstrap interval, seeds then units (`uncurl.intervals`: an lm task's unit is a
block of consecutive windows of one validation document, a labelled example is its own unit); a
reduced model is compared with its from-scratch equivalent by the paired bootstrap (the same
resampled seeds and units for both), labelled (+) or (-) when the interval of the difference
excludes zero, (=) otherwise, and again after Holm's adjustment over the reported family of
comparisons.
"""

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from uncurl import intervals, layout
from uncurl.cli import one_line_errors
from uncurl.config import FinetuneConfig, get_profile
from uncurl.device import model_device, to_device
from uncurl.model import eval_mode, load_model
from uncurl.model.checkpoint import load_tokenizer, read_info
from uncurl.tasks import Encoded, TaskData, load_task, packed_batch

RESULT = layout.RESULT
# recorded with each labelled result, for the report
TASK_LEVELS = ("chance", "majority", "heldout_majority")
COLUMNS = [
    "model",
    "source_n_expert",
    "target_n_expert",
    "method",
    "task",
    "seed",
    "metric",
    "value",
]


# ------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def candidate_logliks(
    model, packs: list[tuple[np.ndarray, tuple[np.ndarray, ...]]], batch_size: int = 64
) -> np.ndarray:
    """Summed log-probability of every candidate's tokens after its prompt, for (prompt,
    candidates) packs: the candidates in pack order, (candidates,), or (members, candidates)
    for a population. Each pack is one row (`tasks.packed_batch`): its prompt runs once."""
    order = np.argsort([len(p) + sum(len(c) for c in cs) for p, cs in packs], kind="stable")
    first = np.cumsum([0] + [len(cs) for _, cs in packs])  # each pack's first candidate
    out = torch.zeros(model_members(model), first[-1], dtype=torch.float64)
    with eval_mode(model):
        for i in range(0, len(packs), batch_size):
            rows = order[i : i + batch_size]
            b = to_device(packed_batch([packs[j] for j in rows]), model_device(model))
            nll = _nll(
                model,
                model(
                    b.idx, b.targets, dropless=True, positions=b.positions, attn_mask=b.attn_mask
                ),
            )
            candidates = torch.from_numpy(
                np.concatenate([np.arange(first[j], first[j + 1]) for j in rows])
            )
            out.index_add_(1, candidates[b.owner.cpu()], -nll.double().cpu())
    return _as_model(model, out.numpy())


def answer_logliks(
    model, pairs: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 64
) -> np.ndarray:
    """Summed log-probability of each answer's tokens after its prompt."""
    return candidate_logliks(model, [(p, (a,)) for p, a in pairs], batch_size)


def choice_scores(model, encoded: list[Encoded], batch_size: int = 64) -> np.ndarray:
    """Per example: the log-likelihood of every candidate, shape (examples, max choices), -inf
    where an example has fewer candidates; (members, examples, max choices) for a population."""
    flat = candidate_logliks(model, [(e.prompt, e.choices) for e in encoded], batch_size)
    flat = flat.reshape(-1, flat.shape[-1])
    width = max(len(e.choices) for e in encoded)
    scores = np.full((len(flat), len(encoded), width), -np.inf)
    start = 0
    for row, e in enumerate(encoded):
        scores[:, row, : len(e.choices)] = flat[:, start : start + len(e.choices)]
        start += len(e.choices)
    return _as_model(model, scores)


def correct(model, encoded: list[Encoded], batch_size: int = 64) -> np.ndarray:
    """1.0 where the highest-likelihood candidate is the right answer, else 0.0."""
    picks = choice_scores(model, encoded, batch_size).argmax(-1)
    return (picks == np.array([e.label for e in encoded])).astype(float)


def answer_loss(model, encoded: list[Encoded], batch_size: int = 64):
    """Mean negative log-likelihood of the right answers (per example): the smooth held-out
    signal for early stopping, the quantity fine-tuning minimises; one per member of a
    population."""
    ll = answer_logliks(model, [(e.prompt, e.choices[e.label]) for e in encoded], batch_size)
    return -ll.mean(-1) if ll.ndim > 1 else float(-ll.mean())


@torch.no_grad()
def window_losses(model, batches) -> np.ndarray:
    """Mean next-token loss of every window (row) of taskdata batches; (members, windows) for a
    population."""
    out = []
    with eval_mode(model):
        for b in batches:
            b = to_device(b, model_device(model))
            nll = _nll(model, model(b.idx, b.targets, dropless=True))
            loss = nll.new_zeros(len(nll), *b.idx.shape)
            loss[:, b.targets >= 0] = nll
            out.append((loss.sum(-1) / b.mask.sum(1)).cpu().numpy())
    return _as_model(model, np.concatenate(out, axis=-1))


class Scores(NamedTuple):
    """A model's metrics and the per-example scores the bootstrap resamples."""

    metrics: dict
    per_example: list[float]  # validation: accuracy (0/1) or loss per example (lm: window)
    heldout_per_example: list[float] | None  # labelled: accuracy per held-out example; lm: None
    units: list[str] | None  # lm: each validation window's unit; labelled: None (each its own)


def member_scores(model, data: TaskData) -> list[Scores]:
    """Validation metrics (labelled: with held-out accuracy) and the per-example scores, per
    member (one for a model)."""
    members = model_members(model)
    if data.task.kind == "lm":
        per = window_losses(model, data.val).reshape(members, -1)
        return [
            Scores(
                {"loss": float(p.mean()), "perplexity": float(np.exp(p.mean()))},
                p.tolist(),
                None,
                data.val_units,
            )
            for p in per
        ]
    per = correct(model, data.val).reshape(members, -1)
    held = correct(model, data.heldout).reshape(members, -1)
    levels = {
        "majority": data.majority,
        "chance": data.chance,
        "heldout_majority": data.heldout_majority,
    }
    return [
        Scores(
            {"accuracy": float(p.mean()), "heldout_accuracy": float(h.mean()), **levels},
            p.tolist(),
            h.tolist(),
            None,
        )
        for p, h in zip(per, held, strict=True)
    ]


def score(model, data: TaskData) -> Scores:
    """Validation metrics and the per-example scores the bootstrap resamples."""
    return member_scores(model, data)[0]


def model_members(model) -> int:
    """Members of a population (`uncurl.model.population`), 1 for a model."""
    return getattr(model, "members", None) or 1


def _nll(model, out) -> torch.Tensor:
    """The targets' negative log-likelihoods, (members, n)."""
    return torch.stack(out.nll) if getattr(model, "members", None) else out.nll[None]


def _as_model(model, per_member: np.ndarray) -> np.ndarray:
    """Results with a member axis as a model's (its one member's) or a population's."""
    return per_member if getattr(model, "members", None) else per_member[0]


def describe(checkpoint) -> dict:
    """The model's label and kind: from scratch, or reduced from Z to D experts by a method
    (per-layer counts by their mean)."""
    info = read_info(checkpoint)
    target = int(round(float(np.mean(info["model"]["n_expert"]))))
    red = info.get("reduction")
    method = layout.SCRATCH if red is None else red["method"]
    source = target if red is None else int(round(float(np.mean(red["source_n_expert"]))))
    return {
        "model": layout.model_label(target, method, source),
        "source_n_expert": source,
        "target_n_expert": target,
        "method": method,
    }


def pretrain_seed(checkpoint) -> int | None:
    """The seed the model (or the source of its reductions) was pretrained with; None for a
    checkpoint that does not say (one from elsewhere)."""
    info = read_info(checkpoint)
    while "reduction" in info:
        info = info["reduction"]["parent"]
    return (info.get("train") or {}).get("seed")


def score_checkpoint(
    checkpoint, task: str, cfg: FinetuneConfig, data_dir=None, task_source: str = ""
) -> dict:
    """A checkpoint's validation metrics on a task as it is, without fine-tuning."""
    model = load_model(checkpoint)
    data = load_task(
        task, load_tokenizer(checkpoint), model.cfg.block_size, cfg, data_dir, task_source
    )
    return {"model": describe(checkpoint), "task": task, "metrics": score(model, data).metrics}


# ------------------------------------------------------------------------------ result tables


def load_results(root) -> list[dict]:
    """Every fine-tuning result under `root` (any depth), in a stable order; an error if there
    is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a folder of fine-tuning results: give the folder that "
            f"python -m uncurl.finetune --out wrote into, or a parent of several"
        )
    results = [json.loads(p.read_text()) for p in sorted(root.rglob(RESULT))]
    if not results:
        raise FileNotFoundError(f"no {RESULT} under {root}: run python -m uncurl.finetune first")
    return results


def tidy(results: list[dict]) -> pd.DataFrame:
    """One row per (model, task, seed, metric): what the book reads. Chance and the majority
    share are properties of the task, not of a model, and stay in the results only."""
    rows = [
        {
            **{k: r["model"][k] for k in COLUMNS[:4]},
            "task": r["task"],
            "seed": r["seed"],
            "metric": name,
            "value": value,
        }
        for r in results
        for name, value in r["metrics"].items()
        if name not in TASK_LEVELS
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


SPLIT_SCORES = {"val": "per_example", "heldout": "heldout_per_example"}  # result keys


def score_matrix(
    results: list[dict], model: str, task: str, seeds=None, split: str = "val"
) -> np.ndarray:
    """Per-example validation (or held-out) scores of one (model, task), shape (seeds,
    examples), in the order of `seeds` (default: every seed it has, ascending)."""
    runs = {r["seed"]: r for r in results if r["model"]["model"] == model and r["task"] == task}
    if not runs:
        raise ValueError(f"no results for model {model!r} on task {task!r}")
    key = SPLIT_SCORES[split]
    return np.array([runs[s][key] for s in (sorted(runs) if seeds is None else seeds)])


def pretrain_groups(results: list[dict], model: str, task: str, seeds=None) -> list:
    """The pretraining seed of each of the (model, task)'s `seeds` (the order of
    `score_matrix`): the bootstrap's top level (`intervals.draws`)."""
    runs = {r["seed"]: r for r in results if r["model"]["model"] == model and r["task"] == task}
    return [runs[s].get("pretrain_seed") for s in (sorted(runs) if seeds is None else seeds)]


def score_units(results: list[dict], task: str):
    """The unit of each validation example of `task`, for the bootstrap (None: each example its
    own), the same in every result of the task since all are scored on the same windows."""
    units = {tuple(r["units"]) if r.get("units") else None for r in results if r["task"] == task}
    if len(units) > 1:
        raise ValueError(f"the results of {task!r} were scored on different validation units")
    (units,) = units
    if units is None and any(r["task"] == task and r.get("kind") == "lm" for r in results):
        raise ValueError(
            f"lm results of {task!r} carry no validation units: they predate them; fine-tune again"
        )
    return None if units is None else list(units)


def _seeds(results: list[dict], model: str, task: str) -> set[int]:
    return {r["seed"] for r in results if r["model"]["model"] == model and r["task"] == task}


def summary(
    results: list[dict], n_boot: int = intervals.N_BOOT, split: str = "val"
) -> pd.DataFrame:
    """Mean and interval (`intervals.bootstrap`, over units) of the main metric of every (model,
    task) on the validation split; on the held-out split, of the labelled tasks' accuracy."""
    rows = []
    for (model, task), r in _groups(results).items():
        if split == "heldout" and r.get(SPLIT_SCORES[split]) is None:
            continue
        units = score_units(results, task) if split == "val" else None
        mean, lo, hi, _ = intervals.bootstrap(
            score_matrix(results, model, task, split=split),
            units,
            n_boot=n_boot,
            groups=pretrain_groups(results, model, task),
        )
        rows.append(
            {
                **r["model"],
                "task": task,
                "metric": r["metric"],
                "seeds": len(_seeds(results, model, task)),
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
            }
        )
    return pd.DataFrame(rows)


def comparisons(results: list[dict], n_boot: int = intervals.N_BOOT) -> pd.DataFrame:
    """Each reduced model against the from-scratch model of its target size, per task, on the
    seeds both have (seed i of each saw the same data order): the paired bootstrap's difference,
    interval, p-value and raw verdict."""
    groups = _groups(results)
    rows = []
    for (model, task), r in groups.items():
        m = r["model"]
        ref = next(
            (
                k
                for k, g in groups.items()
                if k[1] == task
                and g["model"]["method"] == layout.SCRATCH
                and g["model"]["target_n_expert"] == m["target_n_expert"]
            ),
            None,
        )
        if m["method"] == layout.SCRATCH or ref is None:
            continue
        seeds = sorted(_seeds(results, model, task) & _seeds(results, *ref))
        diff, lo, hi, p = intervals.paired(
            score_matrix(results, model, task, seeds),
            score_matrix(results, *ref, seeds),
            score_units(results, task),
            n_boot=n_boot,
            groups=pretrain_groups(results, model, task, seeds),
        )
        rows.append(
            {
                "model": model,
                "reference": ref[0],
                "task": task,
                "metric": r["metric"],
                "seeds": len(seeds),
                "difference": diff,
                "ci_low": lo,
                "ci_high": hi,
                "p": p,
                "verdict": intervals.verdict(lo, hi, r["metric"] == "accuracy"),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "model",
            "reference",
            "task",
            "metric",
            "seeds",
            "difference",
            "ci_low",
            "ci_high",
            "p",
            "verdict",
        ],
    )


def adjust(comp: pd.DataFrame, family) -> pd.DataFrame:
    """Holm's adjustment over the comparisons whose task is in `family` (the tasks whose
    verdicts the study reports, fixed before seeing them): `p_holm` and `verdict_holm`, which is
    the raw verdict where the adjusted p-value stays below 1 - LEVEL and (=) elsewhere."""
    out = comp.assign(p_holm=np.nan, verdict_holm="")
    rows = out["task"].isin(list(family))
    out.loc[rows, "p_holm"] = intervals.holm(out.loc[rows, "p"])
    significant = out["p_holm"] < 1 - intervals.LEVEL
    out.loc[rows, "verdict_holm"] = np.where(significant[rows], out.loc[rows, "verdict"], "=")
    return out


def _groups(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["model"]["model"], r["task"]): r for r in results}


# ------------------------------------------------------------------------------------ command


def _score(checkpoint, task: str, profile) -> dict:
    return score_checkpoint(
        checkpoint, task, profile.finetune_config(task), profile.data_dir, profile.task_source
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m uncurl.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--runs", type=Path, help="folder of fine-tuning results (result.json files)")
    p.add_argument("--out", type=Path, help="write the tidy table here (.csv)")
    p.add_argument("--checkpoint", type=Path, help="score this checkpoint as it is, on --task")
    p.add_argument("--task", help="task name, with --checkpoint")
    p.add_argument(
        "--profile",
        default="small",
        help="with --checkpoint: the profile whose corpus, task data and sizes to use",
    )
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    args = p.parse_args(argv)
    with one_line_errors(p.prog):
        if args.checkpoint:
            if not args.task:
                raise ValueError("--checkpoint needs --task T (a registered task)")
            print(
                json.dumps(_score(args.checkpoint, args.task, get_profile(args.profile)), indent=2)
            )
            return
        if not args.runs:
            raise ValueError("give --runs DIR (fine-tuning results) or --checkpoint DIR --task T")
        results = load_results(args.runs)
    pd.set_option("display.width", 160)
    print(summary(results, args.bootstrap).round(4).to_string(index=False))
    comp = comparisons(results, args.bootstrap)
    if len(comp):
        print("\nreduced vs from scratch (paired bootstrap, 95%):")
        print(comp.round(4).to_string(index=False))
    if args.out:
        layout.write_text(args.out, tidy(results).to_csv(index=False))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
