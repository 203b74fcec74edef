"""What experts cost at inference: latency, memory and All2All, measured (forward passes only).

1. One process: the forward latency of a batch through every model of the profile (dense, each
   expert count, each reduced model), at evaluation capacity, timed round-robin (warm-up runs
   discarded; median and quartiles); parameter bytes (exact) and the peak resident memory a
   forward pass adds (Linux: the high-water mark is reset to the current resident size through
   /proc/self/clear_refs before the pass, and glibc maps blocks of 128 KiB or more afresh, so
   the number is what the OS had to provide for activations and work space; smaller blocks the
   allocator may reuse, so it is a lower bound).
2. Expert parallelism over P processes (gloo on localhost, one thread each): one MoE layer per
   expert count, ours (`uncurl.model.expert_parallel`) and DeepSpeed's (`ep_size = P`), split
   into the two All2All exchanges and the expert computation; and the whole forward pass of
   every model, each rank on its own batch shard of the same size (data-parallel tokens, as
   DeepSpeed).
   The P processes share this machine's cores: with P above the core count compute slows
   with P, which the dense model (no exchanges) shows on its own.
3. Bare all_to_all exchanges of several sizes, to which the cost model (`uncurl.costmodel`) is
   fitted, and the fitted model next to the paper's Fig. 4 setup on published GPU bandwidths.

Sizes come from the profile's `inference_bench` table (`uncurl.config.InferenceBenchConfig`).
Without checkpoints under {runs}/{profile}/ the models are randomly initialised at the
profile's shapes (latency and memory depend on shapes, not on training); the output says which.
Tokens are random ids: with a capacity buffer the exchanged bytes do not depend on the routing.
"""

import argparse
import dataclasses
import os
import re
from pathlib import Path

import pandas as pd
import torch

from uncurl import cpu
from uncurl.bench import costmodel
from uncurl.bench.inference_tables import printed_tables
from uncurl.bench.models import SEED, batch_tokens, build_model, find_models
from uncurl.bench.parallel import measure_parallel
from uncurl.config import get_profile
from uncurl.model import GPT
from uncurl.provenance import environment
from uncurl.timing import time_all


def notebook_overrides(**values) -> dict:
    """The notebook's parameters as overrides: 0 or "" keep the profile's size, and
    space-separated numbers become lists."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            value = [int(v) for v in value.split()] or None
        out[key] = value or None
    return out


# ------------------------------------------------------------------------ single process


def measure_single(models: list[dict], s: dict) -> list[dict]:
    """Latency (round-robin over the models), parameter bytes and forward peak memory."""
    built = {m["name"]: build_model(m) for m in models}
    idx = batch_tokens(next(iter(built.values())).cfg, s["batch_size"], s["seq_len"], SEED)
    steps = {name: _forward(model, idx) for name, model in built.items()}
    times = time_all(steps, s["repeats"], s["warmup_runs"])
    cpu.map_large_blocks_afresh()
    return [
        {
            "model": name,
            **times[name],
            "param_bytes": parameter_bytes(model),
            "forward_peak_bytes": forward_peak_bytes(steps[name]),
        }
        for name, model in built.items()
    ]


def _forward(model: GPT, idx: torch.Tensor):
    def forward():
        with torch.inference_mode():
            model(idx)

    return forward


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (tied embedding and head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def forward_peak_bytes(fn) -> int | None:
    """Resident memory `fn` adds at its peak (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current resident size
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


# ------------------------------------------------------------------------------- the bench


def settings(profile, **overrides) -> dict:
    """The profile's bench sizes with the given (non-None) overrides, checked."""
    s = dataclasses.asdict(
        profile.bench_config(**{k: v for k, v in overrides.items() if v is not None})
    )
    block_size = profile.model_config().block_size
    if s["seq_len"] > block_size:
        raise ValueError(f"seq_len {s['seq_len']} exceeds the profile's block_size {block_size}")
    return s


def run_bench(profile_name: str, runs="runs", threads: int = 1, **overrides) -> dict:
    """Everything the chapter shows, as tables (lists of rows) and values."""
    profile = get_profile(profile_name)
    s = settings(profile, **overrides)
    cpu.configure(threads)
    load_before = os.getloadavg()[0]
    models = find_models(runs, profile)
    single = measure_single(models, s)
    parallel = measure_parallel(profile.model_config(), models, s)
    fit = costmodel.fit(
        *zip(*[(r["bytes"], r["world"], r["median_s"]) for r in parallel["exchanges"]], strict=True)
    )
    return {
        "profile": profile_name,
        "runs": str(runs),
        "settings": s,
        "threads": threads,
        "models": models,
        "single": single,
        **parallel,
        "fit": fit.__dict__,
        "paper_fig4": costmodel.paper_fig4_prediction(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
        "environment": environment(),
    }


def add_arguments(p):
    p.add_argument("--profile", default="small", help="models and bench sizes of this profile")
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs"),
        help="parent of the run folders ({runs}/{profile}/dense, e4, reduced/...)",
    )
    p.add_argument(
        "--batch-size",
        type=_at_least(1),
        help="sequences per process "
        "(default: the profile's `inference_bench` in uncurl/profiles.toml)",
    )
    p.add_argument("--seq-len", type=_at_least(1), help="tokens per sequence")
    p.add_argument("--repeats", type=_at_least(1), help="timed runs (median and quartiles)")
    p.add_argument("--warmup-runs", type=_at_least(0), help="discarded runs before timing")
    p.add_argument("--procs", type=_at_least(1), nargs="+", help="process counts P")
    p.add_argument(
        "--n-expert",
        type=_at_least(1),
        nargs="+",
        dest="expert_counts",
        help="expert counts of the one-layer sweep",
    )
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's layer")
    p.add_argument(
        "--threads",
        type=_at_least(1),
        default=1,
        help="torch threads of the single process (recorded)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def run(args) -> dict:
    """The command: check the arguments, measure, print the tables."""
    sizes = dict(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        repeats=args.repeats,
        warmup_runs=args.warmup_runs,
        procs=args.procs,
        expert_counts=args.expert_counts,
        deepspeed=False if args.no_deepspeed else None,
    )
    try:
        settings(get_profile(args.profile), **sizes)
    except ValueError as exc:
        raise SystemExit(f"python -m uncurl.bench inference: error: {exc}") from None
    result = run_bench(args.profile, args.runs, args.threads, **sizes)
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    s = result["settings"]
    kinds = sorted({m["kind"] for m in result["models"]})
    print(
        f"inference cost, profile {result['profile']}, models: {', '.join(kinds)} "
        f"(from {result['runs']}); batch {s['batch_size']} x {s['seq_len']} tokens per "
        f"process, {s['repeats']} repeats after {s['warmup_runs']} warm-up; single process "
        f"{result['threads']} thread(s), expert-parallel ranks 1 thread each on "
        f"{result['environment']['cpus']} cores; load {result['load_avg_before']:.2f} before, "
        f"{result['load_avg_after']:.2f} after"
    )
    for title, table in printed_tables(result):
        print(f"\n{title}")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(table.to_string(index=False))
