"""Reduce a checkpoint on disk and write the result as a checkpoint plus its record, atomically.

Our checkpoints (`reduce_checkpoint`): the output folder loads like a trained checkpoint
(`uncurl.model.load_model`); its config.json records, under "reduction", which original experts
each new expert came from. Transformers checkpoints (`reduce_hf_checkpoint`): the output folder
loads with `AutoModelForCausalLM.from_pretrained` (safetensors, config with the new expert count,
generation config, tokenizer). Either way reduction.json holds the plan, per-layer selection
counts, frequencies and similarity matrices, spectral embeddings (uncurl), and timings. The folder
is written under a temporary name and renamed at the end, so a failure leaves nothing at `out`.
"""

import copy
from pathlib import Path

import numpy as np

from uncurl import layout
from uncurl.config import ReduceConfig
from uncurl.model.checkpoint import (
    digest,
    find_checkpoint,
    load_model,
    load_tokenizer,
    read_info,
    write_checkpoint,
)
from uncurl.provenance import environment
from uncurl.reduce import NEEDS, adapt, check_reduction, collect_stats, hf, reduce_model
from uncurl.tasks import make_batches

RECORD = layout.REDUCTION


def reduce_checkpoint(
    checkpoint,
    out,
    method: str,
    target_n_expert: int,
    docs: list[np.ndarray],
    task_data: str,
    cfg: ReduceConfig = ReduceConfig(),
    force: bool = False,
) -> Path:
    """Reduce `checkpoint` to `target_n_expert` experts per MoE layer on task documents `docs`
    (token arrays; `task_data` names them in the record) and write it to `out`, replacing a
    reduction there only if `force`."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, find_checkpoint(checkpoint), force)
    model = load_model(checkpoint)
    check_reduction(adapt(model), method, target_n_expert, cfg.router)
    source = [m.n_expert for m in model.moe_blocks]
    batches = make_batches(docs, model.cfg.block_size, cfg.batch_size, cfg.max_tokens, cfg.seed)
    stats = _shared_stats(checkpoint, model, batches, method, target_n_expert, task_data, cfg)
    reduced, record = reduce_model(model, batches, method, target_n_expert, cfg, stats)
    parent = {k: v for k, v in read_info(checkpoint).items() if k != "model"}
    info = {
        "reduction": {
            "from": str(checkpoint),
            "method": method,
            "router": record["router"],
            "task_data": task_data,
            "source_n_expert": source,
            "target_n_expert": record["plan"]["target_n_expert"],
            "sources": [
                [g["members"] for g in layer["groups"]] for layer in record["plan"]["layers"]
            ],
            "parent": parent,
        }
    }
    tok = load_tokenizer(checkpoint)
    return _write(
        out,
        lambda tmp: write_checkpoint(tmp, reduced, tok, info),
        _record(checkpoint, task_data, docs, cfg, record),
    )


_STATS: dict[tuple, list] = {}  # this process's latest statistics, by what decides them
_STATS_KEPT = 64  # statistics are small: counts and (Z, Z) or (Z, C) sums per layer


def _shared_stats(checkpoint, model, batches, method: str, d: int, task_data: str, cfg):
    """The statistics of the checkpoint's model on the task sample of `cfg.seed`, read once in
    this process for every method that needs the same ones: a grid reduces one source on one
    sample by several methods. A copy, so that no method sees another's changes."""
    needs = NEEDS.get(method, ())
    sample = (task_data, cfg.seed, cfg.max_tokens, cfg.batch_size)
    key = (str(checkpoint), digest(checkpoint), *sample, needs, d if "naee" in needs else None)
    if key not in _STATS:
        if len(_STATS) >= _STATS_KEPT:
            _STATS.pop(next(iter(_STATS)))  # the oldest
        _STATS[key] = collect_stats(adapt(model), batches, needs, d)
    return copy.deepcopy(_STATS[key])


def reduce_hf_checkpoint(
    source,
    out,
    method: str,
    target_n_expert: int,
    docs: list[np.ndarray],
    task_data: str,
    cfg: ReduceConfig = ReduceConfig(),
    block_size: int | None = None,
    device: str | None = None,
    force: bool = False,
) -> Path:
    """Reduce a transformers MoE checkpoint (a `save_pretrained` folder) to `target_n_expert`
    experts per MoE layer on task documents `docs`, tokenized with its tokenizer, in windows of
    `block_size` tokens, on `device` (default: a GPU if there is one), and write it to `out`."""
    source, out = Path(source), Path(out)
    check_out(out, source, force)
    model = hf.load_checkpoint(source, device)
    check_reduction(adapt(model), method, target_n_expert, cfg.router)
    window = hf.window(model.config, block_size)
    batches = make_batches(docs, window, cfg.batch_size, cfg.max_tokens, cfg.seed)
    reduced, record = reduce_model(model, batches, method, target_n_expert, cfg)
    experts = {"family": model.config.model_type, "activation": adapt(model).layers[0].activation}
    record = {
        "block_size": window,
        "experts": experts,
        **_record(source, task_data, docs, cfg, record),
    }
    tok = hf.load_tokenizer(source)
    return _write(out, lambda tmp: hf.write_checkpoint(tmp, reduced, tok), record)


def check_out(out: Path, source: Path, force: bool = False) -> None:
    """Refuse an `out` inside the source checkpoint (the folder `source`), one that holds
    anything but a reduction, and one that holds a finished reduction unless `force`."""
    if out.resolve().is_relative_to(source.resolve()):
        raise ValueError(
            f"--out {out} is inside the source checkpoint {source}; choose a folder outside it"
        )
    if out.exists() and not (out / RECORD).exists():
        raise ValueError(f"{out} exists and is not an earlier reduction; choose a new --out")
    if (out / RECORD).exists() and not force:
        done = layout.read_json(out / RECORD)
        raise ValueError(
            f"{out} holds a finished reduction ({done.get('method')} to "
            f"{done.get('target_n_expert')} experts on {done.get('task_data')}); "
            "choose a new --out, or give --force to replace it"
        )


def _record(source: Path, task_data: str, docs, cfg: ReduceConfig, record: dict) -> dict:
    return {
        "checkpoint": str(source),
        "task_data": task_data,
        "n_documents": len(docs),
        "max_tokens": cfg.max_tokens,
        "batch_size": cfg.batch_size,
        **record,
        "environment": environment(),
    }


def _write(out: Path, write_model, record: dict) -> Path:
    """Checkpoint and record in one folder, swapped in whole (replacing an earlier reduction)."""
    with layout.atomic_dir(out) as tmp:
        write_model(tmp)
        layout.write_json(tmp / RECORD, record)
    return out
