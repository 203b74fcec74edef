"""The expert-parallel half of `python -m uncurl.bench inference`: one launch of P processes per
P, each measuring bare all_to_all exchanges, one MoE layer per expert count (ours, DeepSpeed's)
and the whole forward pass of every model whose expert counts P divides.

Every timed run starts after a barrier, so an exchange's time is the transfer plus the wait for
ranks that arrive later within the same pass. A pass's latency is that of its slowest rank;
phase times are the mean over ranks; both are medians over the repeats.
"""

import logging
import statistics
import time
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist

from uncurl.bench import costmodel
from uncurl.bench.models import batch_tokens, build_model
from uncurl.model import MoE
from uncurl.model.deepspeed_moe import deepspeed_moe, init_deepspeed
from uncurl.model.expert_parallel import ExpertParallelMoE, launch, shard_model
from uncurl.timing import quartiles_ms

PHASES = ("route", "first_a2a", "compute", "second_a2a", "combine")


def measure_parallel(cfg, models: list[dict], s: dict) -> dict:
    """Rows of three tables: `exchanges`, `layer` (per implementation, P, E), `forward`."""
    out = {"exchanges": [], "layer": [], "forward": []}
    for world in s["procs"]:
        per_rank = launch(_measure, world, cfg, models, s)
        for table in out:
            out[table] += _combine(per_rank, table, world)
    return out


def _measure(rank, world, cfg, models, s):
    repeats, warmup = s["repeats"], s["warmup_runs"]
    tokens = s["batch_size"] * s["seq_len"]
    result = {"exchanges": {}, "layer": {}, "forward": {}}
    if world > 1:
        for kib in s["exchange_kib"]:
            t = torch.zeros(kib * 256 // world * world)  # float32
            result["exchanges"][t.numel() * 4] = _repeat(_all_to_all(t), dict, repeats, warmup)
    experts = [e for e in s["expert_counts"] if e % world == 0]
    x = torch.randn(tokens, cfg.n_embd, generator=torch.Generator().manual_seed(rank))
    for n_expert in experts:
        layer = ExpertParallelMoE(_random_moe(cfg, n_expert), rank, world)
        result["layer"][("uncurl", n_expert)] = _time_layers(partial(layer, x), [layer], s)
    if s["deepspeed"]:
        for n_expert in experts:
            result["layer"][("DeepSpeed", n_expert)] = _deepspeed_layer(cfg, n_expert, world, x, s)
    for spec in models:
        if not _divides(world, spec["n_expert"]):
            continue
        model = build_model(spec)
        layers = shard_model(model, rank, world)
        idx = batch_tokens(model.cfg, s["batch_size"], s["seq_len"], seed=1 + rank)
        result["forward"][spec["name"]] = _time_layers(partial(model, idx), layers, s)
    return result


def _divides(world: int, n_expert) -> bool:
    """Whether P ranks can split every MoE layer's experts evenly (a dense model: trivially)."""
    counts = n_expert if isinstance(n_expert, list) else [n_expert]
    return all(n == 1 or n % world == 0 for n in counts)


def _random_moe(cfg, n_expert: int) -> MoE:
    """A layer at the profile's shapes, the same weights on every rank."""
    torch.manual_seed(0)
    return MoE(replace(cfg, n_expert=n_expert), n_expert).eval()


def _all_to_all(t):
    out = torch.empty_like(t)
    return lambda: dist.all_to_all_single(out, t)


def _time_layers(fn, layers, s) -> list[dict]:
    """Timed runs of `fn`, the phases of the expert-parallel `layers` reset before each."""
    return _repeat(
        fn,
        lambda: _phases(layers),
        s["repeats"],
        s["warmup_runs"],
        lambda: [la.phases.reset() for la in layers],
    )


def _phases(layers) -> dict:
    """Seconds per phase summed over the layers, and bytes handed to all_to_all."""
    total = {p: sum(getattr(la.phases, p) for la in layers) for p in PHASES}
    return {
        **total,
        "bytes_sent": sum(la.phases.bytes_sent for la in layers),
        "moe_layers": len(layers),
    }


def _repeat(fn, read, repeats: int, warmup: int, reset=lambda: None) -> list[dict]:
    """Per timed run: its wall time and what `read()` says about it."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        rows = []
        for _ in range(repeats):
            reset()
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            rows.append({"total": time.perf_counter() - t0, **read()})
    return rows


def _deepspeed_layer(cfg, n_expert, world, x, s) -> list[dict]:
    """DeepSpeed's layer (`ep_size = P`) on the same tokens: its own All2All timers, and the
    experts timed by hooks."""
    init_deepspeed()  # wraps the process group `launch` made, skipping the JIT-built op
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(0)
    layer = deepspeed_moe(cfg, n_expert, ep_size=world).eval()
    inner = layer.deepspeed_moe
    inner.wall_clock_breakdown = True
    clock = {"start": 0.0, "compute": 0.0}
    inner.experts.register_forward_pre_hook(lambda *_: clock.update(start=time.perf_counter()))
    inner.experts.register_forward_hook(
        lambda *_: clock.update(compute=clock["compute"] + time.perf_counter() - clock["start"])
    )

    def reset():
        clock["compute"] = 0.0
        for timer in inner.timers.timers.values():
            timer.reset()

    def read():
        return {
            "first_a2a": inner.time_falltoall / 1e3,
            "second_a2a": inner.time_salltoall / 1e3,
            "compute": clock["compute"],
            "bytes_sent": 2 * costmodel.buffer_bytes(cfg, n_expert, len(x)),
        }

    return _repeat(lambda: layer(x), read, s["repeats"], s["warmup_runs"], reset)


# ----------------------------------------------------------------------------- aggregation


def _combine(per_rank: list[dict], table: str, world: int) -> list[dict]:
    """One row per measured thing: the slowest rank's pass, the ranks' mean per phase."""
    rows = []
    for key in per_rank[0][table]:
        runs = [rank[table][key] for rank in per_rank]
        totals = [max(r[i]["total"] for r in runs) for i in range(len(runs[0]))]
        row = {
            "world": world,
            **_key(table, key),
            **quartiles_ms(totals),
            "median_s": statistics.median(totals),
        }
        for name in runs[0][0]:
            if name != "total":
                row[name] = statistics.median(
                    statistics.fmean(r[i][name] for r in runs) for i in range(len(runs[0]))
                )
        rows.append(row)
    return rows


def _key(table: str, key) -> dict:
    if table == "exchanges":
        return {"bytes": key}
    if table == "layer":
        return {"impl": key[0], "n_expert": key[1]}
    return {"model": key}
