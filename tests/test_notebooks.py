"""The study's notebooks: their shape, and the whole study at the smoke profile.

The smoke study runs once per session (papermill, every notebook, then the book with warnings as
errors) into temporary folders; the premise sweep reads a made-up stand-in for
data/results/premise_sweep.csv, written in the temporary folder only.
"""

import dataclasses
import json
import re
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest
import yaml
from conftest import standin_sweep

from uncurl import study
from uncurl.config import get_profile
from uncurl.study.cache import Cache, run_key, staleness
from uncurl.study.manifest import as_ipynb

ROOT = Path(__file__).resolve().parent.parent
# step notebooks: .ipynb, or jupytext py:percent text
NOTEBOOKS = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "notebooks").glob("*.py")])
PARAMETER = re.compile(r"^(\w+): (int|float|str|bool) = (.+?)  # \S.*$")
# a glue role or directive: its key, and the executed notebook it names (none: the page's own)
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`(?:([^`\s]+?)::)?(\w+)[^`]*`")
GLUE_DIRECTIVE = re.compile(r"```\{glue(?::\w+)?\} (\S+)\n(?:(?::[\w-]+:.*\n)*?:doc: (\S+))?")

# what each step promises to write in its results folder (besides results.json)
PROMISED = {
    "data": ["corpus.csv"],
    "pretrain": [],
    "pretraining_report": [
        "models.csv",
        "curves.csv",
        "corpus.csv",
        "loss_curves.png",
        "loss_params.png",
    ],
    "dense_equivalent": [
        "paper_comparison.csv",
        "our_ratios.csv",
        "law.csv",
        "paper_dense_equivalent.png",
        "our_dense_equivalent.png",
    ],
    "premise_sweep": ["gaps.csv", "premise_sweep.png"],
    "finetune": ["summary.csv"],
    "tasks_report": [
        "results.csv",
        "summary.csv",
        "heldout_summary.csv",
        "comparisons.csv",
        "tasks.csv",
        "from_scratch.csv",
        "harness.csv",
        "tasks.png",
    ],
    "threshold": ["advantages.csv", "greedy.csv", "shares.csv", "thresholds.csv", "threshold.png"],
    "baselines": ["over_scratch.csv", "over_uncurl.csv", "baselines.png"],
    "claims": ["claims.csv"],
    "reproducing": ["times.csv", "steps.csv", "machine.csv", "bench_steps.csv", "bench_kinds.csv"],
    "clusters": [
        "stability.csv",
        "structure.csv",
        "sizes.csv",
        "variants.csv",
        "embedding.png",
        "structure.png",
    ],
    "inference_cost": [
        "models.csv",
        "layer.csv",
        "forward.csv",
        "exchanges.csv",
        "fit.csv",
        "paper_fig4.csv",
        "bench.json",
        "loss_latency.png",
        "a2a_compute.png",
        "latency_procs.png",
        "cost_model.png",
    ],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_and_committed_without_outputs(path, tmp_path):
    nb = jupytext.read(path)
    nbformat.validate(nb)
    first, params, *rest = nb.cells
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert params.metadata.get("tags", [])[-1:] == ["parameters"]
    for line in params.source.splitlines():
        assert PARAMETER.match(line), f"parameter line needs 'name: type = literal  # help': {line}"
    declared = papermill.inspect_notebook(str(as_ipynb(path, tmp_path)))
    assert all(p["help"] for p in declared.values())
    assert {"profile", "out"} <= set(declared)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert not re.search(r"^\s*(async\s+)?(def|class)\s", cell.source, re.M), (
                "no functions or classes in a notebook: they belong in uncurl/"
            )
    assert [c for c in rest if c.cell_type == "code"], "a notebook calls the library"


def test_every_notebook_is_a_step_and_every_chapter_is_in_the_book():
    steps = study.load_steps()
    assert {s.notebook for s in steps} == {p.stem for p in NOTEBOOKS}
    toc = yaml.safe_load((ROOT / "book/_toc.yml").read_text())
    files = {c["file"] for part in toc["parts"] for c in part["chapters"]}
    pages = {p.stem for p in (ROOT / "book").glob("*.md")} - {toc["root"]}  # written, not run
    assert files == {s.chapter for s in steps if s.chapter} | pages


# ------------------------------------------------------------------------ the smoke study


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The study at the smoke profile, executed and rendered once, in temporary folders."""
    root = tmp_path_factory.mktemp("smoke-study")
    sweep = root / "premise_sweep.csv"
    standin_sweep().to_csv(sweep, index=False)  # made up, for the test only
    profile = get_profile("smoke")
    args = dict(
        profile=profile,
        build=root / "build" / "smoke",
        runs_dir=root / "runs",
        overrides={"sweep_csv": str(sweep)},
    )
    outcome = study.run_study(jobs=2, **args)
    runs = study.plan(
        profile, study.load_steps(), args["build"], args["runs_dir"], args["overrides"]
    )
    index = study.build_book(runs, args["build"], root / "html")
    return {"root": root, "args": args, "outcome": outcome, "runs": runs, "index": index}


def test_every_run_executed(smoke):
    assert set(smoke["outcome"].values()) == {"ran (never ran)"}


def test_every_notebook_writes_what_it_promises(smoke):
    for run in smoke["runs"]:
        nb = json.loads(run.executed.read_text())
        errors = [
            o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"
        ]
        assert not errors, f"{run.label}: {errors}"
        record = json.loads((run.out / "results.json").read_text())
        assert record["parameters"]["profile"] == "smoke"
        assert {"git", "packages", "python", "wall_time_s", "library"} <= set(record)
        for name in PROMISED[run.step.name]:
            assert (run.out / name).stat().st_size > 0, f"{run.label} did not write {name}"
        for output in record["outputs"]:
            assert Path(output).exists(), f"{run.label} declared {output}, which is missing"
    pretrain = [r for r in smoke["runs"] if r.step.name == "pretrain"]
    assert [r.parameters["n_expert"] for r in pretrain] == [1, 2, 4]
    assert (smoke["root"] / "runs/smoke/e4/summary.json").exists()
    # every fine-tuning seed has its own reduction, made with that seed
    seeds = range(get_profile("smoke").finetune_config().seeds)
    for seed in seeds:
        for path in (smoke["root"] / "runs/smoke/reduced").glob(f"e4-uncurl-d2-*-s{seed}"):
            assert json.loads((path / "reduction.json").read_text())["seed"] == seed
    assert len(list((smoke["root"] / "runs/smoke/reduced").glob("e4-uncurl-d2-*"))) == (
        len(seeds) * len(get_profile("smoke").all_tasks)
    )


def glued(nb: dict) -> set[str]:
    return {
        o["metadata"]["scrapbook"]["name"]
        for c in nb["cells"]
        for o in c.get("outputs", [])
        if "scrapbook" in o.get("metadata", {})
    }


def referenced(markdown: str) -> set[tuple[str, str]]:
    """(document, key) of every glue key that MyST markdown pastes, by `{glue:text}`[doc::]key``
    roles and glue directives (with `:doc:`); document is "" for the page's own notebook."""
    roles = set(GLUE_ROLE.findall(markdown))
    return roles | {(doc, key) for key, doc in GLUE_DIRECTIVE.findall(markdown)}


def test_referenced_reads_roles_and_directives():
    markdown = (
        "{glue:text}`n:d` and {glue:text}`pretraining.ipynb::profile:s`\n\n"
        "```{glue} table\n```\n\n```{glue:figure} other\n:name: x\n:doc: tasks.ipynb\n```"
    )
    assert referenced(markdown) == {
        ("", "n"),
        ("pretraining.ipynb", "profile"),
        ("", "table"),
        ("tasks.ipynb", "other"),
    }


def test_every_glue_key_the_prose_pastes_is_glued(smoke):
    chapters = {
        f"{run.step.chapter}.ipynb": json.loads(run.executed.read_text())
        for run in smoke["runs"]
        if run.step.chapter
    }
    keys = {doc: glued(nb) for doc, nb in chapters.items()}
    prose = {
        doc: "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        for doc, nb in chapters.items()
    } | {page.name: page.read_text() for page in (ROOT / "book").glob("*.md")}
    missing = [
        f"{page} pastes {doc or page}::{key}"
        for page, markdown in prose.items()
        for doc, key in referenced(markdown)
        if key not in keys.get(doc or page, set())
    ]
    assert not missing, "keys pasted but never glued:\n" + "\n".join(missing)


def test_the_book_builds_without_warnings(smoke):
    html = smoke["index"].parent
    assert smoke["index"].exists()
    for page in (
        "intro",
        "pretraining",
        "dense_equivalent",
        "tasks",
        "threshold",
        "baselines",
        "claims",
        "reproducing",
        "clusters",
        "premise_sweep",
    ):
        assert (html / f"{page}.html").exists()
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", (html / "pretraining.html").read_text()))
    assert "built at the smoke profile" in text
    assert "glue" not in re.sub(r"<[^>]+>", "", (html / "intro.html").read_text()).lower()


def test_the_rendered_pages_show_no_code_warning_or_machine_path(smoke):
    """A reader sees prose, figures and tables: no code cell, no stderr, no path of this
    machine's environment."""
    for page in sorted(smoke["index"].parent.glob("*.html")):
        page_html = page.read_text()
        assert 'class="cell_input' not in page_html, f"{page.name} shows code"
        assert "stderr" not in page_html, f"{page.name} shows a cell's stderr"
        text = re.sub(r"<[^>]+>", " ", page_html)
        for leak in ("Warning", "Traceback", "site-packages", "/.venv/", str(ROOT)):
            assert leak not in text, f"{page.name} shows {leak!r}"


def test_an_unchanged_rerun_is_all_cached(smoke, capsys):
    outcome = study.run_study(**smoke["args"])
    study.build_book(smoke["runs"], smoke["args"]["build"], smoke["root"] / "html")
    assert set(outcome.values()) == {"cached"}
    assert "book up to date" in capsys.readouterr().out


def test_a_change_reruns_only_the_runs_that_read_it(smoke):
    """Each run's record keeps the library modules and profile fields it read: a change to one
    of them makes exactly those runs stale (the ones after them follow only if what they read
    changes)."""
    profile, cache = smoke["args"]["profile"], Cache(smoke["args"]["build"])
    records = {r.label: cache.get(r) for r in smoke["runs"]}

    def stale(profile=profile, edited_module=None) -> set[str]:
        keys = {r.label: run_key(r, profile, records) for r in smoke["runs"]}
        if edited_module:
            for key in keys.values():
                key["library"][edited_module] = "edited"
        return {r.label for r in smoke["runs"] if staleness(r, records[r.label], keys[r.label])}

    pretrain = {r.label for r in smoke["runs"] if r.step.name == "pretrain"}
    assert stale() == set()
    assert stale(edited_module="uncurl/bench/inference.py") == {"inference_cost"}
    assert pretrain <= stale(edited_module="uncurl/train.py") <= set(records) - {"data"}
    bench = dataclasses.replace(profile, inference_bench={**profile.inference_bench, "repeats": 9})
    assert stale(bench) == {"inference_cost"}
    recipe = dataclasses.replace(profile, train={**profile.train, "max_steps": 30})
    assert pretrain <= stale(recipe) and not stale(recipe) & {"premise_sweep", "data"}
    assert set(records["pretrain[n_expert=4]"]["key"]["profile"]) >= {"data", "model", "train"}


def test_a_deleted_checkpoint_of_a_pretrained_model_is_noticed(smoke):
    weights = smoke["root"] / "runs" / "smoke" / "e4" / "checkpoint" / "model.safetensors"
    aside = weights.with_name("aside")
    weights.rename(aside)
    try:
        outcome = study.run_study(**smoke["args"], dry_run=True)
    finally:
        aside.rename(weights)
    assert outcome["pretrain[n_expert=4]"] == f"would run ({weights} missing)"
    assert outcome["finetune"].startswith("would run (after pretrain[n_expert=4]")
    assert outcome["premise_sweep"] == "cached"
