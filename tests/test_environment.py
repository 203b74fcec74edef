"""environment.yml and pyproject.toml must describe the same environment."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extra(name: str) -> set[str]:
    """The requirements of one of the project's extras, the extras it names ("uncurl[eval,ray]")
    by their own."""
    found = set()
    for requirement in PROJECT["optional-dependencies"][name]:
        own = re.fullmatch(rf"{PROJECT['name']}\[([\w,]+)\]", requirement)
        found |= set().union(*map(extra, own.group(1).split(","))) if own else {requirement}
    return found


def test_environment_yml_matches_pyproject():
    wanted = set(PROJECT["dependencies"]) | extra("dev")
    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "python=3.11" in deps
    # the same packages with the same version pins, plus this project itself
    assert set(pip) - {"-e ."} == wanted


def test_the_installed_packages_are_the_pinned_ones():
    """The environment the tests run in is the one pyproject.toml describes: every exact pin
    (torch's CPU build first of all) and jupyter-book below 2, which cannot build offline."""
    deps = PROJECT["dependencies"] + sorted(extra("dev"))  # the tests' environment
    for name, _, version in (d.partition("==") for d in deps if "==" in d):
        name = name.split("[")[0]  # lm-eval[hf]: the package, whatever extras it was given
        # a local build label ("2.13.0+cpu") is the same release
        assert Version(importlib.metadata.version(name)).public == version, name
    assert int(importlib.metadata.version("jupyter-book").split(".")[0]) < 2
