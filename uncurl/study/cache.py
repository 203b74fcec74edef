"""Whether a run is up to date: content hashes of what it depends on, kept in one record per
successful run, and what it wrote."""

import dataclasses
import hashlib
import json
from pathlib import Path

from uncurl import layout
from uncurl.config import Profile
from uncurl.study.manifest import ROOT, Run, StudyError, absolute, read_notebook

LIBRARY = ROOT / "uncurl"
RUNNER = Path(__file__).resolve().parent  # the study package: it runs notebooks, they never use it


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def notebook_digest(path: Path) -> str:
    """The notebook's cells (type, source, tags), whatever its format: outputs and metadata do
    not matter."""
    return sha(
        json.dumps(
            [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in read_notebook(path).cells]
        )
    )


def library_files(run: Run) -> list[str]:
    """The library modules the run's notebook imported (its results record lists them); every
    module of the package if it did not say."""
    results = absolute(run.out) / layout.RESULTS
    used = json.loads(results.read_text()).get("library") if results.exists() else None
    if used:
        return sorted(used)
    return sorted(
        str(p.relative_to(ROOT))
        for p in LIBRARY.rglob("*.py")
        if "__pycache__" not in p.parts and not p.is_relative_to(RUNNER)
    )


def library_digest(files: list[str]) -> str:
    """Content hash of library source files (a deleted file counts as a change)."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = absolute(name)
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"<missing>"))
    return h.hexdigest()


def file_digests(paths) -> dict[str, str]:
    return {_relative(p): sha(absolute(p).read_bytes()) for p in sorted(paths, key=str)}


def _relative(path) -> str:
    """`path` relative to the repository root when it lies inside it (records stay portable)."""
    path = absolute(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Cache:
    """One JSON record per successful run under <build>/.cache/: its key and what it wrote."""

    def __init__(self, build: Path):
        self.folder = absolute(build) / ".cache"

    def path(self, run: Run) -> Path:
        return self.folder / f"{run.executed.stem}.json"

    def get(self, run: Run) -> dict | None:
        path = self.path(run)
        return json.loads(path.read_text()) if path.exists() else None

    def forget(self, run: Run) -> None:
        self.path(run).unlink(missing_ok=True)

    def put(self, run: Run, key: dict, produced: dict, seconds: float) -> dict:
        files = library_files(run)
        record = {
            "label": run.label,
            "key": key,
            "library_files": files,
            "library": library_digest(files),
            "produced": produced,
            "seconds": seconds,
            "executed": str(run.executed),
        }
        layout.write_json(self.path(run), record)
        return record


def produced_digest(record: dict) -> str:
    return sha(json.dumps(record["produced"], sort_keys=True))


def run_key(run: Run, profile: Profile, records: dict[str, dict]) -> dict:
    """The content hashes that decide whether `run` is up to date (with the library's);
    `records` holds the cache records of the runs it reads from."""
    missing = [str(p) for p in run.inputs if not absolute(p).exists()]
    if missing:
        raise StudyError(f"{run.label}: input file(s) {', '.join(missing)} do not exist")
    return {
        "notebook": notebook_digest(run.notebook),
        "parameters": sha(json.dumps(run.parameters, sort_keys=True)),
        "profile": sha(json.dumps(dataclasses.asdict(profile), sort_keys=True)),
        "inputs": sha(json.dumps(file_digests(run.inputs))),
        "after": sha(
            json.dumps(
                {label: produced_digest(records[label]) for label in run.after}, sort_keys=True
            )
        ),
    }


def produced_files(run: Run) -> dict[str, str]:
    """Content hashes of what a run wrote: its results folder and the outputs it declared."""
    out = absolute(run.out)
    files = [p for p in sorted(out.rglob("*")) if p.is_file()] if out.exists() else []
    results = out / layout.RESULTS
    declared = json.loads(results.read_text()).get("outputs", []) if results.exists() else []
    return file_digests([*files, *declared])


def staleness(run: Run, record: dict | None, key: dict) -> str | None:
    """Why `run` must execute again, or None when its last execution still stands."""
    if record is None:
        return "never ran"
    changed = [name for name, digest in key.items() if record["key"].get(name) != digest]
    files = record.get("library_files")
    if not files or library_digest(files) != record.get("library"):
        changed.append("library")
    if changed:
        return f"{', '.join(changed)} changed"
    if not absolute(run.executed).exists():
        return "executed notebook missing"
    for path, digest in record["produced"].items():
        if not absolute(path).exists():
            return f"{path} missing"
        if sha(absolute(path).read_bytes()) != digest:
            return f"{path} changed"
    return None
