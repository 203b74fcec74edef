"""No number is typed by hand in the book's prose.

Numbers in a chapter come from the study (glued from executed notebooks), from the library
(code spans, math) or from the literature (citations). What is left of a page's prose once those
are taken out must hold no digit: a digit left there is a number someone typed and nobody will
update. The prose sources are book/*.md and the markdown cells of every notebook in notebooks/
(.ipynb, and .py percent notebooks), read with jupytext.
"""

import re
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "book").glob("*.md"))
NOTEBOOKS = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "notebooks").glob("*.py")])

# Names that hold a digit but are not a quantity. Keep this short; each entry says why.
ALLOWED = (
    "GPT-2",  # the model family the study's decoder follows
    "All2All",  # the name of the collective exchange expert parallelism pays
    "top-1",  # the routing rule's name (top-k with k one), used as a term
    "A10",  # the paper's inference GPUs, named when its measurements are quoted
    "A100",  # the GPU of the paper's training nodes, in the cost model
)


def _blank(match: re.Match) -> str:
    """The match replaced by spaces, its line breaks kept, so that line numbers still hold."""
    return re.sub(r"[^\n]", " ", match.group())


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,}|:{3,})\s*(\{[^}]*\}|[^\s`]*)?(.*)$")
OPTION = re.compile(r"^\s*:[\w-]+:(\s.*)?$")  # a directive's option line, e.g. `:name: fig-x`
CODE_DIRECTIVES = {"math", "code", "code-block", "code-cell", "eval-rst", "raw"}


def strip_blocks(text: str) -> list[str]:
    """Lines of `text` with code fences, math and code directives blanked, and of every other
    directive its opening line and its options (its body, a caption or a note, is prose)."""
    lines = text.split("\n")
    out, fence, code, options = [], None, False, False
    for line in lines:
        m = FENCE.match(line)
        if fence is None and m:
            marker, name = m.group(2), (m.group(3) or "")
            directive = name.startswith("{")
            fence, code = marker, not directive or name.strip("{}") in CODE_DIRECTIVES
            options = directive
            out.append("")
            continue
        if (
            fence is not None
            and line.strip() == fence[0] * len(line.strip())
            and len(line.strip()) >= len(fence)
        ):
            fence = None
            out.append("")
            continue
        if fence is not None and (code or (options and OPTION.match(line))):
            out.append("")
            continue
        options = False
        out.append(line)
    return out


INLINE = [
    re.compile(p, re.DOTALL)
    for p in (
        r"<!--.*?-->",  # comments
        r"\$\$.*?\$\$",  # display math
        r"\$(?:[^$\n]|\n(?![ \t]*\n))+?\$",  # inline math, within one paragraph
        r"\{[\w:.-]+\}`[^`]*`",  # roles: {glue:text}`key:fmt`, {math}`x`, {numref}`fig-x`
        r"(`+)(?:(?!\1).)+?\1",  # code spans
        r"\{\{[^}]*\}\}",  # substitutions
        r"\]\([^)\s]*\)",  # a link's target (its text stays prose)
        r"<https?://[^>]+>|https?://\S+",  # URLs
    )
]
LINE = [
    re.compile(p)
    for p in (
        r"^\([\w-]+\)=\s*$",  # a target label, (fig-x)=
        r"^\s*\d+[.)]\s",  # numbered list items
        r"\[\^[\w-]+\]",  # footnote references
    )
]
YEAR = r"(?:19|20)\d\d[a-z]?"
NAME = r"(?!(?:In|On|At|By|From|Since|Until|The)\b)[A-Z][\w'\u2019-]+"  # not "In 2024"
_ = r"\s+"  # a space, or a line break where the prose wraps
CITATION = [
    re.compile(p)
    for p in (
        # Sarkar et al. 2024, Sarkar et al. (2024), Sarkar et al., 2024, Clark and Smith 2023,
        # Karypis (2024), Chen et al. (2024, Fig. 2b) (the figure reference is stripped below)
        rf"{NAME}(?:{_}et{_}al\.|{_}and{_}{NAME})?,?{_}\(?{YEAR}(?=[)\s,.;:]|$)\)?",
        rf"\({NAME}(?:{_}et{_}al\.|{_}and{_}{NAME})?,{_}{YEAR}\)",  # (Sarkar et al., 2024)
        rf"\(\s*{YEAR}\s*[,)]",  # (2022) or (2024, section 5) after a name on the line before
        rf"arXiv(?::|{_})\s*\d{{4}}\.\d{{4,5}}(?:v\d+)?",  # arXiv:2409.01483, arXiv 2409.01483
        rf"PMLR{_}\d+(?::\d+(?:[-\u2013]\d+)?)?",  # PMLR 262:165-181
    )
]
_NUMBER = r"[A-Z]?\d+(?:\.\d+)*[a-z]?"
REFERENCE = re.compile(  # Fig. 2a, Figure 3, Table 1, Tables 1 and 3, Algorithm 1, section 5.1
    r"\b(?:Fig(?:ure)?s?\.?|Tables?|Algorithms?|[Ss]ections?|Eq(?:uation)?s?\.?|Appendix)"
    rf"{_}{_NUMBER}(?:(?:,\s*|{_}and{_}|\s*[-\u2013]\s*){_NUMBER})*"
)
WORDS = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, ALLOWED)) + r")(?![\w-])")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text with everything that may hold a digit taken out."""
    lines = strip_blocks(text)
    for pattern in LINE:
        lines = [pattern.sub(_blank, line) for line in lines]
    text = "\n".join(lines)
    for pattern in [*INLINE, *CITATION, REFERENCE, WORDS]:
        text = pattern.sub(_blank, text)
    return text.split("\n")


def front_matter(text: str) -> str:
    """A page's YAML front matter blanked (it configures the page; it is not prose)."""
    m = re.match(r"---\n.*?\n---\n", text, re.DOTALL)
    return text if not m else _blank(m) + text[m.end() :]


def typed_numbers(text: str) -> list[tuple[int, str]]:
    """(line number, original line) of every line whose prose still holds a digit."""
    original = text.split("\n")
    return [
        (i + 1, original[i].strip())
        for i, line in enumerate(prose_lines(front_matter(text)))
        if re.search(r"\d", line)
    ]


def sources(path: Path) -> list[tuple[str, str]]:
    """(where, markdown) of a prose source: the page, or each markdown cell of a notebook."""
    if path.suffix == ".md":
        return [("", path.read_text())]
    nb = jupytext.read(path)
    return [(f"cell {i}, ", c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"]


def offences(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    return [
        f"{rel}: {where}line {n}: {line}"
        for where, text in sources(path)
        for n, line in typed_numbers(text)
    ]


@pytest.mark.parametrize("path", PAGES + NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_number_is_typed_in_prose(path):
    found = offences(path)
    assert not found, (
        "numbers typed by hand (glue them, or put them in math or code):\n" + "\n".join(found)
    )


def test_the_sources_are_found():
    assert ROOT / "book/intro.md" in PAGES and NOTEBOOKS


@pytest.mark.parametrize(
    "text",
    [
        "Sarkar et al. 2024 reduce Z to D experts; see Table 1 and Fig. 2a.",
        "Use `capacity_factor = 1.2` and $\\alpha = 0.01$, as Fedus et al. (2022) do.",
        "A GPT-2 decoder, top-1 routing, All2All (arXiv:2409.01483, PMLR 262:165-181).",
        "{glue:text}`pretraining.ipynb::n_models:d` models ([link](https://x.org/a1)).",
        "```{glue:figure} fig_1\n:name: fig-2\n\nA caption with math $x_2$.\n```",
        "```python\nx = 3\n```",
        "1. A numbered list item\n2. and its second item",
        "$$\nL = 2\n$$",
    ],
)
def test_what_is_not_a_typed_number(text):
    assert typed_numbers(text) == []


@pytest.mark.parametrize(
    "text, line",
    [
        ("Pretraining takes 20 minutes.", 1),
        ("A heading\n\n## Step 1", 3),
        ("```{note}\nThe body of a note is prose: 8 experts.\n```", 2),
        ("```{glue:figure} fig\n:name: fig-x\n\nA caption with 95% intervals.\n```", 4),
        ("Reduced from 32 to 8 experts (Sarkar et al. 2024).", 1),
        ("Trained in 2024 on GPUs.", 1),
        ("In 2024 it was trained.", 1),
    ],
)
def test_a_typed_number_is_found(text, line):
    assert [n for n, _ in typed_numbers(text)] == [line]


def test_a_page_with_a_digit_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "book" / "page.md"
    page.parent.mkdir()
    page.write_text("# A page\n\nIt has `code 1` and $x = 2$ but also 3 experts.\n")
    assert offences(page) == [
        "book/page.md: line 3: It has `code 1` and $x = 2$ but also 3 experts."
    ]
