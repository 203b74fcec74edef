"""Reduce a checkpoint on disk and write the result as a checkpoint plus its record, atomically.

The output folder loads like a trained checkpoint (`uncurl.model.load_model`); its config.json
records, under "reduction", which original experts each new expert came from. reduction.json holds
the plan, per-layer selection counts, frequencies and similarity matrices, spectral embeddings
(uncurl), and timings. The folder is written under a temporary name and renamed at the end, so a
failure leaves nothing at `out`.
"""

from pathlib import Path

import numpy as np

from uncurl import layout
from uncurl.config import ReduceConfig
from uncurl.model.checkpoint import (
    find_checkpoint,
    load_model,
    load_tokenizer,
    read_info,
    write_checkpoint,
)
from uncurl.provenance import environment
from uncurl.reduce import check_model, check_request, reduce_model
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
) -> Path:
    """Reduce `checkpoint` to `target_n_expert` experts per MoE layer on task documents `docs`
    (token arrays; `task_data` names them in the record) and write it to `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, checkpoint)
    model = load_model(checkpoint)
    check_model(model)
    source = [m.n_expert for m in model.moe_blocks]
    check_request(method, target_n_expert, source, model.cfg.top_k)
    batches = make_batches(docs, model.cfg.block_size, cfg.batch_size, cfg.max_tokens, cfg.seed)
    reduced, record = reduce_model(model, batches, method, target_n_expert, cfg)
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
    record = {
        "checkpoint": str(checkpoint),
        "task_data": task_data,
        "n_documents": len(docs),
        "max_tokens": cfg.max_tokens,
        "batch_size": cfg.batch_size,
        **record,
        "environment": environment(),
    }
    return _write(out, reduced, load_tokenizer(checkpoint), info, record)


def check_out(out: Path, checkpoint: Path) -> None:
    """Refuse to overwrite anything but an earlier reduction (never the source checkpoint)."""
    if out.exists() and not (out / RECORD).exists():
        raise ValueError(f"{out} exists and is not an earlier reduction; choose a new --out")
    if out.exists() and out.resolve() == find_checkpoint(checkpoint).resolve():
        raise ValueError("--out is the source checkpoint; choose a new folder")


def _write(out: Path, model, tok, info: dict, record: dict) -> Path:
    """Checkpoint and record in one folder, swapped in whole (replacing an earlier reduction)."""
    with layout.atomic_dir(out) as tmp:
        write_checkpoint(tmp, model, tok, info)
        layout.write_json(tmp / RECORD, record)
    return out
