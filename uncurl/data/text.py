"""Text cleaning: Project Gutenberg headers, whitespace, hard-wrapped prose, reStructuredText."""

import re

_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
    re.M | re.I,
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START line) and footer (from its END line)."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end() :]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()]
    return text


def normalize(text: str) -> str:
    """Unix newlines, no control characters or trailing spaces, at most one blank line in a row."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f\ufeff]", "", text.replace("\r\n", "\n"))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph (prose only: verse keeps its lines)."""
    return re.sub(r"(?<=\S)\n(?=\S)", " ", text)


_RST_DROP = set(  # directives that render to nothing worth reading; their indented body goes too
    "toctree index module moduleauthor sectionauthor highlight currentmodule testsetup testcleanup "
    "include literalinclude raw image figure audit-event tabularcolumns changelog".split()
)
_RST_LABELS = {
    "note": "Note:",
    "warning": "Warning:",
    "seealso": "See also:",
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
}
_RST_BARE = {"code-block", "sourcecode", "only", "doctest", "testcode", "testoutput"}  # keep body
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::\s*(.*)|\s.*|$)")
_RST_SKIP_LINE = re.compile(r"^\s*:[\w -]+:(\s.*)?$|^([=\-~^*#\"'+`.])\2{3,}\s*$")  # options, rules


def rst_to_text(rst: str) -> str:
    """Plain text from reStructuredText: directives, roles, link targets and rules removed."""
    out, skip = [], None
    for line in rst.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip is not None and (not line.strip() or indent > skip):
            continue
        skip = None
        if m := _RST_DIRECTIVE.match(line):
            name, arg = m.group(2), m.group(3)
            if name is None or name in _RST_DROP:  # also comments and `.. _label:` targets
                skip = indent
            elif name in _RST_BARE:
                continue
            elif words := " ".join(filter(None, [_RST_LABELS.get(name), arg])):
                out.append(m.group(1) + words)  # a signature, "New in version 3.2", "Note:"
        elif not _RST_SKIP_LINE.match(line):
            out.append(line)
    return _rst_inline("\n".join(out))


def _rst_inline(text: str) -> str:
    text = re.sub(r":([\w:+-]+):`([^`]+)`", lambda m: _rst_role(*m.groups()), text)
    text = re.sub(r"`([^`<]+?)\s*(<[^>]*>)?`__?", r"\1", text)  # hyperlinks
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r" ?\[#?[\w-]*\]_", "", text)  # footnote references
    text = re.sub(r"^\s*::\n", "", text, flags=re.M)
    text = re.sub(r"(\S) ?::$", r"\1:", text, flags=re.M)
    return text


def _rst_role(role: str, target: str) -> str:
    if role in ("pep", "rfc"):
        return f"{role.upper()} {target}"
    target = re.sub(r"\s*<[^>]*>$", "", target).lstrip("!")  # `title <target>` shows the title
    return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target
