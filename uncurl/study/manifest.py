"""The study's steps and runs: the `[[study]]` tables, checked and ordered, and every run they
plan for a profile, with its notebook's parameters resolved and checked."""

import dataclasses
import difflib
import fnmatch
import graphlib
from dataclasses import dataclass
from pathlib import Path

import jupytext

from uncurl import layout
from uncurl.config import PROFILES_PATH, Profile, load_study

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}


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
    alone: bool = False  # its runs execute while no other run does (they measure time)


STEP_KEYS = [f.name for f in dataclasses.fields(Step)]


@dataclass(frozen=True)
class Run:
    step: Step
    label: str  # pretrain[n_expert=4]
    parameters: dict  # exactly what papermill passes
    notebook: Path  # the source notebook: notebooks/<name>.py (jupytext) or .ipynb
    ipynb: Path  # what papermill executes: the .ipynb source, or the .py's conversion
    executed: Path  # build/<profile>/<stem>.ipynb
    out: Path  # build/<profile>/<stem>/: the run's results
    inputs: tuple[Path, ...]
    after: tuple[str, ...]  # labels of the runs this one reads from


def absolute(path) -> Path:
    """`path`, relative paths taken from the repository root (where notebooks execute)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


# ------------------------------------------------------------------------------- the manifest


def load_steps(path: Path = PROFILES_PATH) -> list[Step]:
    """The `[[study]]` steps, checked, in dependency order."""
    steps = [_step(raw) for raw in load_study(path)]
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise StudyError(f"study step names must be unique: {names}")
    for step in steps:
        for dep in step.after:
            if dep not in names:
                raise StudyError(f"step {step.name!r} runs after unknown step {dep!r}")
    try:
        order = InOrder({s.name: s.after for s in steps})
    except graphlib.CycleError as exc:
        raise StudyError(
            "study steps depend on each other in a cycle: " + " -> ".join(exc.args[1])
        ) from None
    by_name = {s.name: s for s in steps}
    return [by_name[name] for name in order.drain()]


def _step(raw: dict) -> Step:
    name = raw.get("name", "?")
    unknown = sorted(set(raw) - set(STEP_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], STEP_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(STEP_KEYS)}"
        raise StudyError(f"step {name!r}: unknown key {unknown[0]!r} ({hint})")
    if "name" not in raw or "notebook" not in raw:
        raise StudyError(f"study step {name!r}: needs name and notebook")
    return Step(
        **{**raw, "after": tuple(raw.get("after", ())), "inputs": tuple(raw.get("inputs", ()))}
    )


class InOrder:
    """graphlib's topological order that hands out the ready nodes in the order they are
    listed, so the study keeps the manifest's order wherever dependencies allow."""

    def __init__(self, graph: dict[str, tuple[str, ...]]):
        self._sorter = graphlib.TopologicalSorter(graph)
        self._sorter.prepare()  # raises graphlib.CycleError
        self._position = {node: i for i, node in enumerate(graph)}
        self._ready = []

    def next(self) -> str | None:
        """The first listed node whose predecessors are done; None when none is, for now."""
        self._ready = sorted([*self._ready, *self._sorter.get_ready()], key=self._position.get)
        return self._ready.pop(0) if self._ready else None

    def done(self, node: str) -> None:
        self._sorter.done(node)

    def drain(self) -> list[str]:
        """Every node, each marked done as soon as it is handed out."""
        order = []
        while (node := self.next()) is not None:
            order.append(node)
            self.done(node)
        return order


# -------------------------------------------------------------------------------------- runs


def plan(
    profile: Profile,
    steps: list[Step],
    build: Path,
    runs: Path,
    overrides: dict | None = None,
    notebooks: Path = NOTEBOOKS,
) -> list[Run]:
    """Every run of the study for `profile`, in dependency order, parameters resolved."""
    overrides = dict(overrides or {})
    used, result, labels = set(), [], {}
    for step in steps:
        notebook = source_notebook(notebooks, step.notebook)
        ipynb = as_ipynb(notebook, build)
        declared = declared_parameters(notebook, ipynb)
        for values in _expand(step, profile):
            stem = layout.step_stem(step.notebook, values)
            label = step.name + (
                f"[{','.join(f'{k}={v}' for k, v in values.items())}]" if values else ""
            )
            params = {"profile": profile.name, "out": str(build / stem), **values}
            context = {"runs": str(runs), "build": str(build), "profile": profile.name, **params}
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
            result.append(
                Run(
                    step,
                    label,
                    params,
                    notebook,
                    ipynb,
                    build / f"{stem}.ipynb",
                    build / stem,
                    inputs,
                    after,
                )
            )
            labels.setdefault(step.name, []).append(label)
    unused = sorted(set(overrides) - used)
    if unused:
        raise StudyError(
            f"--set {', '.join(unused)}: no notebook of the study declares "
            f"{'it' if len(unused) == 1 else 'them'}"
        )
    return result


def _expand(step: Step, profile: Profile) -> list[dict]:
    """One parameter dict per run of `step`: the product of its `foreach` lists."""
    combos = [{}]
    for param, field in step.foreach.items():
        values = getattr(profile, field, None)
        if not isinstance(values, (list, tuple)):
            raise StudyError(
                f"step {step.name!r}: foreach {param} = {field!r} must name a list "
                f"field of the profile (such as 'expert_counts')"
            )
        combos = [{**c, param: v} for c in combos for v in values]
    return combos


def _fill(value, context: dict, label: str):
    if not isinstance(value, str):
        return value
    try:
        return value.format_map(context)
    except KeyError as exc:
        raise StudyError(
            f"{label}: {value!r} refers to {exc.args[0]!r}, which is neither "
            f"'runs', 'build', 'profile' nor one of its parameters"
        ) from None


def select(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs named by --only (step names, run labels or notebook stems; globs allowed)."""
    if not only:
        return runs
    chosen = [
        r
        for r in runs
        if any(
            name == pattern or fnmatch.fnmatchcase(name, pattern)
            for pattern in only
            for name in (r.step.name, r.label, r.executed.stem)
        )
    ]
    if not chosen:
        raise StudyError(
            f"--only {' '.join(only)} matches no run; runs: {', '.join(r.label for r in runs)}"
        )
    return chosen


# --------------------------------------------------------------------------------- notebooks


def source_notebook(notebooks: Path, name: str) -> Path:
    """notebooks/<name>.py (jupytext py:percent text) if it exists, else <name>.ipynb."""
    for path in (notebooks / f"{name}.py", notebooks / f"{name}.ipynb"):
        if path.exists():
            return path
    raise StudyError(f"notebook {notebooks / name}.py or .ipynb does not exist")


def read_notebook(path: Path):
    """A notebook's cells and metadata, whichever format it is stored in."""
    return jupytext.read(path)


def as_ipynb(notebook: Path, build: Path) -> Path:
    """What papermill reads: an .ipynb as it is; a text notebook converted to
    <build>/.notebooks/<name>.ipynb (rewritten only when it changed, so it keeps its time)."""
    if notebook.suffix == ".ipynb":
        return notebook
    nb = read_notebook(notebook)
    nb.metadata.setdefault("kernelspec", KERNEL)  # papermill needs one; the study runs python3
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # jupytext draws random ones, which would rewrite it every time
    text = jupytext.writes(nb, fmt="ipynb")
    target = absolute(build) / ".notebooks" / f"{notebook.stem}.ipynb"
    if not target.exists() or target.read_text() != text:
        layout.write_text(target, text)
    return target


def declared_parameters(notebook: Path, ipynb: Path) -> dict:
    """The `parameters` cell of `notebook` (read from `ipynb`, its .ipynb form):
    name -> {inferred_type_name, default, help}."""
    import papermill

    declared = papermill.inspect_notebook(str(ipynb))
    if not declared:
        raise StudyError(f"{notebook} has no cell tagged 'parameters'")
    return declared


def check_parameters(label: str, notebook: Path, params: dict, declared: dict) -> None:
    """Refuse what papermill would only warn about: undeclared or mistyped parameters."""
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise StudyError(
            f"{label}: {notebook.name} does not declare parameter(s) "
            f"{', '.join(unknown)}; it declares {', '.join(sorted(declared))}"
        )
    for name, value in params.items():
        types = TYPES.get(declared[name]["inferred_type_name"])
        if types and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            raise StudyError(
                f"{label}: parameter {name} of {notebook.name} is "
                f"{declared[name]['inferred_type_name']}, got {value!r}"
            )
