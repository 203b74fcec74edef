"""The study runner: manifest, parameters, dependency order, content-hash cache, failures.

These tests run the runner on two toy notebooks (a few seconds each); tests/test_notebooks.py
runs the real study at the smoke profile.
"""

import concurrent.futures
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from uncurl import study
from uncurl.config import Profile, get_profile
from uncurl.study import Step, StudyError, load_steps, plan, run_study, runner
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
pathlib.Path(out, "results.json").write_text(json.dumps({"x": x, "library": [lib]}))
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
pathlib.Path(out, "results.json").write_text(json.dumps({"y": scale * sum(xs), "library": [lib]}))
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
    """Two toy steps: `make` once per expert count, then `use` reading what they wrote."""

    def __init__(self, root: Path):
        self.root, self.notebooks, self.build = root, root / "notebooks", root / "build" / "toy"
        self.lib, self.input = root / "lib.py", root / "input.txt"
        self.notebooks.mkdir(parents=True)
        write_notebook(self.notebooks / "make.ipynb", *MAKE)
        write_notebook(self.notebooks / "use.ipynb", *USE)
        self.lib.write_text("VERSION = 1\n")
        self.input.write_text("input 1\n")

    def steps(self, **use_params) -> list[Step]:
        lib = str(self.lib)
        return [
            Step("make", "make", foreach={"x": "expert_counts"}, parameters={"lib": lib}),
            Step(
                "use",
                "use",
                parameters={"root": str(self.build), "lib": lib, **use_params},
                after=("make",),
                inputs=(str(self.input),),
            ),
        ]

    def step(self, name: str, **fields) -> Step:
        """A step of its own notebook, a copy of `make`, with `fields` (parameters merged)."""
        write_notebook(self.notebooks / f"{name}.ipynb", *MAKE)
        parameters = {"lib": str(self.lib), **fields.pop("parameters", {})}
        return Step(name, name, parameters=parameters, **fields)

    def run(self, steps=None, **kwargs) -> dict[str, str]:
        return run_study(
            PROFILE,
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
    assert [s.name for s in steps if s.alone] == ["inference_cost"]
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
    assert lines[0] == f"[1/11] data: would run (never ran)  -> {tmp_path}/smoke/00_data.ipynb"
    assert lines[-1].startswith("[11/11] premise_sweep: would run")


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
