"""A study step's record: its tables as CSV and `results.json` with parameters, values and
provenance, which the study runner reads to decide whether the step is up to date: the library
modules and profile fields the step read decide when it must run again."""

import datetime
import inspect
import platform
import sys
import time
from pathlib import Path

from uncurl import layout
from uncurl.config import profile_fields_read
from uncurl.provenance import git_revision, package_versions

# what differs between two executions of the same step with the same inputs: not what it wrote
VOLATILE = ("git", "wall_time_s", "finished")


def write_results(
    out,
    parameters: dict,
    started: float,
    tables: dict | None = None,
    values: dict | None = None,
    outputs=(),
) -> Path:
    """Record a step: tables as CSV and `results.json` with parameters, values and provenance.

    `started` is `time.time()` at the start of the notebook; `outputs` are files the step wrote
    outside `out` (the study runner checks that they still exist before reusing the step).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, table in (tables or {}).items():
        files[name] = f"{name}.csv"
        layout.write_text(out / files[name], table.to_csv(index=False))
    record = {
        "parameters": parameters,
        "values": values or {},
        "tables": files,
        "outputs": [str(p) for p in outputs],
        "git": git_revision(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "library": library_modules(),
        "profile_fields": profile_fields_read(),
        "wall_time_s": time.time() - started,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return layout.write_json(out / layout.RESULTS, record)


def library_modules() -> list[str]:
    """Source files of the uncurl modules this process has imported, relative to the repository
    (the study runner reruns a step when one of them changes)."""
    root = Path(__file__).resolve().parents[2]
    files = {
        Path(m.__file__).resolve()
        for name, m in list(sys.modules.items())
        if (name == "uncurl" or name.startswith("uncurl.")) and getattr(m, "__file__", None)
    }
    return sorted(str(f.relative_to(root)) for f in files)


def setting(fn, parameter: str):
    """The default of `fn`'s `parameter`: a fixed setting of the library that the prose states
    (glued from the code, so that the book follows the code)."""
    return inspect.signature(fn).parameters[parameter].default
