"""Fine-tuning tasks: a registry of real task data that works offline, split stably, never leaking.

    registry    what a task is; the tasks by name (`register`, `get_task`)
    splits      stable train / heldout / val splits of a task's examples or documents
    encoding    token ids and padded batches (`Batch`, `make_batches`)
    catalogue   the registered tasks and the packages they come from
    loading     what a model reads of a task (`load_task`, `training_batches`)

Importing the package registers the catalogue's tasks.
"""

from uncurl.tasks.catalogue import fetch_packages
from uncurl.tasks.encoding import (
    Batch,
    Encoded,
    Packed,
    answer_batch,
    answered,
    encode,
    make_batches,
    packed_batch,
    train_batches,
    unit_batches,
)
from uncurl.tasks.loading import TaskData, load_task, training_batches, training_documents
from uncurl.tasks.registry import TASKS, Example, Task, get_task, register, registry_table
from uncurl.tasks.splits import (
    NEAR_DUPLICATE,
    SPLITS,
    chance,
    distinctive_shingles,
    domain_docs,
    examples,
    majority,
    normal,
    val_titles,
)

__all__ = [
    "NEAR_DUPLICATE",
    "SPLITS",
    "TASKS",
    "Batch",
    "Encoded",
    "Example",
    "Packed",
    "Task",
    "TaskData",
    "answer_batch",
    "distinctive_shingles",
    "answered",
    "chance",
    "domain_docs",
    "encode",
    "examples",
    "fetch_packages",
    "get_task",
    "load_task",
    "majority",
    "make_batches",
    "normal",
    "packed_batch",
    "register",
    "registry_table",
    "train_batches",
    "unit_batches",
    "training_batches",
    "training_documents",
    "val_titles",
]
