"""The study, end to end: each step's notebook through papermill, then the book.

python -m uncurl.study --profile small              # run what changed, then build the book
python -m uncurl.study --profile small --dry-run    # list what would run, and why
python -m uncurl.study --profile smoke --only pretrain --force
python -m uncurl.study --profile small --executor ray --address HEAD:6379  # the grid on Ray
"""

import argparse
import os
import sys
import time
from pathlib import Path

from uncurl.config import get_profile, parse_overrides
from uncurl.executor import ADDRESS_ENV, EXECUTOR_ENV, EXECUTORS
from uncurl.layout import FolderInUse
from uncurl.study import StudyError, build_book, load_steps, plan, run_study
from uncurl.study.book import missing_chapters


def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE pairs; values are JSON where they parse (numbers, true, lists), else text."""
    try:
        return parse_overrides(pairs)
    except ValueError as e:
        raise StudyError(f"--set: {e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uncurl.study", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="small", help="profile in uncurl/profiles.toml")
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="parent of the training run folders (runs/<profile>/<run>)",
    )
    p.add_argument(
        "--build",
        type=Path,
        default=Path("build"),
        help="executed notebooks and results go to BUILD/<profile>/",
    )
    p.add_argument(
        "--book-out",
        type=Path,
        default=Path("book"),
        help="the book's HTML goes to BOOK_OUT/_build/html",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these steps or runs (step name, run label or glob; repeatable)",
    )
    p.add_argument("--force", action="store_true", help="execute even the runs that are cached")
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="list the runs, whether each would execute and why; execute nothing",
    )
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter in every notebook that declares it",
    )
    p.add_argument("--no-book", action="store_true", help="do not build the book")
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where the fine-tuning grid's jobs run: this machine's cores, or a Ray cluster",
    )
    p.add_argument("--address", help="with --executor ray: the cluster's HOST:PORT")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    # the notebooks' grid jobs read these (uncurl.executor.configured)
    os.environ[EXECUTOR_ENV] = args.executor
    os.environ[ADDRESS_ENV] = args.address or ""
    try:
        profile = get_profile(args.profile)
        build = args.build / profile.name
        outcome = run_study(
            profile,
            build,
            args.runs,
            args.only,
            args.force,
            args.dry_run,
            args.jobs,
            parse_sets(args.set),
        )
        if not (args.dry_run or args.no_book):
            _book(profile, build, args)
    except (StudyError, ValueError, FolderInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.dry_run:
        ran = sum(v != "cached" for v in outcome.values())
        print(
            f"study done in {time.perf_counter() - start:.0f} s ({ran} of {len(outcome)} runs "
            f"executed, the rest cached)"
        )
    return 0


def _book(profile, build: Path, args) -> None:
    """Build the book, unless --only left some chapter without a successful run."""
    all_runs = plan(profile, load_steps(), build, args.runs, parse_sets(args.set))
    if args.only and missing_chapters(all_runs, build):
        print("book not built: some chapters have not been executed yet")
    else:
        print(f"book: {build_book(all_runs, build, args.book_out)}")


if __name__ == "__main__":
    sys.exit(main())
