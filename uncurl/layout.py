"""Where the study's files live, what its models are called, and how files are written.

The one owner of the on-disk layout; nothing else builds these paths or labels:

    data/cache/<registry>/<package>/                source packages, fetched once (`CACHE`)
    data/prepared/<name>/                           a prepared corpus (`prepared_dir`)
    runs/<profile>/
        dense/, e4/, e8/, ...                       pretraining runs (`Runs.pretrained`)
        e8-p1/, ...                                 another pretraining seed's run
            checkpoint/  metrics.jsonl  summary.json
        reduced/e32-uncurl-d8-<task>-s<seed>/       reductions on a task (`Runs.reduced`)
        finetune/<task>/<label>/s<seed>/result.json  fine-tuning runs (`Runs.finetuned`)
        finetune/.logs/<task>-d<D>.log              a grid job's log (`Runs.job_log`)
    runs/sweep/<variant>-<label>/                   premise-sweep runs (`Runs.sweep`)
    build/<profile>/<step>[__name=value...]/results.json   a study step's record

Model labels: `dense`, `e8` (8 experts, from scratch), `e32-uncurl-d8` (32 reduced to 8 by UNCURL).

Every file and folder is written atomically: under a temporary name in the same folder, then
renamed into place, so an interruption leaves the previous version or the new one, never a part.
A folder that several commands may write (a run, a fine-tuning result, a study's build) is held
with `locked` while one of them writes it.
"""

import datetime
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import filelock

CACHE = Path("data/cache")  # registry packages, fetched once
PREPARED = Path("data/prepared")  # prepared corpora, one folder each
CHECKPOINT = "checkpoint"  # a training run's checkpoint folder
SUMMARY = "summary.json"  # a finished training run's summary
METRICS = "metrics.jsonl"  # a training run's per-step metrics
RESULT = "result.json"  # one fine-tuning run: parameters, metrics, per-example scores
RESULTS = "results.json"  # one study step: parameters, values, tables, provenance
REDUCTION = "reduction.json"  # a reduction's record: plan, statistics, timings
META = "meta.json"  # a prepared corpus: vocabulary, counts, provenance, hash
SCRATCH = "scratch"  # the method name of a model trained from scratch
LOCK = ".lock"  # held by the process writing a folder (`locked`)
LOCK_INFO = ".lock.json"  # who holds it: pid, host, command, since when
JOB = "UNCURL_JOB"  # environment variable naming what a process does, for LOCK_INFO's command
_REDUCED = re.compile(r"^(e\d+-.+-d\d+)-(\w+)-s(\d+)$")
_LABEL = re.compile(r"^(?:dense|e(\d+))$|^e(\d+)-(.+)-d(\d+)$")
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- labels


def model_label(
    target_n_expert: int, method: str = SCRATCH, source_n_expert: int | None = None
) -> str:
    """`dense` or `e8` from scratch; `e32-uncurl-d8` for 32 experts reduced to 8 by a method."""
    if method == SCRATCH:
        return "dense" if target_n_expert == 1 else f"e{target_n_expert}"
    return f"e{source_n_expert}-{method}-d{target_n_expert}"


def parse_label(label: str) -> dict:
    """The inverse of `model_label`: {source_n_expert, method, target_n_expert}."""
    m = _LABEL.match(label)
    if not m:
        raise ValueError(f"{label!r} is not a model label (dense, e8 or e32-uncurl-d8)")
    if m.group(2) is None:
        n = int(m.group(1) or 1)
        return {"source_n_expert": n, "method": SCRATCH, "target_n_expert": n}
    return {
        "source_n_expert": int(m.group(2)),
        "method": m.group(3),
        "target_n_expert": int(m.group(4)),
    }


def parse_reduced(name: str) -> dict:
    """A reduction folder's name (`Runs.reduced`) as {label, task, seed}."""
    m = _REDUCED.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a reduction's folder name (e32-uncurl-d8-TASK-sSEED)")
    return {"label": m.group(1), "task": m.group(2), "seed": int(m.group(3))}


# -------------------------------------------------------------------------------------- paths


def prepared_dir(name: str, vocab_size: int | None = None) -> Path:
    """A prepared corpus folder; with `vocab_size`, a sibling prepared at that vocabulary."""
    return PREPARED / (name if vocab_size is None else f"{name}-v{vocab_size}")


class Runs:
    """The run folders of one profile under a runs root (`runs/` by default)."""

    def __init__(self, root, profile: str):
        self.root, self.profile = Path(root), profile
        self.folder = self.root / profile

    def pretrained(self, n_expert: int, seed: int = 0) -> Path:
        """A pretraining run: `e8`, or `e8-p1` for the same model pretrained with seed 1."""
        return self.folder / (model_label(n_expert) + (f"-p{seed}" if seed else ""))

    def reduced(
        self, source_n_expert: int, method: str, target_n_expert: int, task: str, seed: int
    ) -> Path:
        """A reduction on a task with a seed (its sample of the task, clustering, `random`)."""
        label = model_label(target_n_expert, method, source_n_expert)
        return self.folder / "reduced" / f"{label}-{task}-s{seed}"

    def reductions(self, seed: int | None = None) -> list[Path]:
        """Every reduction folder of the profile (of one seed, if given), in name order."""
        pattern = "*" if seed is None else f"*-s{seed}"
        return sorted(
            p
            for p in (self.folder / "reduced").glob(pattern)
            if p.is_dir() and not p.name.startswith(".")
        )

    def sweep(self, variant: str, n_expert: int) -> Path:
        """A premise-sweep run: its variant's label made a folder name, then the model label."""
        slug = "-".join(
            filter(None, "".join(c if c.isalnum() else "-" for c in variant.lower()).split("-"))
        )
        return self.root / "sweep" / f"{slug}-{model_label(n_expert)}"

    @property
    def finetune(self) -> Path:
        return self.folder / "finetune"

    def finetuned(self, task: str, label: str, seed: int) -> Path:
        return self.finetune / task / label / f"s{seed}"

    def job_log(self, job: str) -> Path:
        """The log of one job of the fine-tuning grid (`uncurl.protocol.grid_jobs`)."""
        return self.finetune / ".logs" / f"{job}.log"


def step_stem(notebook: str, values: dict) -> str:
    """`01_pretrain__n_expert=4`: a study run's name, from its notebook and foreach values."""
    return "__".join([notebook, *(f"{k}={v}" for k, v in values.items())])


# ------------------------------------------------------------------------------ atomic writes


def write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically, as UTF-8."""
    return write_bytes(path, text.encode())


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(path):
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    A folder only ever gets the name `path` (or, between the two renames of a replacement,
    `.<name>.old`) by a rename of a complete folder; a part of one only ever lies under a
    `.<name>.<hex>.tmp` name, which nothing reads. On an exception nothing at `path` changes.
    One writer per folder at a time: `recover_dir`, run first, clears what interrupted writes left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = _temporary(path)
    tmp.mkdir(mode=0o755)
    try:
        yield tmp
        old = moved_aside(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _discard(old, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path) -> bool:
    """Before writing `path`: put back the previous folder if a replacement died between its two
    renames (then `.<name>.old` exists and `path` does not); True if so. Also removes what
    interrupted writes left: the temporaries of `path` and a `.<name>.old` that is no longer
    needed. Only a writer that holds the folder may call this (a reader would race a live one)."""
    path, old = Path(path), moved_aside(Path(path))
    recovered = old.exists() and not path.exists()
    if recovered:
        os.replace(old, path)
        log.warning(
            "%s: put back the previous version from %s; the process replacing it died between "
            "its two renames, so its new version was lost",
            path,
            old.name,
        )
    _discard(old, path)
    remove_temporaries(path.parent, path.name)
    return recovered


def remove_temporaries(folder, name: str | None = None) -> None:
    """Remove the temporary files and folders that interrupted writes left in `folder` (those of
    `name` only, if given). Only a writer that holds the folder may call this."""
    temporary = re.compile(rf"\.{re.escape(name) if name else '.+'}\.[0-9a-f]{{12}}\.tmp")
    for leftover in Path(folder).iterdir():
        if temporary.fullmatch(leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif temporary.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    """A fresh temporary name beside `path`: `.<name>.<12 hex digits>.tmp`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _discard(folder: Path, owner: Path) -> None:
    """Remove `folder`, first renaming it to one of `owner`'s temporary names, so that a kill
    while deleting leaves a temporary behind, never a part of a folder under a name that counts."""
    if folder.exists():
        trash = _temporary(owner)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def moved_aside(path) -> Path:
    """Where a replacement of folder `path` keeps the previous version between its two renames."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


# -------------------------------------------------------------------------------------- locks


class FolderInUse(BlockingIOError):
    """Another process holds the lock of a folder this one would write."""


@contextmanager
def locked(folder, wait: bool = False):
    """Hold `folder`'s lock (created if need be) while the block writes there.

    If another process holds it, raise FolderInUse naming the holder, or with `wait`, say so
    and wait. The lock is the operating system's (flock), so it dies with its holder, even by
    SIGKILL; the holder's description in LOCK_INFO is rewritten by the next one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / LOCK)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if not wait:
            raise FolderInUse(
                f"{folder} is in use by {holder(folder)}; wait for it to finish, or stop it"
            ) from None
        log.warning("%s is in use by %s; waiting for it", folder, holder(folder))
        lock.acquire()
    try:
        write_json(folder / LOCK_INFO, _this_process())
        yield folder
    finally:
        (folder / LOCK_INFO).unlink(missing_ok=True)
        lock.release()


def holder(folder) -> str:
    """Who holds `folder`'s lock, as its LOCK_INFO says."""
    try:
        info = read_json(Path(folder) / LOCK_INFO)
    except (OSError, ValueError):
        return "another process (which has not yet said which)"
    return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"


def _this_process() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": os.environ.get(JOB) or shlex.join(sys.orig_argv),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _plain(obj):
    """JSON for numpy scalars and arrays and for paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
