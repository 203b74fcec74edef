"""The study, end to end: each step's notebook through papermill, then the book.

    python -m uncurl.study --profile small              # run what changed, then build the book
    python -m uncurl.study --profile small --dry-run    # list what would run, and why
    python -m uncurl.study --profile smoke --only pretrain --force

The steps are the `[[study]]` tables of uncurl/profiles.toml. A run is one step's notebook with one
set of parameters; its executed copy goes to build/<profile>/<notebook>[__name=value...].ipynb and
its results to the folder of the same name beside it. A run is skipped when its notebook, its
parameters, the library modules it imported, the profile, its input files and what the runs
before it wrote have the content hashes of its last successful execution, and what it wrote is
still there. A failed run stops the study with the notebook's error and the path of its
executed copy; finished runs stay cached. The book is rendered from the executed notebooks (it
never retrains) with warnings as errors. Paths are relative to the repository root, where
notebooks execute.
"""

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from uncurl.config import PROFILES_PATH, Profile, get_profile, load_study, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BOOK = ROOT / "book"
LIBRARY = Path(__file__).resolve().parent
STEP_KEYS = {"name", "notebook", "foreach", "parameters", "after", "inputs", "chapter"}
TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,),
         "dict": (dict,)}


class StudyError(RuntimeError):
    """A problem with the manifest, a notebook or a run, said in one message."""


@dataclass(frozen=True)
class Step:
    name: str
    notebook: str
    foreach: dict = dataclasses.field(default_factory=dict)
    parameters: dict = dataclasses.field(default_factory=dict)
    after: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    chapter: str | None = None


@dataclass(frozen=True)
class Run:
    step: Step
    label: str  # pretrain[n_expert=4]
    parameters: dict  # exactly what papermill passes
    notebook: Path  # the source notebook
    executed: Path  # build/<profile>/<stem>.ipynb
    out: Path  # build/<profile>/<stem>/: the run's results
    inputs: tuple[Path, ...]
    after: tuple[str, ...]  # labels of the runs this one reads from


# ------------------------------------------------------------------------------- the manifest

def load_steps(path: Path = PROFILES_PATH) -> list[Step]:
    """The `[[study]]` steps, checked, in dependency order."""
    steps = []
    for raw in load_study(path):
        unknown = sorted(set(raw) - STEP_KEYS)
        if unknown or "name" not in raw or "notebook" not in raw:
            raise StudyError(f"study step {raw.get('name', raw)!r}: needs name and notebook, "
                             f"may have {sorted(STEP_KEYS)}; unknown {unknown}")
        steps.append(Step(**{**raw, "after": tuple(raw.get("after", ())),
                             "inputs": tuple(raw.get("inputs", ()))}))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise StudyError(f"study step names must be unique: {names}")
    return _dependency_order(steps)


def _dependency_order(steps: list[Step]) -> list[Step]:
    by_name = {s.name: s for s in steps}
    order, state = [], {}

    def visit(step: Step, path: tuple[str, ...]):
        if state.get(step.name) == "done":
            return
        if step.name in path:
            raise StudyError(f"study steps depend on each other in a cycle: {' -> '.join(path)}")
        for dep in step.after:
            if dep not in by_name:
                raise StudyError(f"step {step.name!r} runs after unknown step {dep!r}")
            visit(by_name[dep], (*path, step.name))
        state[step.name] = "done"
        order.append(step)

    for step in steps:
        visit(step, ())
    return order


def plan(profile: Profile, steps: list[Step], build: Path, runs: Path,
         overrides: dict | None = None, notebooks: Path = NOTEBOOKS) -> list[Run]:
    """Every run of the study for `profile`, in dependency order, parameters resolved."""
    overrides = dict(overrides or {})
    used, result, labels = set(), [], {}
    for step in steps:
        notebook = notebooks / f"{step.notebook}.ipynb"
        declared = declared_parameters(notebook)
        for values in _expand(step, profile):
            stem = "__".join([step.notebook, *(f"{k}={v}" for k, v in values.items())])
            label = step.name + (f"[{','.join(f'{k}={v}' for k, v in values.items())}]"
                                 if values else "")
            params = {"profile": profile.name, "out": str(build / stem), **values}
            context = {"runs": str(runs), "profile": profile.name, **params}
            for key, value in step.parameters.items():
                params[key] = _fill(value, context, label)
                context[key] = params[key]
            for key, value in overrides.items():
                if key in declared:
                    params[key] = context[key] = value
                    used.add(key)
            check_parameters(label, notebook, params, declared)
            inputs = tuple(Path(_fill(i, context, label)) for i in step.inputs)
            after = tuple(lab for dep in step.after for lab in labels.get(dep, []))
            result.append(Run(step, label, params, notebook, build / f"{stem}.ipynb",
                              build / stem, inputs, after))
            labels.setdefault(step.name, []).append(label)
    unused = sorted(set(overrides) - used)
    if unused:
        raise StudyError(f"--set {', '.join(unused)}: no notebook of the study declares "
                         f"{'it' if len(unused) == 1 else 'them'}")
    return result


def _expand(step: Step, profile: Profile) -> list[dict]:
    """One parameter dict per run of `step`: the product of its `foreach` lists."""
    combos = [{}]
    for param, field in step.foreach.items():
        values = getattr(profile, field, None)
        if not isinstance(values, (list, tuple)):
            raise StudyError(f"step {step.name!r}: foreach {param} = {field!r} must name a list "
                             f"field of the profile (such as 'expert_counts')")
        combos = [{**c, param: v} for c in combos for v in values]
    return combos


def _fill(value, context: dict, label: str):
    if not isinstance(value, str):
        return value
    try:
        return value.format_map(context)
    except KeyError as exc:
        raise StudyError(f"{label}: {value!r} refers to {exc.args[0]!r}, which is neither "
                         f"'runs', 'profile' nor one of its parameters") from None


def declared_parameters(notebook: Path) -> dict:
    """The notebook's `parameters` cell: name -> {inferred_type_name, default, help}."""
    if not notebook.exists():
        raise StudyError(f"notebook {notebook} does not exist")
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    if not declared:
        raise StudyError(f"{notebook} has no cell tagged 'parameters'")
    return declared


def check_parameters(label: str, notebook: Path, params: dict, declared: dict) -> None:
    """Refuse what papermill would only warn about: undeclared or mistyped parameters."""
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise StudyError(f"{label}: {notebook.name} does not declare parameter(s) "
                         f"{', '.join(unknown)}; it declares {', '.join(sorted(declared))}")
    for name, value in params.items():
        types = TYPES.get(declared[name]["inferred_type_name"])
        if types and (not isinstance(value, types) or (bool not in types
                                                         and isinstance(value, bool))):
            raise StudyError(f"{label}: parameter {name} of {notebook.name} is "
                             f"{declared[name]['inferred_type_name']}, got {value!r}")


# ------------------------------------------------------------------------------------ hashes

def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def notebook_digest(path: Path) -> str:
    """The notebook's cells (type, source, tags): outputs and metadata do not matter."""
    cells = json.loads(path.read_text())["cells"]
    return sha(json.dumps([(c["cell_type"], "".join(c["source"]),
                            c.get("metadata", {}).get("tags", [])) for c in cells]))


def library_files(run: Run) -> list[str]:
    """The library modules the run's notebook imported (its results.json lists them); every
    module of the package if it did not say."""
    results = _abs(run.out) / "results.json"
    used = json.loads(results.read_text()).get("library") if results.exists() else None
    if used:
        return sorted(used)
    return sorted(str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py")
                  if "__pycache__" not in p.parts and p.name != Path(__file__).name)


def library_digest(files: list[str]) -> str:
    """Content hash of library source files (a deleted file counts as a change)."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = _abs(name)
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"<missing>"))
    return h.hexdigest()


def file_digests(paths) -> dict[str, str]:
    return {_rel(p): sha(_abs(p).read_bytes()) for p in sorted(paths, key=str)}


def _rel(path) -> str:
    """`path` relative to the repository root when it lies inside it (records stay portable)."""
    path = _abs(path)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _abs(path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


class Cache:
    """One JSON record per successful run under <build>/.cache/: its key and what it wrote."""

    def __init__(self, build: Path):
        self.folder = _abs(build) / ".cache"

    def path(self, run: Run) -> Path:
        return self.folder / f"{run.executed.stem}.json"

    def get(self, run: Run) -> dict | None:
        path = self.path(run)
        return json.loads(path.read_text()) if path.exists() else None

    def forget(self, run: Run) -> None:
        self.path(run).unlink(missing_ok=True)

    def put(self, run: Run, key: dict, produced: dict, seconds: float) -> dict:
        files = library_files(run)
        record = {"label": run.label, "key": key, "library_files": files,
                  "library": library_digest(files), "produced": produced, "seconds": seconds,
                  "executed": str(run.executed)}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(run).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.path(run))
        return record


def produced_digest(record: dict) -> str:
    return sha(json.dumps(record["produced"], sort_keys=True))


def run_key(run: Run, profile: Profile, deps: dict[str, dict]) -> dict:
    """The content hashes that decide whether `run` is up to date (with the library's)."""
    missing = [str(p) for p in run.inputs if not _abs(p).exists()]
    if missing:
        raise StudyError(f"{run.label}: input file(s) {', '.join(missing)} do not exist")
    return {
        "notebook": notebook_digest(run.notebook),
        "parameters": sha(json.dumps(run.parameters, sort_keys=True)),
        "profile": sha(json.dumps(dataclasses.asdict(profile), sort_keys=True)),
        "inputs": sha(json.dumps(file_digests(run.inputs))),
        "after": sha(json.dumps({label: produced_digest(deps[label]) for label in run.after},
                                sort_keys=True)),
    }


def produced_files(run: Run) -> dict[str, str]:
    """Content hashes of what a run wrote: its results folder and the outputs it declared."""
    out = _abs(run.out)
    files = [p for p in sorted(out.rglob("*")) if p.is_file()] if out.exists() else []
    results = out / "results.json"
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
    if not _abs(run.executed).exists():
        return "executed notebook missing"
    for path, digest in record["produced"].items():
        if not _abs(path).exists():
            return f"{path} missing"
        if sha(_abs(path).read_bytes()) != digest:
            return f"{path} changed"
    return None


# --------------------------------------------------------------------------------- execution

def execute(notebook: str, executed: str, parameters: dict, cwd: str) -> dict:
    """Run one notebook through papermill's Python API; errors come back as data."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    start = time.perf_counter()
    os.environ.setdefault("MPLBACKEND", "Agg")
    Path(executed).parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(notebook, executed, parameters=parameters, cwd=cwd,
                                   kernel_name="python3", progress_bar=False, log_output=False,
                                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as exc:
        return {"ok": False, "seconds": time.perf_counter() - start,
                "error": f"{exc.ename}: {exc.evalue}", "traceback": str(exc)}
    except Exception as exc:  # the kernel died, timed out, or the notebook is broken
        return {"ok": False, "seconds": time.perf_counter() - start,
                "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"ok": True, "seconds": time.perf_counter() - start}


class Progress:
    def __init__(self, total: int):
        self.total, self.start, self.count = total, time.perf_counter(), 0

    def __call__(self, label: str, message: str, new: bool = True) -> None:
        self.count += new
        elapsed = int(time.perf_counter() - self.start)
        print(f"[{self.count}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] {label}: {message}",
              flush=True)


def select(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs named by --only (step names, run labels or notebook stems; globs allowed)."""
    if not only:
        return runs
    chosen = [r for r in runs if any(name == pattern or fnmatch.fnmatchcase(name, pattern)
                                     for pattern in only
                                     for name in (r.step.name, r.label, r.executed.stem))]
    if not chosen:
        raise StudyError(f"--only {' '.join(only)} matches no run; runs: "
                         f"{', '.join(r.label for r in runs)}")
    return chosen


def run_study(profile: Profile, build: Path, runs_dir: Path, only=(), force: bool = False,
              dry_run: bool = False, jobs: int = 2, overrides: dict | None = None,
              steps: list[Step] | None = None, notebooks: Path = NOTEBOOKS) -> dict[str, str]:
    """Execute what is not up to date, in dependency order, `jobs` notebooks at a time.

    Returns what happened to each selected run: "cached" or "ran (why)"; with `dry_run`,
    "cached" or "would run (why)".
    """
    all_runs = plan(profile, load_steps() if steps is None else steps, build, runs_dir,
                    overrides, notebooks)
    todo = select(all_runs, list(only))
    cache = Cache(build)
    records = {r.label: cache.get(r) for r in all_runs}
    selected = {r.label for r in todo}
    for run in todo:
        for dep in run.after:
            if dep not in selected and records[dep] is None:
                raise StudyError(f"{run.label} reads what {dep} writes, which has not run; "
                                 f"run without --only first")
    if dry_run:
        return _print_plan(todo, records, profile, force)
    progress = Progress(len(todo))
    outcome = {}
    pool = (concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(
        "spawn")) if jobs > 1 and len(todo) > 1 else None)
    capacity = jobs if pool else 1
    pending, running, finished, failed = list(todo), {}, set(), None
    try:
        while pending or running:
            for run in list(pending):
                if failed or len(running) >= capacity:
                    break
                if any(dep in selected and dep not in finished for dep in run.after):
                    continue
                pending.remove(run)
                key = run_key(run, profile, records)
                why = "forced" if force else staleness(run, records[run.label], key)
                if why is None:
                    progress(run.label, "cached")
                    finished.add(run.label)
                    outcome[run.label] = "cached"
                    continue
                outcome[run.label] = f"ran ({why})"
                cache.forget(run)  # its executed copy is about to be replaced
                records[run.label] = None
                progress(run.label, f"running ({why})")
                args = (str(run.notebook), str(_abs(run.executed)), run.parameters, str(ROOT))
                running[pool.submit(execute, *args) if pool else _done(execute(*args))] = (run,
                                                                                           key)
            if not running:
                if failed or not pending:
                    break
                if not any(all(d not in selected or d in finished for d in r.after)
                           for r in pending):
                    raise StudyError(f"cannot order {', '.join(r.label for r in pending)}")
                continue
            done, _ = concurrent.futures.wait(running, timeout=60, return_when="FIRST_COMPLETED")
            if not done:  # a long run (training): say that it is alive
                progress(", ".join(r.label for r, _ in running.values()), "still running",
                         new=False)
            for future in done:
                run, key = running.pop(future)
                result = future.result()
                if not result["ok"]:
                    progress(run.label, f"FAILED after {result['seconds']:.0f} s", new=False)
                    failed = failed or (run, result)
                    continue
                records[run.label] = cache.put(run, key, produced_files(run), result["seconds"])
                finished.add(run.label)
                progress(run.label, f"done in {result['seconds']:.0f} s", new=False)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if failed:
        run, result = failed
        raise StudyError(f"{run.label} failed: {result['error']}\n{result['traceback']}\n"
                         f"executed notebook: {_abs(run.executed)}")
    return outcome


def _done(value) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


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


# -------------------------------------------------------------------------------------- book

def assemble_book(all_runs: list[Run], dest: Path, source: Path = BOOK) -> dict[str, bytes]:
    """The book's sources: book/ (its pages, _config.yml, _toc.yml) and each chapter's executed
    notebook as <chapter>.ipynb, written into `dest` (only what changed, so Sphinx rebuilds only
    changed pages)."""
    files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*"))
             if p.is_file() and "_build" not in p.relative_to(source).parts}
    for run in all_runs:
        if run.step.chapter:
            executed = _abs(run.executed)
            if not executed.exists():
                raise StudyError(f"chapter {run.step.chapter!r} needs {executed}, which has not "
                                 f"been executed; run the study without --only first")
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
    """The executed notebook with papermill's injected parameters folded away like the rest."""
    nb = json.loads(executed.read_text())
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell["metadata"]["tags"] = [*tags, "hide-input"]
    return (json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode()


def build_book(all_runs: list[Run], build: Path, html_parent: Path) -> Path:
    """Render the book from the executed notebooks (it never retrains); warnings are errors.

    The HTML goes to <html_parent>/_build/html. Skipped when nothing changed since the last
    build that succeeded.
    """
    source = _abs(build) / "book"
    files = assemble_book(all_runs, source)
    index = _abs(html_parent) / "_build" / "html" / "index.html"
    digest = sha(json.dumps({k: sha(v) for k, v in files.items()}, sort_keys=True)
                 + str(_abs(html_parent)))
    stamp = _abs(build) / ".cache" / "book.json"
    if index.exists() and stamp.exists() and json.loads(stamp.read_text())["digest"] == digest:
        print(f"book up to date: {index}")
        return index
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(source), "--path-output", str(_abs(html_parent)),
           "--warningiserror", "--keep-going"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        log = done.stdout + done.stderr
        problems = [ln for ln in log.splitlines() if "WARNING" in ln or "ERROR" in ln]
        raise StudyError("the book did not build (warnings are errors):\n"
                         + "\n".join(problems or log.splitlines()[-40:]))
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest, "index": str(index)}))
    return index


# ---------------------------------------------------------------------------------------- CLI

def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE pairs; values are JSON where they parse (numbers, true, lists), else text."""
    try:
        return parse_overrides(pairs)
    except ValueError as e:
        raise StudyError(f"--set: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uncurl.study", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="small", help="profile in uncurl/profiles.toml")
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="parent of the training run folders (runs/<profile>/<run>)")
    p.add_argument("--build", type=Path, default=Path("build"),
                   help="executed notebooks and results go to BUILD/<profile>/")
    p.add_argument("--book-out", type=Path, default=Path("book"),
                   help="the book's HTML goes to BOOK_OUT/_build/html")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these steps or runs (step name, run label or glob; repeatable)")
    p.add_argument("--force", action="store_true", help="execute even the runs that are cached")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="list the runs, whether each would execute and why; execute nothing")
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter in every notebook that declares it")
    p.add_argument("--no-book", action="store_true", help="do not build the book")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        profile = get_profile(args.profile)
        build = args.build / profile.name
        outcome = run_study(profile, build, args.runs, args.only, args.force, args.dry_run,
                            args.jobs, parse_sets(args.set))
        if not (args.dry_run or args.no_book):
            all_runs = plan(profile, load_steps(), build, args.runs, parse_sets(args.set))
            if args.only and any(not _abs(r.executed).exists() for r in all_runs
                                 if r.step.chapter):
                print("book not built: some chapters have not been executed yet")
            else:
                print(f"book: {build_book(all_runs, build, args.book_out)}")
    except (StudyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.dry_run:
        ran = sum(v != "cached" for v in outcome.values())
        print(f"study done in {time.perf_counter() - start:.0f} s ({ran} of {len(outcome)} runs "
              f"executed, the rest cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
