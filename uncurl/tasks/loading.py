"""What a model reads of a task: its splits tokenized for the model, and its training batches.

A choice task trains on prompt + right answer (the loss on the answer tokens) and is scored on its
validation examples; an lm task trains on its documents as plain language modelling and is scored
on windows of its validation documents, each window tagged with its unit (a block of consecutive
windows of one document) for the bootstrap. Validation and held-out are stable subsets, so every
model is scored on the same examples.
"""

from dataclasses import dataclass

import numpy as np

from uncurl.config import FinetuneConfig
from uncurl.tasks.encoding import answered, encode, make_batches, train_batches, unit_batches
from uncurl.tasks.registry import Task, get_task
from uncurl.tasks.splits import chance, domain_docs, examples, majority, val_titles


@dataclass
class TaskData:
    task: Task
    train: list  # choice: Encoded; lm: token arrays (documents)
    heldout: list  # choice: Encoded; lm: Batch windows
    val: list  # as heldout
    batch_size: int  # examples (lm: windows) per training batch
    majority: float = float("nan")  # choice: share of the most frequent answer in val
    chance: float = float("nan")  # choice: expected accuracy of a uniform guess
    heldout_majority: float = float("nan")  # choice: as majority, in heldout
    val_units: list[str] | None = None  # lm: each val window's unit; choice: None (each its own)


def load_task(
    name: str, tok, block_size: int, cfg: FinetuneConfig, data_dir=None, task_source: str = ""
) -> TaskData:
    """The task's splits, tokenized for a model; validation and held-out are stable subsets."""
    task = get_task(name)
    if task.kind == "lm":
        if data_dir is None:
            raise ValueError(
                f"lm task {name!r} needs the prepared corpus: give --data-dir or --profile"
            )
        docs = domain_docs(task, data_dir, cfg.heldout_frac)
        size = max(1, cfg.batch_tokens // block_size)
        val, units = unit_batches(
            docs["val"],
            val_titles(task, data_dir),
            block_size,
            size,
            cfg.max_val_windows,
            cfg.val_unit_windows,
        )
        heldout = make_batches(docs["heldout"], block_size, size, cfg.max_heldout * block_size)
        return TaskData(task, docs["train"], heldout, val, size, val_units=units)
    if tok is None:
        raise ValueError(
            f"labelled task {name!r} needs the model's tokenizer, but the checkpoint "
            "has none (tokenizer.json); save the checkpoint with its tokenizer"
        )
    exs = examples(task, task_source or None, cfg.val_frac, cfg.heldout_frac)
    heldout, val = _subset(exs["heldout"], cfg.max_heldout), _subset(exs["val"], cfg.max_val)
    encoded = [
        encode(tok, split, block_size, task.max_text_tokens)
        for split in (exs["train"], heldout, val)
    ]
    length = np.mean([len(e.prompt) + len(e.choices[e.label]) for e in encoded[0]])
    size = min(len(encoded[0]), max(1, int(cfg.batch_tokens // length)))
    return TaskData(
        task, *encoded, size, majority(val)[1], chance(val), heldout_majority=majority(heldout)[1]
    )


def _subset(items: list, n: int) -> list:
    """A fixed pseudo-random `n` of `items` (files are often ordered by label)."""
    order = np.random.default_rng(0).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def training_batches(data: TaskData, cfg: FinetuneConfig, seed: int, block_size: int):
    """Endless training batches, reshuffled every epoch, the order fixed by `seed`."""
    for epoch in range(10**9):
        if data.task.kind == "lm":
            # an epoch is capped at what max_steps can use, so a large domain is not cut in full
            yield from make_batches(
                data.train,
                block_size,
                data.batch_size,
                cfg.max_steps * data.batch_size * block_size,
                seed=seed * 1000 + epoch,
            )
        else:
            yield from train_batches(data.train, data.batch_size, seed, epoch)


def training_documents(
    task: Task,
    tok,
    block_size: int = 10**9,
    data_dir=None,
    task_source: str = "",
    val_frac: float = 0.2,
    heldout_frac: float = 0.1,
) -> list[np.ndarray]:
    """Token arrays of the task's training split (labelled: prompt + right answer): the text a
    reduction's statistics and router warm-up read."""
    if task.kind == "lm":
        return domain_docs(task, data_dir, heldout_frac)["train"]
    train = examples(task, task_source or None, val_frac, heldout_frac)["train"]
    return answered(encode(tok, train, block_size, task.max_text_tokens))
