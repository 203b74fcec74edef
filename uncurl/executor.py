"""Run independent jobs on the machine's cores or on a Ray cluster, with progress and logs.

    run_jobs(jobs)                              # a process per core, on this machine
    run_jobs(jobs, "ray", "head-node:6379")     # tasks of a Ray cluster (pip install -e '.[ray]')

A job is a module-level function and its arguments; it writes its results itself (atomically,
where its readers expect them), so a job already done is passed over and an interrupted run of
the jobs resumes where it stopped. Each job's output (prints, warnings, its traceback) goes to
its own log file. Progress says how many jobs are done, running and left, and an estimate of
the time left. The first failure stops the submission of new jobs; those running finish, then
`JobError` names the failed job, its error and its log. On Ray, every node must see the same
files as this machine (a shared filesystem) and run the same Python environment; jobs run in
this process's working directory, with this package first on their path.
"""

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl(2)
HEARTBEAT_S = 60  # with no job finished for this long, say which are still running
EXECUTORS = ("local", "ray")


EXECUTOR_ENV, ADDRESS_ENV = "UNCURL_EXECUTOR", "UNCURL_RAY_ADDRESS"


def configured() -> tuple[str, str | None]:
    """The executor and Ray address `python -m uncurl.study --executor ... --address ...` chose
    for the notebooks it runs (environment variables: how jobs run does not change what they
    compute, so it is not a notebook parameter that would make the step stale)."""
    name = os.environ.get(EXECUTOR_ENV) or "local"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: choose one of {', '.join(EXECUTORS)}")
    return name, os.environ.get(ADDRESS_ENV) or None


class JobError(RuntimeError):
    """A job failed: its name, its error and the path of its log."""


@dataclass(frozen=True)
class Job:
    name: str
    fn: Callable  # a module-level function (it crosses to another process)
    args: tuple
    log: Path  # where the job's output goes
    done: bool = False  # its results are there already: it is not run again


def run_jobs(
    jobs: list[Job], executor: str = "local", address: str | None = None, workers: int = 0
) -> None:
    """Run every job that is not done: on `workers` processes of this machine (default: one per
    core) or as tasks of a Ray cluster (at `address`; without one, the cluster this process
    joined, else a local one). Raises JobError after the first failure."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    todo = [j for j in jobs if not j.done]
    progress = Progress(len(jobs), len(jobs) - len(todo), workers or os.cpu_count() or 1)
    if todo:
        run = _on_ray if executor == "ray" else _on_cores
        run(todo, progress, address, workers or os.cpu_count() or 1)
    progress.failure()


class Progress:
    """Done / running / left and the time left, printed whenever a job starts or ends."""

    def __init__(self, total: int, done: int, slots: int):
        self.total, self.done, self.reused, self.slots = total, done, done, slots
        self.running: dict[str, float] = {}
        self.seconds: list[float] = []
        self.start = time.perf_counter()
        self.failed: tuple[Job, dict] | None = None
        if done:
            self._say(f"{done} job(s) done earlier, reused")

    def started(self, job: Job) -> None:
        self.running[job.name] = time.perf_counter()
        self._say(f"{job.name}: running (log {job.log})")

    def finished(self, job: Job, outcome: dict) -> None:
        self.running.pop(job.name, None)
        self.seconds.append(outcome["seconds"])
        if outcome["ok"]:
            self.done += 1
            self._say(f"{job.name}: done in {outcome['seconds']:.0f} s")
        else:
            self.failed = self.failed or (job, outcome)
            self._say(f"{job.name}: FAILED after {outcome['seconds']:.0f} s")

    def heartbeat(self) -> None:
        self._say(f"{', '.join(self.running)} still running")

    def failure(self) -> None:
        if self.failed:
            job, outcome = self.failed
            raise JobError(f"job {job.name} failed: {outcome['error']}\nlog: {job.log}")

    def _say(self, message: str) -> None:
        left = self.total - self.done - len(self.running) - (self.failed is not None)
        elapsed = time.perf_counter() - self.start
        print(
            f"[jobs: {self.done}/{self.total} done, {len(self.running)} running, {left} left; "
            f"{_clock(elapsed)} elapsed{self._eta(left)}] {message}",
            flush=True,
        )

    def _eta(self, left: int) -> str:
        """Jobs left and half of those running, at the mean time of the finished, per slot."""
        if not self.seconds:
            return ""
        mean = sum(self.seconds) / len(self.seconds)
        return f", ~{_clock(mean * (left + len(self.running) / 2) / self.slots)} left"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_logged(fn: Callable, args: tuple, log: str, cwd: str) -> dict:
    """Run fn(*args) in `cwd`, its output into `log`; its outcome as data (it crosses back)."""
    os.chdir(cwd)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out, redirect_stdout(out), redirect_stderr(out):
        try:
            fn(*args)
        except Exception as exc:  # the job's own failure: reported, not raised here
            traceback.print_exc()
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": _since(start)}
    return {"ok": True, "seconds": _since(start)}


def _since(start: float) -> float:
    return time.perf_counter() - start


def _on_cores(jobs: list[Job], progress: Progress, address, workers: int) -> None:
    """A pool of spawned processes on this machine (spawned: no state forked from this one)."""
    del address
    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with, initargs=(os.getpid(),)
    ) as pool:
        running: dict[concurrent.futures.Future, Job] = {}
        while pending or running:
            while pending and len(running) < workers and not progress.failed:
                job = pending.pop(0)
                running[pool.submit(run_logged, *_call(job))] = job
                progress.started(job)
            if not running:
                break
            done, _ = concurrent.futures.wait(
                running, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
            )
            if not done:
                progress.heartbeat()
            for future in done:
                progress.finished(running.pop(future), future.result())


def _die_with(parent: int) -> None:
    """Make this worker end when the process that started it does, however that one ends (a
    killed study must not leave its jobs running on): Linux's parent-death signal."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)


def _on_ray(jobs: list[Job], progress: Progress, address: str | None, workers: int) -> None:
    """One Ray task (one CPU) per job; a cluster started here is shut down afterwards."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_logged).options(
            runtime_env={"env_vars": {"PYTHONPATH": _package_root()}}
        )
        pending, running = list(jobs), {}
        while pending or running:
            room = progress.slots = int(ray.cluster_resources().get("CPU", workers))
            while pending and len(running) < room and not progress.failed:
                job = pending.pop(0)
                running[remote.remote(*_call(job))] = job
                progress.started(job)
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=HEARTBEAT_S)
            if not done:
                progress.heartbeat()
            for ref in done:
                progress.finished(running.pop(ref), ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def _call(job: Job) -> tuple:
    return job.fn, job.args, str(Path(job.log).absolute()), os.getcwd()


def _package_root() -> str:
    """The folder holding this `uncurl` package, first on a Ray worker's path (a worker would
    otherwise import whatever `uncurl` its site-packages name)."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(
        [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
