"""The premise sweep: at our scale, do more experts give lower validation loss at equal tokens?

    python -m uncurl.sweep --out runs/sweep

Every variant is the `small` profile with a few overrides; runs whose settings match the
profile's own runs are shared with them (same folder, so trained once). Writes
`premise_sweep.csv`: one row per run with its settings, final validation loss and wall time.
The book's appendix reads the copy committed under `data/results/`.
"""

import argparse
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from uncurl import data, layout
from uncurl.config import get_profile
from uncurl.train import train_all

# (label, data vocabulary, model overrides, train overrides, expert counts), in the order they
# were tried. Overrides are relative to the profile; a variant without overrides is the profile
# itself and shares its run folders. Runs are kept, so adding a variant trains only its runs.
OLD_INIT = {"router_init_std": 0.02}  # GPT-2's init for every linear layer, routers included
VARIANTS = [
    (
        "d_model 128, vocab 4096, router std 0.02, 250 steps (equal wall time)",
        4096,
        {"n_embd": 128, **OLD_INIT},
        {"max_steps": 250},
        (1, 16),
    ),
    ("d_model 64, router std 0.02, 500 steps", 2048, OLD_INIT, {"max_steps": 500}, (1, 16)),
    (
        "d_model 64, router std 0.02, 500 steps, seed 1",
        2048,
        OLD_INIT,
        {"max_steps": 500, "seed": 1},
        (1, 16),
    ),
    ("router std 0.3, 500 steps", 2048, {}, {"max_steps": 500}, (16,)),
    ("router std 1.0, 500 steps", 2048, {"router_init_std": 1.0}, {"max_steps": 500}, (16,)),
    ("small profile (router std 0.3, 600 steps)", 2048, {}, {}, (1, 4, 8, 16, 32, 64)),
    ("small profile (router std 0.3, 600 steps), seed 1", 2048, {}, {"seed": 1}, (1, 16)),
]


def data_dir_for(vocab: int, profile) -> Path:
    """The profile's data folder, or a sibling prepared as the profile's at another vocabulary
    size (prepared again if it was prepared with other settings)."""
    if vocab == profile.data["vocab_size"]:
        return profile.data_dir
    out = layout.prepared_dir(profile.data_dir.name, vocab)
    fields = {**asdict(profile.data_config()), "vocab_size": vocab}
    if not (out / layout.META).exists() or data.load_meta(out)["params"] != fields:
        data.prepare(out, **fields)
    return out


def jobs_for(profile, runs: Path) -> list[dict]:
    jobs = []
    for label, vocab, model_over, train_over, experts in VARIANTS:
        data_dir = data_dir_for(vocab, profile)
        for n in experts:
            model = profile.model_config(n_expert=n, vocab_size=vocab, **model_over)
            train = profile.train_config(**train_over)
            # the profile's own settings share the profile's run folder
            own = not model_over and not train_over and vocab == profile.data["vocab_size"]
            folders = layout.Runs(runs, profile.name)
            folder = folders.pretrained(n) if own else folders.sweep(label, n)
            jobs.append(
                {
                    "label": label,
                    "out": folder,
                    "model": model.to_dict(),
                    "train": asdict(train),
                    "data": data_dir,
                }
            )
    return jobs


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uncurl.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="small")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="parent of the run folders")
    p.add_argument("--csv", type=Path, default=Path("runs/sweep/premise_sweep.csv"))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    jobs = jobs_for(get_profile(args.profile), args.runs)
    summaries = train_all([{k: v for k, v in j.items() if k != "label"} for j in jobs], args.jobs)
    rows = [
        {
            "variant": j["label"],
            "n_expert": j["model"]["n_expert"],
            "seed": j["train"]["seed"],
            "n_embd": j["model"]["n_embd"],
            "vocab_size": j["model"]["vocab_size"],
            "router_init_std": j["model"]["router_init_std"],
            "steps": j["train"]["max_steps"],
            "lr": j["train"]["lr"],
            "tokens": s["tokens"],
            "val_loss": s["val_loss"],
            "wall_time_s": s["wall_time_s"],
            "total_params": s["parameters"]["total"],
            "active_params": s["parameters"]["active"],
            "git": s["environment"]["git"],
            "run": str(j["out"]),
        }
        for j, s in zip(jobs, summaries, strict=True)
    ]
    layout.write_text(args.csv, pd.DataFrame(rows).to_csv(index=False))
    print(pd.DataFrame(rows)[["variant", "n_expert", "seed", "val_loss", "wall_time_s"]])


if __name__ == "__main__":
    main()
