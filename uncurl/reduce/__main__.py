"""Reduce a trained SMoE checkpoint's experts for one task; writes a checkpoint and reduction.json.

    python -m uncurl.reduce --checkpoint runs/small/e64 --method uncurl --target-n-expert 8 \\
        --task-data data/prepared/bundled:drama --out runs/small/e64-uncurl-d8-drama
    python -m uncurl.reduce --hf path/to/Mixtral --method uncurl --target-n-expert 4 \\
        --task-data my_task_texts/ --out path/to/Mixtral-uncurl-d4

What the output folder holds: `uncurl.reduce.save`.
"""

import argparse
import dataclasses
from pathlib import Path

from uncurl import cpu
from uncurl.cli import one_line_errors
from uncurl.config import ReduceConfig
from uncurl.model.checkpoint import find_checkpoint, load_tokenizer, read_info
from uncurl.reduce import METHODS, ROUTERS, SOLVERS, hf, load_task_docs
from uncurl.reduce.save import check_out, reduce_checkpoint, reduce_hf_checkpoint

PROG = "python -m uncurl.reduce"


def main(argv=None):
    d = ReduceConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="our SMoE checkpoint or run folder")
    source.add_argument(
        "--hf", type=Path, help="a transformers MoE causal LM folder (written by save_pretrained)"
    )
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument(
        "--target-n-expert", type=int, required=True, help="D, experts per MoE layer after"
    )
    p.add_argument(
        "--task-data",
        required=True,
        help="registered task, prepared DIR[:DOMAIN] (train split), or .txt file/folder",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the reduced checkpoint")
    p.add_argument(
        "--router",
        choices=ROUTERS,
        default=d.router,
        help="router handling (default: keep for pruning methods, tie for hcsmoe-tied, reinit "
        "for merging)",
    )
    p.add_argument("--solver", choices=SOLVERS, default=d.solver, help="weight-matching solver")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="task tokens for the statistics (a seeded sample of windows)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--seed", type=int, default=d.seed, help="sampling, clustering, random, router init"
    )
    p.add_argument(
        "--router-warmup-steps",
        type=int,
        default=d.router_warmup_steps,
        help="router-only training steps on the task data after the reduction, when the "
        "router is new (reinit or merge)",
    )
    p.add_argument("--router-warmup-lr", type=float, default=d.router_warmup_lr)
    p.add_argument(
        "--kmeans-n-init", type=int, default=d.kmeans_n_init, help="UNCURL's K-means restarts"
    )
    p.add_argument("--kmeans-max-iter", type=int, default=d.kmeans_max_iter)
    p.add_argument(
        "--block-size",
        type=int,
        help=f"--hf only: tokens per task window (default {hf.DEFAULT_BLOCK_SIZE}, within the "
        "model's context)",
    )
    p.add_argument(
        "--device", help="--hf only: where the model runs (default: cuda if there is one)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace a finished reduction at --out")
    args = p.parse_args(argv)
    if args.checkpoint and (args.block_size or args.device):
        p.error("--block-size and --device apply to --hf checkpoints only")
    cpu.configure(args.threads)
    with one_line_errors(PROG):
        out = run(args)
    print(f"wrote {out}")


def run(args) -> Path:
    cfg = ReduceConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ReduceConfig)})
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    request = (args.method, args.target_n_expert)
    if args.hf:
        check_out(args.out, args.hf, args.force)
        vocab_size = hf.source_config(args.hf).vocab_size
        docs = load_task_docs(args.task_data, hf.load_tokenizer(args.hf), vocab_size)
        return reduce_hf_checkpoint(
            args.hf,
            args.out,
            *request,
            docs,
            args.task_data,
            cfg,
            args.block_size,
            args.device,
            args.force,
        )
    check_out(args.out, find_checkpoint(args.checkpoint), args.force)
    vocab_size = read_info(args.checkpoint)["model"]["vocab_size"]
    docs = load_task_docs(args.task_data, load_tokenizer(args.checkpoint), vocab_size)
    return reduce_checkpoint(
        args.checkpoint, args.out, *request, docs, args.task_data, cfg, args.force
    )


if __name__ == "__main__":
    main()
