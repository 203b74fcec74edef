"""The README's layout and the notebooks' README list exactly what the tree holds."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_layout_lists_every_module():
    layout = section((ROOT / "README.md").read_text(), "Layout")
    listed = set()
    for row in re.findall(r"^\| [^|]+ \| (.+) \|$", layout, re.M):
        package = re.match(r"`(uncurl/\w+/)`", row)
        for name in re.findall(r"`([\w/]+\.(?:py|c|toml))`", row):
            listed.add(name if name.startswith("uncurl/") else package.group(1) + name)
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "uncurl").rglob("*")
        if p.suffix in (".py", ".c", ".toml")
        and p.name != "__init__.py"
        and "__pycache__" not in p.parts
    }
    assert listed == modules, f"missing: {modules - listed}; not in the tree: {listed - modules}"


def test_the_notebooks_readme_lists_every_notebook():
    table = (ROOT / "notebooks/README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert listed == {p.stem for p in (ROOT / "notebooks").glob("*.py")}
