"""Whether a run is up to date: content hashes of what it depends on, kept in one record per
successful run, and what it wrote.

A run depends on its notebook, its parameters, its input files, what the runs before it wrote
(their results without the provenance that differs between identical executions), and the
library modules and profile fields it read. Those last two are hashed, one digest each, when the
run is checked, before it executes; its results then say which modules it imported and which
profile fields it read (`uncurl.report.records`), and the record keeps the digests of those only.
So a change to a module or a profile field reruns exactly the runs that read it, and an edit made
while a run executes counts as a change.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

from uncurl import layout
from uncurl.config import PROFILE_FIELDS, Profile
from uncurl.report.records import VOLATILE
from uncurl.study.manifest import ROOT, Run, StudyError, absolute, read_notebook

LIBRARY = ROOT / "uncurl"
RUNNER = Path(__file__).resolve().parent  # the study package: it runs notebooks, they never use it
FORMAT = 2  # of the cache records; a record of another format is as good as none
READS = ("library", "profile")  # the parts of a key that a run's record narrows to what it read


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


def library_modules() -> list[str]:
    """Every module of the package but the study's own, relative to the repository root."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in LIBRARY.rglob("*.py")
        if "__pycache__" not in p.parts and not p.is_relative_to(RUNNER)
    )


def file_digest(name: str) -> str:
    """Content hash of a source file (a deleted file has a digest of its own)."""
    path = absolute(name)
    return sha(path.read_bytes()) if path.exists() else "missing"


def profile_digests(profile: Profile) -> dict[str, str]:
    """One digest per field of the profile."""
    return {
        field: sha(json.dumps(value, sort_keys=True))
        for field, value in dataclasses.asdict(profile).items()
    }


def file_digests(paths) -> dict[str, str]:
    """Content hash of each file, and of each file inside each folder, by relative path; the
    results of a study run without the provenance that differs between identical executions."""
    files = []
    for path in sorted(map(absolute, paths)):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {_relative(p): _content_digest(p) for p in files}


def _content_digest(path: Path) -> str:
    if path.name != layout.RESULTS:
        return sha(path.read_bytes())
    record = {k: v for k, v in layout.read_json(path).items() if k not in VOLATILE}
    return sha(json.dumps(record, sort_keys=True))


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
        record = layout.read_json(path) if path.exists() else None
        return record if record and record.get("format") == FORMAT else None

    def forget(self, run: Run) -> None:
        self.path(run).unlink(missing_ok=True)

    def put(self, run: Run, key: dict, produced: dict, seconds: float) -> dict:
        """Record a successful execution of `run`, checked with `key` just before it began."""
        read = what_it_read(run)
        record = {
            "format": FORMAT,
            "label": run.label,
            "key": {
                **{k: v for k, v in key.items() if k not in READS},
                "library": {f: _module_digest(key, f) for f in read["library"]},
                "profile": {f: key["profile"][f] for f in read["profile"]},
            },
            "produced": produced,
            "seconds": seconds,
            "executed": str(run.executed),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        layout.remove_temporaries(self.folder, self.path(run).name)  # of a write that was killed
        layout.write_json(self.path(run), record)
        return record


def what_it_read(run: Run) -> dict[str, list[str]]:
    """The library modules and profile fields a run's results say it read; all of them where
    they do not say."""
    results = absolute(run.out) / layout.RESULTS
    said = layout.read_json(results) if results.exists() else {}
    modules, fields = said.get("library"), said.get("profile_fields")
    return {
        "library": sorted(library_modules() if modules is None else modules),
        "profile": sorted(PROFILE_FIELDS if fields is None else fields),
    }


def produced_digest(record: dict) -> str:
    return sha(json.dumps(record["produced"], sort_keys=True))


def run_key(run: Run, profile: Profile, records: dict[str, dict]) -> dict:
    """The content hashes that decide whether `run` is up to date; `records` holds the cache
    records of the runs it reads from."""
    missing = [str(p) for p in run.inputs if not absolute(p).exists()]
    if missing:
        raise StudyError(f"{run.label}: input file(s) {', '.join(missing)} do not exist")
    return {
        "notebook": notebook_digest(run.notebook),
        "parameters": sha(json.dumps(run.parameters, sort_keys=True)),
        "inputs": sha(json.dumps(file_digests(run.inputs))),
        "after": sha(
            json.dumps(
                {label: produced_digest(records[label]) for label in run.after}, sort_keys=True
            )
        ),
        "library": {name: file_digest(name) for name in library_modules()},
        "profile": profile_digests(profile),
    }


def _module_digest(key: dict, name: str) -> str:
    """A module's digest as `key` took it; a file outside the package (a test's stand-in for a
    module) is hashed now."""
    return key["library"].get(name) or file_digest(name)


def produced_files(run: Run) -> dict[str, str]:
    """Content hashes of what a run wrote: its results folder (but hidden files: locks,
    temporaries) and the outputs it declared, files or folders."""
    out = absolute(run.out)
    files = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    results = out / layout.RESULTS
    declared = layout.read_json(results).get("outputs", []) if results.exists() else []
    return file_digests([*files, *declared])


def staleness(run: Run, record: dict | None, key: dict) -> str | None:
    """Why `run` must execute again, or None when its last execution still stands."""
    if record is None:
        return "never ran"
    was = record["key"]
    changed = [name for name, digest in key.items() if name not in READS and was[name] != digest]
    library = [f for f, d in was["library"].items() if _module_digest(key, f) != d]
    profile = [f for f, d in was["profile"].items() if key["profile"].get(f) != d]
    changed += [
        f"{part} ({_names(names)})"
        for part, names in (("library", library), ("profile", profile))
        if names
    ]
    if changed:
        return f"{', '.join(changed)} changed"
    if not absolute(run.executed).exists():
        return "executed notebook missing"
    for path, digest in record["produced"].items():
        if not absolute(path).exists():
            return f"{path} missing"
        if _content_digest(absolute(path)) != digest:
            return f"{path} changed"
    return None


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (
        f" and {len(names) - shown} more" if len(names) > shown else ""
    )
