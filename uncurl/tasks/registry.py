"""What a task is, and the registry of tasks by name: adding a task is one `register(Task(...))`."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uncurl.data import Package


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
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def registry_table() -> list[dict]:
    """One row per registered task: what the book's task table shows."""
    return [
        {
            "task": t.name,
            "kind": t.kind,
            "source": t.source,
            "licence": t.licence,
            "prompt": t.prompt,
            "metric": t.metric,
            "paper relative": t.relative or "-",
        }
        for t in TASKS.values()
    ]
