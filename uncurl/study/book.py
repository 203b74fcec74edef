"""The Jupyter Book: book/ and the chapters' executed notebooks, rendered with warnings as
errors (it never retrains).

Only chapters whose runs succeeded go in (a run that failed or was killed has no cache record).
The build holds its output folder's lock, waiting for another study's build into it to end (the
book is then the last one built). Sphinx rewrites only the pages it believes out of date, so
after a build that was killed, and may have left a page half written, the next one starts clean.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from uncurl import cpu, layout
from uncurl.study.cache import Cache, sha
from uncurl.study.manifest import ROOT, Run, StudyError, absolute

BOOK = ROOT / "book"
BUILDING = ".building"  # in the output folder while a build runs: left there by a killed one


def assemble_book(all_runs: list[Run], dest: Path, source: Path = BOOK) -> dict[str, bytes]:
    """The book's sources: book/ (its pages, _config.yml, _toc.yml) and each chapter's executed
    notebook as <chapter>.ipynb, written into `dest` (only what changed, so Sphinx rebuilds only
    changed pages)."""
    files = {
        str(p.relative_to(source)): p.read_bytes()
        for p in sorted(source.rglob("*"))
        if p.is_file() and "_build" not in p.relative_to(source).parts
    }
    for run in all_runs:
        if run.step.chapter:
            files[f"{run.step.chapter}.ipynb"] = _book_notebook(absolute(run.executed))
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = dest / name
        if not path.exists() or path.read_bytes() != data:
            layout.write_bytes(path, data)
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest)
        if "_build" not in rel.parts and path.is_file() and str(rel) not in files:
            path.unlink()
    return files


def missing_chapters(all_runs: list[Run], build: Path) -> list[Run]:
    """The chapters' runs that have not succeeded (never ran, failed, or were interrupted)."""
    cache = Cache(build)
    return [r for r in all_runs if r.step.chapter and cache.get(r) is None]


def _book_notebook(executed: Path) -> bytes:
    """The executed notebook with papermill's injected parameters removed from the page, like
    the chapter's other code cells (they compute and glue; the reader sees prose, figures and
    tables, and the code is in notebooks/)."""
    nb = json.loads(executed.read_text())
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell["metadata"]["tags"] = [*tags, "remove-cell"]
    return (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode()


def build_book(all_runs: list[Run], build: Path, html_parent: Path, source: Path = BOOK) -> Path:
    """Render the book from the executed notebooks (it never retrains); warnings are errors.

    The HTML goes to <html_parent>/_build/html. Skipped when nothing changed since the last
    build that succeeded.
    """
    missing = missing_chapters(all_runs, build)
    if missing:
        raise StudyError(
            f"chapter {missing[0].step.chapter!r} needs {missing[0].label}, which has not run "
            f"successfully; run the study without --only first"
        )
    output = absolute(html_parent) / "_build"
    with layout.locked(output, wait=True):
        return _build(all_runs, absolute(build), output, source)


def _build(all_runs: list[Run], build: Path, output: Path, source: Path) -> Path:
    files = assemble_book(all_runs, build / "book", source)
    index = output / "html" / "index.html"
    digest = sha(json.dumps({k: sha(v) for k, v in files.items()}, sort_keys=True) + str(output))
    stamp = build / ".cache" / "book.json"
    if index.exists() and stamp.exists() and layout.read_json(stamp)["digest"] == digest:
        print(f"book up to date: {index}")
        return index
    if (output / BUILDING).exists():
        print(f"the last build into {output} was interrupted: building every page afresh")
        shutil.rmtree(output / ".doctrees", ignore_errors=True)
    layout.write_text(output / BUILDING, f"{os.getpid()}\n")
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [
        str(jb),
        "build",
        str(build / "book"),
        "--path-output",
        str(output.parent),
        "--warningiserror",
        "--keep-going",
    ]
    parent = os.getpid()  # the builder dies with this process: no orphan writes into `output`
    done = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=lambda: cpu.die_with_parent(parent)
    )
    if done.returncode >= 0:  # it ended by itself, so every page it wrote is whole
        (output / BUILDING).unlink()
    if done.returncode != 0:
        log = done.stdout + done.stderr
        problems = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
        raise StudyError(
            "the book did not build (warnings are errors):\n"
            + "\n".join(problems or log.splitlines()[-40:])
        )
    layout.write_json(stamp, {"digest": digest, "index": str(index)})
    return index
