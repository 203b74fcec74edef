"""The study, end to end: prepare the corpus, pretrain every expert count, build the book.

    python -m uncurl.study --profile small

Finished runs are kept and skipped; an interrupted run resumes from its last checkpoint.
"""

import argparse
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from uncurl import data
from uncurl.config import get_profile
from uncurl.train import run_name, train_all

BOOK = Path("book")


def pretrain(profile, runs: Path, procs: int) -> pd.DataFrame:
    """Train the profile's models (dense and each expert count); one row per model."""
    data_dir = data.prepare_profile(profile)
    vocab = data.load_meta(data_dir)["vocab_size"]
    jobs = [
        {"out": runs / profile.name / run_name(n),
         "model": profile.model_config(n_expert=n, vocab_size=vocab).to_dict(),
         "train": asdict(profile.train_config()), "data": data_dir}
        for n in profile.expert_counts
    ]
    summaries = train_all(jobs, procs)
    table = pd.DataFrame([
        {"model": s["name"], "n_expert": n, "total_params": s["parameters"]["total"],
         "active_params": s["parameters"]["active"], "tokens": s["tokens"],
         "val_loss": s["val_loss"], "wall_time_s": s["wall_time_s"]}
        for n, s in zip(profile.expert_counts, summaries)
    ])
    table.to_csv(runs / profile.name / "pretraining.csv", index=False)
    return table


def build_book(book: Path = BOOK) -> Path:
    """Render the book from what the study wrote (it never retrains); warnings are errors."""
    jb = Path(sys.executable).with_name("jupyter-book")
    subprocess.run([str(jb), "build", str(book), "--warningiserror", "--quiet"], check=True)
    return book / "_build" / "html" / "index.html"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uncurl.study", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="small", help="profile in uncurl/profiles.toml")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where run folders go")
    p.add_argument("--jobs", type=int, default=2, help="models trained at once")
    p.add_argument("--no-book", action="store_true", help="skip building the book")
    args = p.parse_args(argv)
    start = time.perf_counter()
    table = pretrain(get_profile(args.profile), args.runs, args.jobs)
    print(table.to_string(index=False))
    if not args.no_book:
        print(f"book: {build_book()}")
    print(f"study done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
