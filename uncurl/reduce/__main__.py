"""Reduce a trained SMoE checkpoint's experts for one task; writes a checkpoint and reduction.json.

    python -m uncurl.reduce --checkpoint runs/small/e64 --method uncurl --n-expert 8 \\
        --task-data data/prepared/bundled:drama --out runs/small/e64-uncurl-d8-drama

The output folder loads like a trained checkpoint (`uncurl.checkpoint.load_model`); its config.json
records, under "reduction", which original experts each new expert came from. reduction.json holds
the plan, per-layer selection counts, frequencies and similarity matrices, spectral embeddings
(uncurl), and timings. The folder is written under a temporary name and renamed at the end, so a
failure leaves nothing at --out.
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from uncurl.checkpoint import find_checkpoint, load_model, read_info, save_checkpoint, write_json
from uncurl.provenance import environment
from uncurl.reduce import (
    METHODS,
    ROUTERS,
    SOLVERS,
    check_model,
    check_request,
    load_task_docs,
    make_batches,
    reduce_model,
)

RECORD = "reduction.json"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m uncurl.reduce", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="SMoE checkpoint or run folder")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--n-expert", type=int, required=True, help="D, experts per MoE layer after")
    p.add_argument("--task-data", required=True,
                   help="registered task, prepared DIR[:DOMAIN] (train split), or .txt file/folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the reduced checkpoint")
    p.add_argument("--router", choices=ROUTERS,
                   help="router handling (default: keep for pruning methods, reinit for merging)")
    p.add_argument("--align", choices=SOLVERS, default="hungarian", help="weight-matching solver")
    p.add_argument("--max-tokens", type=int, default=65536,
                   help="task tokens for the statistics (a seeded sample of windows)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling, clustering, random, router init")
    p.add_argument("--warmup-steps", type=int, default=0, help="router-only training steps")
    p.add_argument("--warmup-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {out}")


def run(args) -> Path:
    _check_out(args.out, args.checkpoint)
    model = load_model(args.checkpoint)
    check_model(model)
    check_request(args.method, args.n_expert, [m.n_expert for m in model.moe_blocks],
                  model.cfg.top_k)
    tokenizer = _tokenizer(args.checkpoint)
    docs = load_task_docs(args.task_data, tokenizer, model.cfg.vocab_size)
    batches = make_batches(docs, model.cfg.block_size, args.batch_size, args.max_tokens,
                           args.seed)
    reduced, record = reduce_model(model, batches, args.method, args.n_expert, args.router,
                                   args.seed, args.align, args.warmup_steps, args.warmup_lr)
    parent = {k: v for k, v in read_info(args.checkpoint).items() if k != "model"}
    info = {"reduction": {
        "from": str(args.checkpoint), "method": args.method, "router": record["router"],
        "task_data": args.task_data, "n_expert": record["plan"]["n_expert"],
        "sources": [[g["members"] for g in layer["groups"]] for layer in record["plan"]["layers"]],
        "parent": parent,
    }}
    record = {"checkpoint": str(args.checkpoint), "task_data": args.task_data,
              "n_documents": len(docs), "max_tokens": args.max_tokens, **record,
              "environment": environment()}
    return _write(args.out, reduced, tokenizer, info, record)


def _check_out(out: Path, checkpoint: Path) -> None:
    """Refuse to overwrite anything but an earlier reduction (never the source checkpoint)."""
    if out.exists() and not (out / RECORD).exists():
        raise ValueError(f"{out} exists and is not an earlier reduction; choose a new --out")
    if out.exists() and out.resolve() == find_checkpoint(checkpoint).resolve():
        raise ValueError("--out is the source checkpoint; choose a new folder")


def _tokenizer(checkpoint: Path):
    ckpt = find_checkpoint(checkpoint)
    return AutoTokenizer.from_pretrained(ckpt) if (ckpt / "tokenizer.json").exists() else None


def _write(out: Path, model, tokenizer, info: dict, record: dict) -> Path:
    """Checkpoint and record under a temporary name, then renamed to `out` (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.reducing"), out.with_name(f".{out.name}.old")
    try:
        save_checkpoint(tmp, model, tokenizer, info)
        write_json(tmp / RECORD, record)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
