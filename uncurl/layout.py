"""Where the study's files live, what its models are called, and how files are written.

The one owner of the on-disk layout; nothing else builds these paths or labels:

    data/cache/<registry>/<package>/                source packages, fetched once (`CACHE`)
    data/prepared/<name>/                           a prepared corpus (`prepared_dir`)
    runs/<profile>/
        dense/, e4/, e8/, ...                       pretraining runs (`Runs.pretrained`)
            checkpoint/  metrics.jsonl  summary.json
        reduced/e32-uncurl-d8-<task>-s<seed>/       reductions on a task (`Runs.reduced`)
        finetune/<task>/<label>/s<seed>/result.json  fine-tuning runs (`Runs.finetuned`)
    runs/sweep/<variant>-<label>/                   premise-sweep runs (`Runs.sweep`)
    build/<profile>/<step>[__name=value...]/results.json   a study step's record

Model labels: `dense`, `e8` (8 experts, from scratch), `e32-uncurl-d8` (32 reduced to 8 by UNCURL).

Every file and folder is written atomically: under a temporary name in the same folder, then
renamed into place, so an interruption leaves the previous version or the new one, never a part.
"""

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

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
_LABEL = re.compile(r"^(?:dense|e(\d+))$|^e(\d+)-(.+)-d(\d+)$")


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


# -------------------------------------------------------------------------------------- paths


def prepared_dir(name: str, vocab_size: int | None = None) -> Path:
    """A prepared corpus folder; with `vocab_size`, a sibling prepared at that vocabulary."""
    return PREPARED / (name if vocab_size is None else f"{name}-v{vocab_size}")


class Runs:
    """The run folders of one profile under a runs root (`runs/` by default)."""

    def __init__(self, root, profile: str):
        self.root, self.profile = Path(root), profile
        self.folder = self.root / profile

    def pretrained(self, n_expert: int) -> Path:
        return self.folder / model_label(n_expert)

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


def step_stem(notebook: str, values: dict) -> str:
    """`01_pretrain__n_expert=4`: a study run's name, from its notebook and foreach values."""
    return "__".join([notebook, *(f"{k}={v}" for k, v in values.items())])


# ------------------------------------------------------------------------------ atomic writes


def write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(path):
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    On an exception nothing at `path` changes. Between the two renames of a replacement the old
    folder sits at `.<name>.old`, which `recover_dir` puts back if the process died there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        yield tmp
        old = _old(path)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path) -> bool:
    """Put back a folder that a replacement interrupted between its two renames; True if so."""
    path, old = Path(path), _old(Path(path))
    if old.exists() and not path.exists():
        os.replace(old, path)
        return True
    shutil.rmtree(old, ignore_errors=True)
    return False


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _plain(obj):
    """JSON for numpy scalars and arrays and for paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
