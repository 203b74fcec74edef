"""The study runner: manifest, parameters, dependency order, content-hash cache, failures.

These tests run the runner on two toy notebooks (a few seconds each); tests/test_notebooks.py
runs the real study at the smoke profile.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import killed, sigkilled
from nbformat.v4 import new_code_cell, new_notebook

from uncurl import layout, study
from uncurl.config import Profile, get_profile
from uncurl.study import Step, StudyError, build_book, load_steps, plan, run_study, runner
from uncurl.study.__main__ import main
from uncurl.study.cache import file_digest, notebook_digest, sha
from uncurl.study.manifest import ROOT

PROFILE = Profile(name="toy", expert_counts=(1, 2))

MAKE = (
    """
profile: str = "toy"  # profile
out: str = "out"  # results folder
x: int = 1  # the number to write
lib: str = ""  # a file standing in for the library code this notebook uses
pause: float = 0.0  # seconds to sleep first (a long run)
crash: bool = False  # raise an error on purpose
""",
    """
import json, pathlib, time
if crash:
    raise RuntimeError("asked to crash")
time.sleep(pause)
pathlib.Path(out).mkdir(parents=True, exist_ok=True)
record = {"x": x, "library": [lib], "profile_fields": ["model"]}  # what it read
pathlib.Path(out, "results.json").write_text(json.dumps(record))
""",
)
USE = (
    """
profile: str = "toy"  # profile
out: str = "out"  # results folder
root: str = ""  # where the make runs wrote
scale: int = 2  # factor
fail: bool = False  # raise an error on purpose
lib: str = ""  # a file standing in for the library code this notebook uses
""",
    """
import json, pathlib
if fail:
    raise RuntimeError("asked to fail")
xs = [json.loads(p.read_text())["x"] for p in pathlib.Path(root).glob("make__x=*/results.json")]
pathlib.Path(out).mkdir(parents=True, exist_ok=True)
record = {"y": scale * sum(xs), "library": [lib], "profile_fields": ["train"]}
pathlib.Path(out, "results.json").write_text(json.dumps(record))
""",
)


def write_notebook(path: Path, params: str, body: str) -> None:
    nb = new_notebook(
        cells=[
            new_code_cell(params.strip(), metadata={"tags": ["parameters"]}),
            new_code_cell(body.strip()),
        ],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    path.write_text(nbformat.writes(nb))


class Toy:
    """Two toy steps: `make` once per expert count, then `use` reading what they wrote. Each says
    it imported one library module (standing in for uncurl's), `make` lib.py and `use` use_lib.py,
    and read one profile field, `make` the profile's `model` and `use` its `train`."""

    def __init__(self, root: Path):
        self.root, self.notebooks, self.build = root, root / "notebooks", root / "build" / "toy"
        self.lib, self.use_lib, self.input = (
            root / "lib.py",
            root / "use_lib.py",
            root / "input.txt",
        )
        self.notebooks.mkdir(parents=True)
        write_notebook(self.notebooks / "make.ipynb", *MAKE)
        write_notebook(self.notebooks / "use.ipynb", *USE)
        self.lib.write_text("VERSION = 1\n")
        self.use_lib.write_text("VERSION = 1\n")
        self.input.write_text("input 1\n")

    def steps(self, **use_params) -> list[Step]:
        lib = str(self.lib)
        return [
            Step("make", "make", foreach={"x": "expert_counts"}, parameters={"lib": lib}),
            Step(
                "use",
                "use",
                parameters={"root": str(self.build), "lib": str(self.use_lib), **use_params},
                after=("make",),
                inputs=(str(self.input),),
            ),
        ]

    def step(self, name: str, **fields) -> Step:
        """A step of its own notebook, a copy of `make`, with `fields` (parameters merged)."""
        write_notebook(self.notebooks / f"{name}.ipynb", *MAKE)
        parameters = {"lib": str(self.lib), **fields.pop("parameters", {})}
        return Step(name, name, parameters=parameters, **fields)

    def run(self, steps=None, profile=PROFILE, **kwargs) -> dict[str, str]:
        return run_study(
            profile,
            self.build,
            self.root / "runs",
            steps=steps or self.steps(),
            notebooks=self.notebooks,
            **kwargs,
        )

    def result(self, stem: str) -> dict:
        return json.loads((self.build / stem / "results.json").read_text())


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    """The toy study, executed once (two notebooks at a time)."""
    toy = Toy(tmp_path_factory.mktemp("toy"))
    assert toy.run(dry_run=True) == {
        "make[x=1]": "would run (never ran)",
        "make[x=2]": "would run (never ran)",
        "use": "would run (after make[x=1] and 1 more)",
    }
    assert not toy.build.exists()  # a dry run executes nothing
    assert toy.run(jobs=2) == dict.fromkeys(["make[x=1]", "make[x=2]", "use"], "ran (never ran)")
    return toy


def test_executed_notebooks_are_named_by_their_parameters(toy):
    names = sorted(p.name for p in toy.build.glob("*.ipynb"))
    assert names == ["make__x=1.ipynb", "make__x=2.ipynb", "use.ipynb"]
    assert toy.result("use")["y"] == 2 * (1 + 2)
    nb = json.loads((toy.build / "make__x=2.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"]["x"] == 2


def test_unchanged_rerun_is_all_cached(toy):
    assert set(toy.run().values()) == {"cached"}


def test_what_invalidates_a_run(toy):
    def dry(**kwargs):
        return toy.run(dry_run=True, **kwargs)

    toy.lib.write_text("VERSION = 2\n")  # library code
    assert dry() == {
        "make[x=1]": f"would run (library ({toy.lib}) changed)",
        "make[x=2]": f"would run (library ({toy.lib}) changed)",
        "use": "would run (after make[x=1] and 1 more)",
    }
    toy.lib.write_text("VERSION = 1\n")
    toy.input.write_text("input 2\n")  # an input file
    assert dry()["use"] == "would run (inputs changed)"
    toy.input.write_text("input 1\n")
    assert dry(overrides={"scale": 3})["use"] == "would run (parameters changed)"
    assert dry(force=True)["make[x=1]"] == "would run (forced)"
    nb = toy.notebooks / "use.ipynb"
    source = nb.read_text()
    nb.write_text(source.replace("scale * sum(xs)", "sum(xs) * scale"))  # the notebook
    assert dry()["use"] == "would run (notebook changed)"
    nb.write_text(source)
    result = toy.build / "make__x=1" / "results.json"
    saved = result.read_bytes()
    result.unlink()  # what a run wrote
    outcome = dry()
    assert outcome["make[x=1]"].endswith("make__x=1/results.json missing)")
    assert outcome["make[x=2]"] == "cached"
    assert outcome["use"] == "would run (after make[x=1])"
    result.write_bytes(saved)
    assert set(dry().values()) == {"cached"}


def test_a_parameter_change_reruns_only_that_run(toy):
    outcome = toy.run(steps=toy.steps(scale=3))
    assert outcome == {
        "make[x=1]": "cached",
        "make[x=2]": "cached",
        "use": "ran (parameters changed)",
    }
    assert toy.result("use")["y"] == 3 * (1 + 2)
    assert set(toy.run(steps=toy.steps(scale=3)).values()) == {"cached"}
    assert toy.run()["use"] == "ran (parameters changed)"  # and back
    assert toy.result("use")["y"] == 2 * (1 + 2)


def test_only_the_runs_that_read_a_changed_module_or_profile_field_rerun(toy):
    def dry(profile=PROFILE):
        return toy.run(profile=profile, dry_run=True)

    toy.use_lib.write_text("VERSION = 2\n")  # imported by `use` only
    assert dry() == {
        "make[x=1]": "cached",
        "make[x=2]": "cached",
        "use": f"would run (library ({toy.use_lib}) changed)",
    }
    toy.use_lib.write_text("VERSION = 1\n")
    assert dry(dataclasses.replace(PROFILE, train={"lr": 0.1})) == {  # read by `use` only
        "make[x=1]": "cached",
        "make[x=2]": "cached",
        "use": "would run (profile (train) changed)",
    }
    assert dry(dataclasses.replace(PROFILE, model={"n_layer": 2}))["make[x=2]"] == (
        "would run (profile (model) changed)"
    )
    unread = dataclasses.replace(PROFILE, tasks=("drama",), data={"name": "elsewhere"})
    assert set(dry(unread).values()) == {"cached"}


def test_a_deleted_output_of_an_earlier_step_is_noticed_and_remade(toy):
    result = toy.build / "make__x=1" / "results.json"
    written = result.read_bytes()
    result.unlink()
    assert toy.run() == {
        "make[x=1]": f"ran ({result} missing)",
        "make[x=2]": "cached",
        "use": "cached",  # what it reads is back, and the same
    }
    assert result.read_bytes() == written


def test_a_second_study_on_a_build_folder_is_refused_and_a_dry_run_is_not(toy):
    with layout.locked(toy.build):
        with pytest.raises(layout.FolderInUse, match=f"is in use by pid {os.getpid()} "):
            toy.run()
        assert set(toy.run(dry_run=True).values()) == {"cached"}


def test_a_failed_run_stops_the_study_and_keeps_finished_runs(toy):
    with pytest.raises(StudyError) as err:
        toy.run(overrides={"fail": True})
    message = str(err.value)
    assert "use failed: RuntimeError: asked to fail" in message
    assert f"executed notebook: {toy.build / 'use.ipynb'}" in message
    executed = json.loads((toy.build / "use.ipynb").read_text())
    assert any(
        o.get("ename") == "RuntimeError" for c in executed["cells"] for o in c.get("outputs", [])
    )
    # the failed run is no longer up to date, even with its old parameters; the others are
    assert toy.run(dry_run=True) == {
        "make[x=1]": "cached",
        "make[x=2]": "cached",
        "use": "would run (never ran)",
    }
    assert toy.run()["use"] == "ran (never ran)"


def test_unknown_parameter_is_rejected_with_its_name(toy):
    steps = toy.steps()
    steps[1] = Step("use", "use", parameters={"root": "r", "bogus": 3}, after=("make",))
    with pytest.raises(StudyError, match=r"use\.ipynb does not declare parameter\(s\) bogus"):
        plan(PROFILE, steps, toy.build, Path("runs"), notebooks=toy.notebooks)
    with pytest.raises(StudyError, match="--set nonsense: no notebook of the study declares it"):
        plan(PROFILE, toy.steps(), toy.build, Path("runs"), {"nonsense": 1}, toy.notebooks)


def test_a_missing_notebook_is_named(toy):
    with pytest.raises(StudyError, match=r"notebook .*/ghost\.py or \.ipynb does not exist"):
        plan(PROFILE, [Step("ghost", "ghost")], toy.build, Path("runs"), notebooks=toy.notebooks)


def test_mistyped_parameter_is_rejected(toy):
    with pytest.raises(StudyError, match="parameter scale of use.ipynb is int, got 'three'"):
        plan(PROFILE, toy.steps(scale="three"), toy.build, Path("runs"), notebooks=toy.notebooks)


def test_only_selects_runs_and_needs_their_inputs(toy, tmp_path):
    assert toy.run(only=["make"], dry_run=True) == {"make[x=1]": "cached", "make[x=2]": "cached"}
    assert list(toy.run(only=["make[x=2]"], dry_run=True)) == ["make[x=2]"]
    with pytest.raises(StudyError, match="matches no run"):
        toy.run(only=["nothing*"], dry_run=True)
    fresh = Toy.__new__(Toy)
    fresh.__dict__ = {**toy.__dict__, "build": tmp_path / "empty"}
    with pytest.raises(StudyError, match="use reads what make.x=1. writes, which has not run"):
        fresh.run(only=["use"])


def test_manifest_problems_are_named(tmp_path):
    def problem(toml: str) -> str:
        bad = tmp_path / "profiles.toml"
        bad.write_text(toml)
        with pytest.raises(StudyError) as err:
            load_steps(bad)
        return str(err.value)

    assert (
        problem('[[study]]\nname = "pretrain"\nnotebook = "a"\nforeech = {}\n')
        == "step 'pretrain': unknown key 'foreech' (did you mean 'foreach'?)"
    )
    assert problem('[[study]]\nname = "a"\nnotebook = "a"\nwhen = "now"\n') == (
        "step 'a': unknown key 'when' (known: name, notebook, foreach, parameters, after, "
        "inputs, chapter, alone)"
    )
    assert "needs name and notebook" in problem('[[study]]\nname = "a"\n')
    cycle = problem(
        '[[study]]\nname = "a"\nnotebook = "a"\nafter = ["b"]\n'
        '[[study]]\nname = "b"\nnotebook = "b"\nafter = ["a"]\n'
        '[[study]]\nname = "c"\nnotebook = "c"\n'
    )
    assert re.fullmatch(
        "study steps depend on each other in a cycle: (a -> b -> a|b -> a -> b)", cycle
    )
    assert (
        problem('[[study]]\nname = "a"\nnotebook = "a"\nafter = ["c"]\n')
        == "step 'a' runs after unknown step 'c'"
    )


def test_steps_keep_the_manifest_order_where_dependencies_allow(tmp_path):
    manifest = tmp_path / "profiles.toml"
    manifest.write_text(
        '[[study]]\nname = "late"\nnotebook = "n"\nafter = ["early"]\n'
        '[[study]]\nname = "free"\nnotebook = "n"\n'
        '[[study]]\nname = "early"\nnotebook = "n"\nalone = true\n'
    )
    steps = load_steps(manifest)
    assert [s.name for s in steps] == ["free", "early", "late"]
    assert [s.alone for s in steps] == [False, True, False]


def test_the_real_manifest_is_in_dependency_order():
    steps = load_steps()
    names = [s.name for s in steps]
    for step in steps:
        assert all(names.index(dep) < names.index(step.name) for dep in step.after)
    assert names == [raw["name"] for raw in study.manifest.load_study()]  # it was in order
    # the grid's jobs take every core; the inference benchmark measures time
    assert [s.name for s in steps if s.alone] == ["finetune", "inference_cost"]
    runs = plan(get_profile("small"), steps, Path("build/small"), Path("runs"))
    labels = [r.label for r in runs]
    assert labels[:3] == ["data", "pretrain[n_expert=1]", "pretrain[n_expert=4]"]
    assert runs[1].parameters == {
        "profile": "small",
        "out": "build/small/01_pretrain__n_expert=1",
        "n_expert": 1,
        "runs": "runs",
    }
    assert runs[1].executed == Path("build/small/01_pretrain__n_expert=1.ipynb")
    assert {r.step.chapter for r in runs} >= {"pretraining", "dense_equivalent", "premise_sweep"}


def test_file_digest_follows_file_content(tmp_path):
    lib = tmp_path / "lib.py"
    lib.write_text("a = 1\n")
    first = file_digest(str(lib))
    lib.write_text("a = 2\n")
    assert file_digest(str(lib)) != first
    lib.unlink()
    assert file_digest(str(lib)) not in (first, sha(b""))  # a deleted file is a change


def test_the_package_exports_what_others_use():
    assert set(study.__all__) == {
        "StudyError",
        "Step",
        "Run",
        "load_steps",
        "plan",
        "run_study",
        "build_book",
        "select",
    }
    assert all(callable(getattr(study, name)) for name in study.__all__)


def test_cli_reports_errors(capsys):
    assert main(["--profile", "smoke", "--set", "bogus=1", "--dry-run"]) == 1
    assert "--set bogus: no notebook of the study declares it" in capsys.readouterr().err
    assert main(["--profile", "nope", "--dry-run"]) == 1
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_python_m_uncurl_study_runs_the_cli(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "uncurl.study",
            "--profile",
            "smoke",
            "--build",
            str(tmp_path),
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"[1/15] data: would run (never ran)  -> {tmp_path}/smoke/00_data.ipynb"
    assert lines[-1].startswith("[15/15] premise_sweep: would run")


# ------------------------------------------------------------------------ killed and rerun

STUDY = """
import sys
from pathlib import Path
from uncurl.config import Profile
from uncurl.study import Step, run_study
build, runs, notebooks, profile, steps, jobs = sys.argv[1:]
run_study(eval(profile), Path(build), Path(runs), steps=eval(steps), notebooks=Path(notebooks),
          jobs=int(jobs))
"""
DIE_WHILE_EXECUTING = """
import concurrent.futures, os, signal, sys, time
from pathlib import Path
listing = sys.argv.pop()
def descendants(pid):
    parent = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(p)] = int(open(f"/proc/{p}/stat").read().rpartition(")")[2].split()[1])
        except OSError:
            pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        children = [c for c, p in parent.items() if p == pid]
        found, todo = found + children, todo + children
    return found
def kernels(pids):
    return [p for p in pids if b"ipykernel" in Path(f"/proc/{p}/cmdline").read_bytes()]
def die_while_executing(*args, **kwargs):  # the study's first wait for its two workers
    deadline = time.monotonic() + 60
    while len(kernels(descendants(os.getpid()))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(listing).write_text(" ".join(map(str, descendants(os.getpid()))))
    os.kill(os.getpid(), signal.SIGKILL)
concurrent.futures.wait = die_while_executing
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def all_gone(pids: list[int], seconds: float = 10) -> bool:
    """Whether every process of `pids` ends within `seconds` (a zombie counts as ended)."""
    deadline = time.monotonic() + seconds
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(_alive, pids))


def test_a_study_killed_at_any_moment_and_rerun_ends_as_an_uninterrupted_one(tmp_path):
    """SIGKILLed while two notebooks execute (its workers die with it), between two notebooks,
    and while writing a cache record, the study reruns what had not finished, nothing else."""
    toy = Toy(tmp_path)

    def study(steps) -> list[str]:
        argv = [toy.build, toy.root / "runs", toy.notebooks, repr(PROFILE), repr(steps)]
        return ["-c", STUDY, *map(str, argv)]

    slow = toy.steps()
    slow[0] = dataclasses.replace(slow[0], parameters={**slow[0].parameters, "pause": 10.0})
    listing = tmp_path / "descendants"
    sigkilled(["-c", DIE_WHILE_EXECUTING + STUDY, *study(slow)[2:], "2", str(listing)])
    pids = [int(pid) for pid in listing.read_text().split()]
    assert len(pids) >= 4  # two workers, each with a kernel in the middle of its notebook
    assert all_gone(pids, 5), (
        "a worker or its kernel outlived the study"
    )  # kernels poll each second
    study = study(toy.steps())
    killed("uncurl.study.cache.Cache.put", 1, [*study, "1"], after=True)  # between notebooks
    killed("os.replace", 1, [*study, "1"], match="use.json")  # the last record, not renamed
    assert toy.run(jobs=1) == {
        "make[x=1]": "cached",
        "make[x=2]": "cached",
        "use": "ran (never ran)",
    }
    assert [toy.result(f"make__x={x}")["x"] for x in (1, 2)] == [1, 2]
    assert toy.result("use")["y"] == 2 * (1 + 2)
    assert sorted(p.name for p in (toy.build / ".cache").iterdir()) == [
        "make__x=1.json",
        "make__x=2.json",
        "use.json",
    ]


BOOK_KILLED_WHILE_BUILDING = """
import os, signal, subprocess, sys, time
from pathlib import Path
from uncurl.study import build_book
build, html, source, builder_pid = map(Path, sys.argv[1:])
def build_then_die(cmd, preexec_fn, **kwargs):
    builder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=preexec_fn)
    builder_pid.write_text(str(builder.pid))
    while builder.poll() is None and not (html / "_build/.doctrees/environment.pickle").exists():
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)  # pages read, some perhaps written
subprocess.run = build_then_die
build_book([], build, html, source)
"""


def toy_book(root: Path) -> Path:
    source = root / "source"
    source.mkdir()
    (source / "_config.yml").write_text('title: toy\nexecute:\n  execute_notebooks: "off"\n')
    (source / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: page\n")
    (source / "intro.md").write_text("# Intro\n\nThe toy book.\n")
    (source / "page.md").write_text("# Page\n\nIts one page.\n")
    return source


def test_a_book_build_killed_and_rerun_rewrites_every_page(tmp_path, capsys):
    source = toy_book(tmp_path)
    whole = build_book([], tmp_path / "build-a", tmp_path / "a", source).parent
    html, builder = tmp_path / "b", tmp_path / "builder"
    sigkilled(
        [
            "-c",
            BOOK_KILLED_WHILE_BUILDING,
            str(tmp_path / "build-b"),
            str(html),
            str(source),
            str(builder),
        ],
    )
    assert all_gone([int(builder.read_text())], 1), "the book's builder outlived the study"
    page = html / "_build" / "html" / "page.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(
        "<html><body>half a pa"
    )  # what a kill in mid-write leaves, newer than its source
    index = build_book([], tmp_path / "build-b", html, source)
    assert "interrupted: building every page afresh" in capsys.readouterr().out
    for name in ("index.html", "intro.html", "page.html"):
        assert (index.parent / name).read_bytes() == (whole / name).read_bytes(), name
    assert sorted(p.name for p in (html / "_build").iterdir() if p.name.startswith(".")) == [
        ".doctrees",
        ".lock",
    ]


# ----------------------------------------------------------------------------- the scheduler

PROGRESS = re.compile(
    r"^\[(\d+)/(\d+) \d+:\d\d\] (.+): (running \(.*\)|done in \d+ s|cached|"
    r"still running|FAILED after \d+ s)$"
)
KINDS = ("running", "done", "cached", "still running", "FAILED")


def progress(out: str, total: int) -> list[tuple[str, str]]:
    """(label, kind of message) of every progress line, checking their format."""
    events = []
    for line in out.splitlines():
        m = PROGRESS.match(line)
        assert m and int(m.group(2)) == total, f"not a progress line: {line!r}"
        events.append((m.group(3), next(k for k in KINDS if m.group(4).startswith(k))))
    return events


def beside(events: list[tuple[str, str]], label: str) -> set[str]:
    """The runs that were executing at some time while `label` was."""
    executing, seen = set(), set()
    for name, what in events:
        if what == "running":
            executing.add(name)
        elif what in ("done", "FAILED"):
            executing.discard(name)
        if label in executing:
            seen |= executing - {label}
    return seen


def test_an_alone_run_executes_while_nothing_else_does(tmp_path, capsys):
    toy = Toy(tmp_path)
    steps = [
        toy.step("wide", foreach={"x": "expert_counts"}, parameters={"pause": 1.0}),
        toy.step("solo", alone=True),
        toy.step("tail"),
    ]
    assert set(toy.run(steps, jobs=2).values()) == {"ran (never ran)"}
    events = progress(capsys.readouterr().out, total=4)
    assert beside(events, "wide[x=1]") == {"wide[x=2]"}  # two at a time otherwise
    assert beside(events, "solo") == set()
    assert [name for name, what in events if what == "running"] == [
        "wide[x=1]",
        "wide[x=2]",
        "solo",
        "tail",
    ]
    # a cached alone run waits for nothing
    assert set(toy.run(steps, jobs=2).values()) == {"cached"}


def test_nothing_starts_after_a_failure_and_what_was_running_finishes(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.5)
    toy = Toy(tmp_path)
    steps = [
        toy.step("bad", parameters={"crash": True}),
        toy.step("slow", foreach={"x": "expert_counts"}, parameters={"pause": 5.0}),
    ]
    with pytest.raises(StudyError, match="bad failed: RuntimeError: asked to crash"):
        toy.run(steps, jobs=2)
    events = progress(capsys.readouterr().out, total=3)
    assert ("slow[x=1]", "still running") in events  # the heartbeat, every HEARTBEAT_S
    assert ("slow[x=2]", "running") not in events
    assert toy.run(steps, dry_run=True) == {
        "bad": "would run (never ran)",
        "slow[x=1]": "cached",
        "slow[x=2]": "would run (never ran)",
    }


TEXT_MAKE = '# %% tags=["parameters"]\n{}\n\n# %%\n{}\n'.format(*(c.strip() for c in MAKE))


def test_a_text_notebook_runs_in_process_and_its_digest_ignores_the_format(tmp_path, monkeypatch):
    toy = Toy(tmp_path)
    steps = toy.steps()[:1]
    assert set(toy.run(steps, jobs=1).values()) == {"ran (never ran)"}
    text = toy.notebooks / "make.py"
    text.write_text(TEXT_MAKE)  # the same cells as make.ipynb, as jupytext py:percent
    assert notebook_digest(text) == notebook_digest(toy.notebooks / "make.ipynb")
    runs = plan(PROFILE, steps, toy.build, tmp_path / "runs", notebooks=toy.notebooks)
    converted = toy.build / ".notebooks" / "make.ipynb"
    assert [(r.notebook, r.ipynb) for r in runs] == [(text, converted)] * 2
    assert set(toy.run(steps, jobs=1).values()) == {"cached"}
    written = converted.stat().st_mtime_ns
    plan(PROFILE, steps, toy.build, tmp_path / "runs", notebooks=toy.notebooks)
    assert converted.stat().st_mtime_ns == written  # unchanged, so not rewritten

    def no_pool(*args, **kwargs):
        raise AssertionError("jobs=1 executes in this process")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    text.write_text(TEXT_MAKE.replace('{"x": x,', '{"x": 10 * x,'))  # the .py is the one run
    assert set(toy.run(steps, jobs=1).values()) == {"ran (notebook changed)"}
    assert [toy.result(f"make__x={x}")["x"] for x in (1, 2)] == [10, 20]
    assert "10 * x" in converted.read_text()
