"""The Jupyter Book: book/ and the chapters' executed notebooks, rendered with warnings as
errors (it never retrains)."""

import json
import subprocess
import sys
from pathlib import Path

from uncurl import layout
from uncurl.study.cache import sha
from uncurl.study.manifest import ROOT, Run, StudyError, absolute

BOOK = ROOT / "book"


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
            executed = absolute(run.executed)
            if not executed.exists():
                raise StudyError(
                    f"chapter {run.step.chapter!r} needs {executed}, which has not "
                    f"been executed; run the study without --only first"
                )
            files[f"{run.step.chapter}.ipynb"] = _book_notebook(executed)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = dest / name
        if not path.exists() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest)
        if "_build" not in rel.parts and path.is_file() and str(rel) not in files:
            path.unlink()
    return files


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


def build_book(all_runs: list[Run], build: Path, html_parent: Path) -> Path:
    """Render the book from the executed notebooks (it never retrains); warnings are errors.

    The HTML goes to <html_parent>/_build/html. Skipped when nothing changed since the last
    build that succeeded.
    """
    source = absolute(build) / "book"
    files = assemble_book(all_runs, source)
    index = absolute(html_parent) / "_build" / "html" / "index.html"
    digest = sha(
        json.dumps({k: sha(v) for k, v in files.items()}, sort_keys=True)
        + str(absolute(html_parent))
    )
    stamp = absolute(build) / ".cache" / "book.json"
    if index.exists() and stamp.exists() and layout.read_json(stamp)["digest"] == digest:
        print(f"book up to date: {index}")
        return index
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [
        str(jb),
        "build",
        str(source),
        "--path-output",
        str(absolute(html_parent)),
        "--warningiserror",
        "--keep-going",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        log = done.stdout + done.stderr
        problems = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
        raise StudyError(
            "the book did not build (warnings are errors):\n"
            + "\n".join(problems or log.splitlines()[-40:])
        )
    layout.write_json(stamp, {"digest": digest, "index": str(index)})
    return index
