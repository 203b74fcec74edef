"""Reduce a trained SMoE checkpoint's experts for one task; writes a checkpoint and reduction.json.

    python -m uncurl.reduce --checkpoint runs/small/e64 --method uncurl --n-expert 8 \\
        --task-data data/prepared/bundled:drama --out runs/small/e64-uncurl-d8-drama

What the output folder holds: `uncurl.reduce.save`.
"""

import argparse
from pathlib import Path

from uncurl import cpu
from uncurl.model.checkpoint import load_tokenizer, read_info
from uncurl.reduce import METHODS, ROUTERS, SOLVERS, load_task_docs
from uncurl.reduce.save import check_out, reduce_checkpoint


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
    cpu.configure(args.threads)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {out}")


def run(args) -> Path:
    check_out(args.out, args.checkpoint)
    vocab_size = read_info(args.checkpoint)["model"]["vocab_size"]
    docs = load_task_docs(args.task_data, load_tokenizer(args.checkpoint), vocab_size)
    return reduce_checkpoint(args.checkpoint, args.out, args.method, args.n_expert, docs,
                             args.task_data, args.router, args.seed, args.align,
                             args.warmup_steps, args.warmup_lr, args.max_tokens, args.batch_size)


if __name__ == "__main__":
    main()
