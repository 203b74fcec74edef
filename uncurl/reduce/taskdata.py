"""Task data T for expert reduction: the documents of token ids its statistics read.

`--task-data` names T in one of three ways, tried in this order:
- a registered labelled task (`uncurl.tasks`): its training split, each example prompt + answer;
- `DIR:DOMAIN` or `DIR`: a prepared data folder's training documents (of one domain);
- a .txt file or a folder of .txt files, tokenized with the model's tokenizer.
"""

from pathlib import Path

import numpy as np

from uncurl import data, layout, tasks


def load_task_docs(spec: str, tokenizer=None, vocab_size: int | None = None) -> list[np.ndarray]:
    """The documents of task `spec`, checked to be ids of the model's vocabulary."""
    if spec in _labelled_tasks():
        docs = tasks.training_documents(tasks.get_task(spec), tokenizer)
    elif _prepared_folder(spec) is not None:
        docs = _prepared_docs(spec, tokenizer, vocab_size)
    elif Path(spec).exists():
        docs = _text_docs(Path(spec), tokenizer)
    else:
        raise ValueError(
            f"task data {spec!r} is neither a registered task {_labelled_tasks()}, a prepared data "
            "folder (DIR or DIR:DOMAIN), nor a .txt file or folder of .txt files"
        )
    docs = [d for d in docs if len(d) > 1]
    if not docs:
        raise ValueError(f"task data {spec!r} holds no document of two or more tokens")
    top = max(int(d.max()) for d in docs)
    if vocab_size is not None and top >= vocab_size:
        raise ValueError(
            f"task data {spec!r} holds token id {top}, beyond the model's vocabulary of "
            f"{vocab_size}: it was tokenized with another tokenizer; prepare it with the model's"
        )
    return docs


def _labelled_tasks() -> list[str]:
    """Tasks that name T by themselves; an lm task's documents come from DIR:DOMAIN instead."""
    return sorted(name for name, task in tasks.TASKS.items() if task.kind == "choice")


def _prepared_folder(spec: str) -> Path | None:
    folder = Path(spec.rpartition(":")[0] if ":" in spec else spec)
    return folder if (folder / layout.META).exists() else None


def _prepared_docs(spec: str, tokenizer, vocab_size) -> list[np.ndarray]:
    """Training documents of a prepared folder, all domains or the one after the colon."""
    folder, domain = _prepared_folder(spec), spec.rpartition(":")[2] if ":" in spec else None
    _check_same_tokenizer(folder, tokenizer, vocab_size)
    rows = data.load_docs(folder, "train")
    domains = sorted({r["domain"] for r in rows})
    if domain is not None and domain not in domains:
        raise ValueError(f"no domain {domain!r} in {folder}; its domains are {domains}")
    tokens = data.load_tokens(folder, "train")
    # each document keeps its <|endoftext|>, as in pretraining
    return [
        np.asarray(tokens[r["start"] : r["end"] + 1], dtype=np.int64)
        for r in rows
        if domain is None or r["domain"] == domain
    ]


def _check_same_tokenizer(folder: Path, tokenizer, vocab_size) -> None:
    same = (
        tokenizer.get_vocab() == data.load_tokenizer(folder).get_vocab()
        if tokenizer
        else data.load_meta(folder)["vocab_size"] == vocab_size
    )
    if not same:
        raise ValueError(
            f"{folder} was tokenized with a different tokenizer than the model's; prepare the "
            "task data with the model's tokenizer or pass it as .txt files"
        )


def _text_docs(path: Path, tokenizer) -> list[np.ndarray]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".txt" for f in files):
        raise ValueError(f"{path} is neither a .txt file nor a folder holding .txt files")
    if tokenizer is None:
        raise ValueError(
            "text task data needs the model's tokenizer, but the checkpoint has none; "
            "use a prepared data folder (DIR:DOMAIN) instead"
        )
    eot = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [
        np.array(tokenizer(f.read_text(), add_special_tokens=False)["input_ids"] + eot)
        for f in files
    ]
