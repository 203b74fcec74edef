"""The study, end to end: each step's notebook through papermill, then the book.

The steps are the `[[study]]` tables of uncurl/profiles.toml; a step's notebook is
notebooks/<name>.py (jupytext py:percent text) or notebooks/<name>.ipynb. A run is one step's
notebook with one set of parameters; its executed copy goes to
build/<profile>/<notebook>[__name=value...].ipynb and its results to the folder of the same name
beside it. A run is skipped when its notebook's cells, its parameters, the library modules it
imported, the profile fields it read, its input files and what the runs before it wrote have the
content hashes of its last successful execution, and what it wrote is still there. A failed run
stops the study with the notebook's error and the path of its executed copy; finished runs stay
cached. The study holds its build folder's lock while it executes; its workers die with it. The
book is rendered from the executed notebooks (it never retrains) with warnings as errors. Paths
are relative to the repository root, where notebooks execute.

    manifest   the steps, the runs they plan, their parameters, --only
    cache      content hashes, the cache records, staleness
    runner     papermill, in dependency order, `jobs` at a time
    book       the Jupyter Book
    __main__   the command line: python -m uncurl.study --help
"""

from uncurl.study.book import build_book
from uncurl.study.manifest import Run, Step, StudyError, load_steps, plan, select
from uncurl.study.runner import run_study

__all__ = ["StudyError", "Step", "Run", "load_steps", "plan", "run_study", "build_book", "select"]
