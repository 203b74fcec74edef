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

Without checkpoints under {runs}/{profile}/ the models are randomly initialised at the
profile's shapes (latency and memory depend on shapes, not on training); the output says which.
Tokens are random ids: with a capacity buffer the exchanged bytes do not depend on the routing.
"""

import argparse
import ctypes
import json
import os
import re
from pathlib import Path

import pandas as pd
import torch

from uncurl import costmodel, cpu
from uncurl.bench import time_all
from uncurl.bench.parallel import measure_parallel
from uncurl.config import ModelConfig, get_profile
from uncurl.model import GPT
from uncurl.model.checkpoint import find_checkpoint, load_model, read_info
from uncurl.provenance import environment

# The bench's sizes per profile, the one place they come from (the command's and the notebook's
# defaults). Tokens per rank = batch_size x seq_len, for the layer and the whole model alike;
# the small profile's 4 x 128 matches the paper's Fig. 4 (512 tokens per GPU).
BENCH = {
    "smoke": dict(batch_size=2, seq_len=32, repeats=3, warmup=1, procs=[1, 2], experts=[4, 8],
                  exchange_kib=[16, 256], deepspeed=True),
    "small": dict(batch_size=4, seq_len=128, repeats=15, warmup=3, procs=[1, 2, 4],
                  experts=[4, 8, 16, 32, 64], exchange_kib=[4, 32, 256, 1024, 4096],
                  deepspeed=True),
    "paper": dict(batch_size=2, seq_len=256, repeats=10, warmup=5, procs=[1, 2, 4, 8],
                  experts=[8, 16, 32, 64, 128], exchange_kib=[64, 1024, 16384], deepspeed=True),
}
SEED = 0


def settings(profile: str, **overrides) -> dict:
    """The profile's bench sizes with the given (non-None) overrides."""
    if profile not in BENCH:
        raise ValueError(f"no bench sizes for profile {profile!r}; known: {sorted(BENCH)}")
    return {**BENCH[profile], **{k: v for k, v in overrides.items() if v is not None}}


def notebook_overrides(**values) -> dict:
    """The notebook's parameters as overrides: 0 or "" keep the profile's size, and
    space-separated numbers become lists."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            value = [int(v) for v in value.split()] or None
        out[key] = value or None
    return out


# ---------------------------------------------------------------------------------- models

def find_models(runs, profile) -> list[dict]:
    """The profile's models: dense and each expert count (trained, else random init), then every
    reduced checkpoint under {runs}/{profile}/reduced/, with what it came from."""
    folder = Path(runs) / profile.name
    models = [_trained_or_random(folder, profile, n) for n in profile.expert_counts]
    for path in sorted(folder.glob("reduced/*")):
        try:
            ckpt = find_checkpoint(path)
        except FileNotFoundError:
            continue
        models.append(_reduced(path, ckpt, read_info(ckpt)))
    return models


def _trained_or_random(folder: Path, profile, n_expert: int) -> dict:
    name = "dense" if n_expert == 1 else f"e{n_expert}"
    try:
        info = read_info(folder / name)
    except FileNotFoundError:
        return _spec(name, "random init", profile.model_config(n_expert=n_expert).to_dict())
    return _spec(name, "trained", info["model"], folder / name, _val_loss(folder / name))


def _reduced(path: Path, ckpt: Path, info: dict) -> dict:
    red = info.get("reduction", {})
    counts = info["model"]["n_expert"]
    counts = counts if isinstance(counts, list) else [counts]
    d = counts[0] if len(set(counts)) == 1 else None
    source = Path(red["from"]).name if red.get("from") else None
    if source in ("checkpoint", ".checkpoint.old"):  # a run folder's checkpoint: the run
        source = Path(red["from"]).parent.name
    return _spec(f"reduced/{path.name}", "reduced", info["model"], ckpt,
                 _val_loss(path) or red.get("val_loss"), source=source,
                 method=red.get("method"), equivalent=None if d is None else f"e{d}")


def _spec(name, kind, model: dict, path=None, val_loss=None, **extra) -> dict:
    return {"name": name, "kind": kind, "model": model, "path": str(path) if path else None,
            "val_loss": val_loss, "n_expert": model["n_expert"], **extra}


def _val_loss(folder: Path) -> float | None:
    summary = folder / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("val_loss")
    return None


def build_model(spec: dict) -> GPT:
    """The model a spec names: its checkpoint, or a seeded random initialisation."""
    if spec["path"]:
        return load_model(spec["path"])
    torch.manual_seed(SEED)
    return GPT(ModelConfig.from_dict(spec["model"])).eval()


def batch_tokens(cfg: ModelConfig, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len {seq_len} exceeds the models' block_size {cfg.block_size}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)


# ------------------------------------------------------------------------ single process

def measure_single(models: list[dict], s: dict) -> list[dict]:
    """Latency (round-robin over the models), parameter bytes and forward peak memory."""
    built = {m["name"]: build_model(m) for m in models}
    idx = batch_tokens(next(iter(built.values())).cfg, s["batch_size"], s["seq_len"], SEED)
    steps = {name: _forward(model, idx) for name, model in built.items()}
    times = time_all(steps, s["repeats"], s["warmup"])
    _fresh_large_allocations()
    return [{"model": name, **times[name], "param_bytes": parameter_bytes(model),
             "forward_peak_bytes": forward_peak_bytes(steps[name])}
            for name, model in built.items()]


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


def _fresh_large_allocations() -> None:
    """Make glibc map every block of 128 KiB or more afresh and unmap it when freed (a fixed
    mmap threshold instead of its adaptive one), so that a pass's activations show in the
    resident high-water mark instead of reusing the heap that earlier passes left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


# ------------------------------------------------------------------------------- the bench

def run_bench(profile_name: str, runs="runs", **overrides) -> dict:
    """Everything the chapter shows, as tables (lists of rows) and values."""
    profile = get_profile(profile_name)
    s = settings(profile_name, **overrides)
    threads = s.pop("threads", 1)
    cpu.configure(threads)
    load_before = os.getloadavg()[0]
    models = find_models(runs, profile)
    single = measure_single(models, s)
    parallel = measure_parallel(profile.model_config(), models, s)
    fit = costmodel.fit(*zip(*[(r["bytes"], r["world"], r["median_s"])
                               for r in parallel["exchanges"]], strict=True))
    return {
        "profile": profile_name, "runs": str(runs), "settings": s, "threads": threads,
        "models": models, "single": single, **parallel,
        "fit": fit.__dict__, "paper_fig4": costmodel.paper_fig4_prediction(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
        "environment": environment(),
    }


def add_arguments(p):
    p.add_argument("--profile", default="small", help="models and bench sizes of this profile")
    p.add_argument("--runs", type=Path, default=Path("runs"),
                   help="parent of the run folders ({runs}/{profile}/dense, e4, reduced/...)")
    p.add_argument("--batch-size", type=_at_least(1), help="sequences per process "
                   "(default: the profile's, see BENCH in uncurl/bench/inference.py)")
    p.add_argument("--seq-len", type=_at_least(1), help="tokens per sequence")
    p.add_argument("--repeats", type=_at_least(1), help="timed runs (median and quartiles)")
    p.add_argument("--warmup", type=_at_least(0), help="discarded runs before timing")
    p.add_argument("--procs", type=_at_least(1), nargs="+", help="process counts P")
    p.add_argument("--experts", type=_at_least(1), nargs="+",
                   help="expert counts of the one-layer sweep")
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's layer")
    p.add_argument("--threads", type=_at_least(1), default=1,
                   help="torch threads of the single process (recorded)")
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
    sizes = dict(batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats,
                 warmup=args.warmup, procs=args.procs, experts=args.experts,
                 threads=args.threads, deepspeed=False if args.no_deepspeed else None)
    try:
        check(args.profile, settings(args.profile, **sizes))
    except ValueError as exc:
        raise SystemExit(f"python -m uncurl.bench inference: error: {exc}") from None
    result = run_bench(args.profile, args.runs, **sizes)
    print_tables(result)
    return result


def check(profile: str, s: dict) -> None:
    cfg = get_profile(profile).model_config()
    if s["seq_len"] > cfg.block_size:
        raise ValueError(f"--seq-len {s['seq_len']} exceeds the profile's block_size "
                         f"{cfg.block_size}")


def print_tables(result: dict) -> None:
    from uncurl import inference_report as ir

    s = result["settings"]
    kinds = sorted({m["kind"] for m in result["models"]})
    print(f"inference cost, profile {result['profile']}, models: {', '.join(kinds)} "
          f"(from {result['runs']}); batch {s['batch_size']} x {s['seq_len']} tokens per "
          f"process, {s['repeats']} repeats after {s['warmup']} warm-up; single process "
          f"{result['threads']} thread(s), expert-parallel ranks 1 thread each on "
          f"{result['environment']['cpus']} cores; load {result['load_avg_before']:.2f} before, "
          f"{result['load_avg_after']:.2f} after")
    for title, table in ir.printed_tables(result):
        print(f"\n{title}")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(table.to_string(index=False))
