"""Pretraining: AdamW, linear warm-up and decay, clipping, periodic validation, exact resume.

    python -m uncurl.train --profile small --n-expert 16 --out runs/small/e16

    torchrun --nproc_per_node=2 -m uncurl.train --engine deepspeed --ep-size 2 --profile smoke \
        --n-expert 4 --out runs/smoke/e4-ds

The run folder holds `checkpoint/` (weights, config, tokenizer, optimizer state; written
atomically), `metrics.jsonl` (one line per step and per evaluation) and `summary.json`.
Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would have.
A run holds its folder's lock while it trains (a second command on it is refused) and never
resumes a folder that holds another model's run or anything that is not a run.
A step runs on an engine (`uncurl.engine`: one process; `uncurl.distributed`: DeepSpeed over the
processes a launcher started, experts split over `ep_size` of them).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from uncurl import cpu, data, distributed, layout
from uncurl.cli import one_line_errors
from uncurl.config import ModelConfig, TrainConfig, closest, get_profile, parse_overrides
from uncurl.engine import Engine
from uncurl.layout import write_json
from uncurl.model import GPT, count_parameters
from uncurl.model.checkpoint import read_info
from uncurl.optim import lr_at
from uncurl.provenance import environment


def get_batch(tokens: np.ndarray, step: int, batch_size: int, block_size: int, seed: int):
    """Random windows of the token array, drawn from a generator keyed by (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    return _windows(tokens, starts, block_size)


def eval_batches(tokens: np.ndarray, n_batches: int, batch_size: int, block_size: int):
    """Fixed, evenly spaced validation windows: the same for every model and every evaluation."""
    n = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - block_size - 1, n).astype(np.int64)
    return [_windows(tokens, s, block_size) for s in starts.reshape(n_batches, batch_size)]


def _windows(tokens, starts, block_size):
    x = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x[:, :-1]), torch.from_numpy(x[:, 1:])  # (B, T), (B, T)


def make_engine(model: GPT, cfg: TrainConfig) -> Engine:
    """The engine `cfg.engine` names: one process, or this process's part of a DeepSpeed run."""
    engine = distributed.DeepSpeedEngine if cfg.engine == "deepspeed" else Engine
    return engine(model, cfg)


def train(
    out: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    stop_after: int | None = None,
    progress: bool = True,
    position: int | None = None,
) -> dict:
    """Train (or resume) a model in run folder `out`; returns the run summary.

    `stop_after` ends the run early at that step, as an interruption would (tests use it).
    """
    out = Path(out)
    cpu.configure(cfg.threads)
    meta = data.load_meta(data_dir)
    if model_cfg.vocab_size != meta["vocab_size"]:
        raise ValueError(
            f"model vocab_size {model_cfg.vocab_size} differs from the data's tokenizer "
            f"({meta['vocab_size']} tokens in {data_dir}); set vocab_size to match"
        )
    writer = distributed.rank() == 0  # a launch's first process owns the folder
    with layout.locked(out) if writer else nullcontext():
        if writer:
            layout.recover_dir(out / layout.CHECKPOINT)
            layout.remove_temporaries(out)
        check_run_folder(out, model_cfg, cfg)
        done = _finished_summary(out)
        if done is not None:
            return done
        return _train(out, model_cfg, cfg, data_dir, meta, stop_after, progress, position)


def _train(out, model_cfg, cfg, data_dir, meta, stop_after, progress, position) -> dict:
    train_tokens = data.load_tokens(data_dir, "train")
    val = eval_batches(
        data.load_tokens(data_dir, "val"), cfg.eval_batches, cfg.batch_size, model_cfg.block_size
    )
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    torch.manual_seed(cfg.seed)
    engine = make_engine(GPT(model_cfg).train(), cfg)
    step, elapsed, val_loss = 0, 0.0, None
    state = engine.load_train_state(out)
    if state is not None:
        engine.restore(out / layout.CHECKPOINT, state)
        step, elapsed, val_loss = state["step"], state["elapsed"], state.get("val_loss")
    metrics = _open_metrics(out / layout.METRICS, keep_until=step) if engine.is_main else None
    tokenizer = data.load_tokenizer(data_dir)

    def checkpoint():
        state = {
            "step": step,
            "elapsed": elapsed,
            "val_loss": val_loss,  # the summary's, should the run be stopped before writing it
        }
        info = {"train": asdict(cfg), "data": str(data_dir), "step": step}
        engine.save(out / layout.CHECKPOINT, tokenizer, info, state)

    end = cfg.max_steps if stop_after is None else min(stop_after, cfg.max_steps)
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (progress and engine.is_main),
        desc=out.name,
        unit="step",
        dynamic_ncols=True,
        position=position,
    )
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        x, y = get_batch(train_tokens, step, cfg.batch_size, model_cfg.block_size, cfg.seed)
        losses = engine.step(x, y, lr)
        step += 1
        elapsed += time.perf_counter() - t0
        record = {"step": step, "tokens": step * tokens_per_step, **losses}
        record.update(lr=lr, elapsed=elapsed)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = record["val_loss"] = engine.evaluate(val)
        if metrics:
            metrics.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", val=f"{val_loss or float('nan'):.3f}")
        if step % cfg.ckpt_interval == 0 or step == end:
            checkpoint()
    bar.close()
    if metrics:
        metrics.close()
    summary = {
        "name": out.name,
        "step": step,
        "tokens": step * tokens_per_step,
        "val_loss": val_loss,
        "wall_time_s": elapsed,
        "parameters": count_parameters(model_cfg),
        "model": model_cfg.to_dict(),
        "train": asdict(cfg),
        "data": str(data_dir),
        "data_hash": meta.get("hash"),
        "finished": step >= cfg.max_steps,
        "device": engine.describe(),
        "environment": environment(),
    }
    if engine.is_main:
        write_json(out / layout.SUMMARY, summary)
    return summary


RUN_FILES = (layout.CHECKPOINT, layout.METRICS, layout.SUMMARY)  # and hidden ones (locks)


def check_run_folder(out: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse a folder that holds anything but a run of this very model and recipe: resuming
    another model's run would mix two runs, and other files are not a run's to overwrite."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    others = sorted(
        p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.startswith(".")
    )
    if others:
        raise ValueError(
            f"{out} is not a training run's folder (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); give a new or empty folder as --out"
        )
    recorded = _recorded_settings(out)
    wanted = {"model": model_cfg.to_dict(), "train": asdict(cfg)}
    if recorded is not None and recorded != wanted:
        raise ValueError(
            f"{out} holds a run with other settings ({_differences(recorded, wanted)}), which is "
            f"never resumed into; give a new --out folder, or delete {out} to start over"
        )


def _recorded_settings(out: Path) -> dict | None:
    """The model and training settings of the run in `out`: its summary's, else its
    checkpoint's; None before its first checkpoint (nothing there to resume)."""
    if (out / layout.SUMMARY).exists():
        summary = layout.read_json(out / layout.SUMMARY)
        return {"model": summary["model"], "train": summary["train"]}
    if (out / layout.CHECKPOINT).exists():
        info = read_info(out / layout.CHECKPOINT)
        return {"model": info["model"], "train": info["train"]}
    return None


def _differences(recorded: dict, wanted: dict, shown: int = 3) -> str:
    """'n_expert 2 there, 4 asked; ...' for the settings that differ."""
    diffs = [
        f"{key} {recorded[part].get(key)} there, {value} asked"
        for part in ("model", "train")
        for key, value in wanted[part].items()
        if recorded[part].get(key) != value
    ]
    return "; ".join(diffs[:shown]) + ("; ..." if len(diffs) > shown else "")


def _finished_summary(out: Path) -> dict | None:
    """The summary of a finished run whose final checkpoint is there (a run without it is
    retrained: the same steps give the same weights)."""
    path = out / layout.SUMMARY
    if not path.exists() or not (out / layout.CHECKPOINT).exists():
        return None
    summary = layout.read_json(path)
    return summary if summary["finished"] else None


def _open_metrics(path: Path, keep_until: int):
    """Open metrics.jsonl for appending line by line (whoever watches it sees each step), first
    keeping only the lines up to the checkpoint being resumed; a last line without its newline,
    torn by a kill, goes with the rest."""
    kept = [ln for ln in _complete_lines(path) if json.loads(ln)["step"] <= keep_until]
    layout.write_text(path, "".join(ln + "\n" for ln in kept))
    return path.open("a", buffering=1)


def _complete_lines(path: Path) -> list[str]:
    """The lines of `path` that end with a newline (none if it does not exist)."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def load_metrics(run_dir) -> list[dict]:
    """Every whole line of a run's metrics.jsonl (a run in progress may be writing the last)."""
    return [json.loads(ln) for ln in _complete_lines(Path(run_dir) / layout.METRICS)]


def split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Route each override to the model or the training config by its name."""
    model_keys = set(ModelConfig.__dataclass_fields__)
    train_keys = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - model_keys - train_keys)
    if unknown:
        raise ValueError(
            f"unknown --set key {unknown[0]!r}{closest(unknown[0], model_keys | train_keys)}; "
            f"model keys: {', '.join(sorted(model_keys))}; "
            f"train keys: {', '.join(sorted(train_keys))}"
        )
    return (
        {k: v for k, v in overrides.items() if k in model_keys},
        {k: v for k, v in overrides.items() if k in train_keys},
    )


def _train_job(job: dict) -> dict:
    return train(
        job["out"],
        ModelConfig.from_dict(job["model"]),
        TrainConfig.from_dict(job["train"]),
        job["data"],
        stop_after=job.get("stop_after"),
        progress=job["progress"],
        position=job.get("position"),
    )


def train_all(jobs: list[dict], procs: int = 2) -> list[dict]:
    """Train several runs, `procs` processes at a time (one thread each is fastest here).

    Each job is {"out", "model", "train", "data"} (configs as dicts). Finished runs are skipped,
    interrupted ones resume.
    """
    procs = min(procs, len(jobs))
    todo = [dict(job, progress=True, position=i % procs) for i, job in enumerate(jobs)]
    if procs <= 1 or any(job["train"]["engine"] == "deepspeed" for job in jobs):  # launched
        return [_train_job(job) for job in todo]
    ctx = multiprocessing.get_context("spawn")  # a forked torch can deadlock its thread pools
    with concurrent.futures.ProcessPoolExecutor(
        procs, mp_context=ctx, initializer=cpu.die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(_train_job, todo))


def _jobs(args) -> list[dict]:
    profile = get_profile(args.profile)
    model_over, train_over = split_overrides(parse_overrides(args.set))
    for key in ("seed", "engine", "ep_size", "zero_stage", "device"):
        if getattr(args, key) is not None:
            train_over[key] = getattr(args, key)
    for n in args.n_expert:  # a bad setting is named even where the data is not prepared yet
        profile.model_config(n_expert=n, **model_over), profile.train_config(**train_over)
    data_dir = args.data or profile.data_dir
    vocab = data.load_meta(data_dir)["vocab_size"]
    cfg = profile.train_config(**train_over)
    jobs = []
    for n in args.n_expert:  # every job checked before any starts
        model_cfg = profile.model_config(n_expert=n, vocab_size=vocab, **model_over)
        out = args.out if len(args.n_expert) == 1 else args.out / layout.model_label(n)
        check_run_folder(out, model_cfg, cfg)
        jobs.append(
            {
                "out": out,
                "model": model_cfg.to_dict(),
                "train": asdict(cfg),
                "data": data_dir,
                "stop_after": args.stop_after,
            }
        )
    return jobs


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uncurl.train", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="small", help="profile in uncurl/profiles.toml")
    p.add_argument(
        "--n-expert",
        type=int,
        nargs="+",
        required=True,
        help="experts per MoE layer (1 = dense); several train side by side",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="run folder (resumed if it exists); with several --n-expert, their parent",
    )
    p.add_argument("--data", type=Path, help="prepared data folder (default: the profile's)")
    p.add_argument("--seed", type=int, help="override the profile's seed")
    p.add_argument("--engine", choices=("torch", "deepspeed"), help="one process or DeepSpeed")
    p.add_argument("--ep-size", type=int, help="DeepSpeed: processes each MoE layer's experts span")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed: ZeRO stage (1 or 2)")
    p.add_argument("--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument(
        "--stop-after", type=int, help="end at this step, as an interruption would (rerun resumes)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override model or training parameters, e.g. lr=1e-3 top_k=2",
    )
    args = p.parse_args(argv)
    with one_line_errors(p.prog):
        summaries = train_all(_jobs(args), args.jobs)
    for summary in summaries if distributed.rank() == 0 else ():  # one report per launch
        print(
            f"{summary['name']}: step {summary['step']}, val_loss {summary['val_loss']:.4f}, "
            f"{summary['wall_time_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
