"""Executing the study: what is not up to date goes through papermill, in dependency order,
in `jobs` spawned worker processes (or in this one), while the study holds its build folder's
lock (a second study on it is refused). Workers die with the study, so a killed study leaves no
notebook executing that its rerun would execute again."""

import concurrent.futures
import contextlib
import multiprocessing
import os
import time
import traceback
from pathlib import Path

from uncurl import cpu, layout
from uncurl.config import Profile
from uncurl.study.cache import Cache, produced_files, run_key, staleness
from uncurl.study.manifest import (
    KERNEL,
    NOTEBOOKS,
    ROOT,
    InOrder,
    Run,
    Step,
    StudyError,
    absolute,
    load_steps,
    plan,
    select,
)

HEARTBEAT_S = 60  # with no run finished for this long (training), say that they are alive


def execute(notebook: str, executed: str, parameters: dict, cwd: str) -> dict:
    """Run one notebook through papermill's Python API; errors come back as data."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    os.environ.setdefault("MPLBACKEND", "Agg")
    Path(executed).parent.mkdir(parents=True, exist_ok=True)
    try:
        with _job(f"python -m uncurl.study, executing {executed}"):  # what its locks say
            papermill.execute_notebook(
                notebook,
                executed,
                parameters=parameters,
                cwd=cwd,
                kernel_name=KERNEL["name"],
                progress_bar=False,
                log_output=False,
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
            )
    except PapermillExecutionError as exc:
        return {
            "ok": False,
            "seconds": time.perf_counter() - start,
            "error": f"{exc.ename}: {exc.evalue}",
            "traceback": str(exc),
        }
    except Exception as exc:  # the kernel died, timed out, or the notebook is broken
        return {
            "ok": False,
            "seconds": time.perf_counter() - start,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    return {"ok": True, "seconds": time.perf_counter() - start}


@contextlib.contextmanager
def _job(description: str):
    """`layout.JOB` set to `description` for the kernels started in the block."""
    before = os.environ.get(layout.JOB)
    os.environ[layout.JOB] = description
    try:
        yield
    finally:
        if before is None:
            del os.environ[layout.JOB]
        else:
            os.environ[layout.JOB] = before


class Progress:
    def __init__(self, total: int):
        self.total, self.start, self.count = total, time.perf_counter(), 0

    def __call__(self, label: str, message: str, new: bool = True) -> None:
        self.count += new
        elapsed = int(time.perf_counter() - self.start)
        print(
            f"[{self.count}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] {label}: {message}",
            flush=True,
        )


def run_study(
    profile: Profile,
    build: Path,
    runs_dir: Path,
    only=(),
    force: bool = False,
    dry_run: bool = False,
    jobs: int = 2,
    overrides: dict | None = None,
    steps: list[Step] | None = None,
    notebooks: Path = NOTEBOOKS,
) -> dict[str, str]:
    """Execute what is not up to date, in dependency order, `jobs` notebooks at a time.

    Returns what happened to each selected run: "cached" or "ran (why)"; with `dry_run`,
    "cached" or "would run (why)".
    """
    all_runs = plan(
        profile, load_steps() if steps is None else steps, build, runs_dir, overrides, notebooks
    )
    todo = select(all_runs, list(only))
    cache = Cache(build)
    with contextlib.nullcontext() if dry_run else layout.locked(absolute(build)):
        records = {r.label: cache.get(r) for r in all_runs}
        selected = {r.label for r in todo}
        for run in todo:
            for dep in run.after:
                if dep not in selected and records[dep] is None:
                    raise StudyError(
                        f"{run.label} reads what {dep} writes, which has not run; "
                        f"run without --only first"
                    )
        if dry_run:
            return _print_plan(todo, records, profile, force)
        execution = Execution(todo, records, cache, profile, force)
        if jobs > 1 and len(todo) > 1:
            execution.in_pool(jobs)
        else:
            execution.in_process()
        execution.raise_failure()
        return execution.outcome


class Execution:
    """One pass over the selected runs: cached ones are passed over, the others execute once
    the runs they read from have finished; the first failure stops it."""

    def __init__(self, todo: list[Run], records: dict, cache: Cache, profile: Profile, force: bool):
        self.runs = {r.label: r for r in todo}
        self.order = InOrder({r.label: tuple(d for d in r.after if d in self.runs) for r in todo})
        self.records, self.cache, self.profile, self.force = records, cache, profile, force
        self.progress = Progress(len(todo))
        self.outcome: dict[str, str] = {}
        self.waiting: tuple[Run, dict, str] | None = None  # stale, ready, not yet started
        self.failed: tuple[Run, dict] | None = None

    def in_process(self) -> None:
        """Execute in this process, one run at a time, in dependency order (the manifest's
        wherever it allows)."""
        while started := self._start([], capacity=1):
            self._finish(*started, execute(*_arguments(started[0])))

    def in_pool(self, jobs: int) -> None:
        """Execute in `jobs` spawned worker processes, starting each run once it may."""
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=cpu.die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            running: dict[concurrent.futures.Future, tuple[Run, dict]] = {}
            while True:
                while started := self._start([r for r, _ in running.values()], jobs):
                    running[pool.submit(execute, *_arguments(started[0]))] = started
                if not running:
                    break
                done, _ = concurrent.futures.wait(
                    running, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
                )
                if not done:
                    self.progress(
                        ", ".join(r.label for r, _ in running.values()), "still running", new=False
                    )
                for future in done:
                    self._finish(*running.pop(future), future.result())

    def _start(self, running: list[Run], capacity: int) -> tuple[Run, dict] | None:
        """The next run to execute beside `running`, and its key; None when none may start
        now: after a failure, at capacity, or while a run that must be alone waits or runs."""
        if self.failed or len(running) >= capacity or any(r.step.alone for r in running):
            return None
        self.waiting = self.waiting or self._next_stale()
        if self.waiting is None or (running and self.waiting[0].step.alone):
            return None
        (run, key, why), self.waiting = self.waiting, None
        self.outcome[run.label] = f"ran ({why})"
        self.cache.forget(run)  # its executed copy is about to be replaced
        self.records[run.label] = None
        self.progress(run.label, f"running ({why})")
        return run, key

    def _next_stale(self) -> tuple[Run, dict, str] | None:
        """The next ready run that must execute, its key and why; the cached ones before it
        are passed over, which makes their dependents ready."""
        while (label := self.order.next()) is not None:
            run = self.runs[label]
            key = run_key(run, self.profile, self.records)
            why = "forced" if self.force else staleness(run, self.records[label], key)
            if why:
                return run, key, why
            self.progress(label, "cached")
            self.outcome[label] = "cached"
            self.order.done(label)
        return None

    def _finish(self, run: Run, key: dict, result: dict) -> None:
        if not result["ok"]:
            self.progress(run.label, f"FAILED after {result['seconds']:.0f} s", new=False)
            self.failed = self.failed or (run, result)
            return
        self.records[run.label] = self.cache.put(run, key, produced_files(run), result["seconds"])
        self.order.done(run.label)
        self.progress(run.label, f"done in {result['seconds']:.0f} s", new=False)

    def raise_failure(self) -> None:
        """The first failed run's error and its executed notebook, as a StudyError."""
        if self.failed:
            run, result = self.failed
            raise StudyError(
                f"{run.label} failed: {result['error']}\n{result['traceback']}\n"
                f"executed notebook: {absolute(run.executed)}"
            )


def _arguments(run: Run) -> tuple:
    """`execute`'s arguments for `run` (plain values: they cross to a worker process)."""
    return str(run.ipynb), str(absolute(run.executed)), run.parameters, str(ROOT)


def _print_plan(todo: list[Run], records: dict, profile: Profile, force: bool) -> dict:
    """What would execute and why; runs after one that executes are decided only then."""
    will_run, outcome = set(), {}
    for i, run in enumerate(todo, 1):
        waits = [d for d in run.after if d in will_run]
        if force:
            why = "forced"
        elif waits:
            why = f"after {waits[0]}" + (f" and {len(waits) - 1} more" if len(waits) > 1 else "")
        else:
            try:
                why = staleness(run, records[run.label], run_key(run, profile, records))
            except StudyError as exc:
                why = f"cannot: {exc}"
        if why:
            will_run.add(run.label)
        outcome[run.label] = f"would run ({why})" if why else "cached"
        print(f"[{i}/{len(todo)}] {run.label}: {outcome[run.label]}  -> {run.executed}")
    return outcome
