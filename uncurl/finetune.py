"""Fine-tune a checkpoint on one task, then score it on the task's validation split.

    python -m uncurl.finetune --checkpoint runs/small/e8 --task rotten_tomatoes --seed 0 \\
        --out runs/small/finetune/rotten_tomatoes/e8/s0 [--profile small] [--set lr=3e-4]

Choice tasks train on prompt + right answer with the loss on the answer tokens; lm tasks train as
plain language modelling. A reduced checkpoint (one written by `uncurl.reduce`) first gets the
router warm-up: router-only steps on the task (the book's Method chapter, UNCURL's last step).
Early stopping watches the loss on a held-out part of the training split, never the validation
split. The run writes `result.json` (parameters, metrics, per-example validation scores with their
bootstrap units, labelled tasks' per-example held-out accuracy, timings, environment) atomically;
a finished run with the same parameters is not redone, and a second run into a folder that one is
writing is refused.
"""

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from uncurl import cpu, evaluate, layout, population, tasks
from uncurl.cli import one_line_errors
from uncurl.config import FinetuneConfig, get_profile, parse_overrides
from uncurl.device import resolve_device
from uncurl.layout import write_json
from uncurl.model.checkpoint import digest, load_model, load_tokenizer, save_checkpoint
from uncurl.provenance import environment
from uncurl.reduce import router_warmup
from uncurl.tasks import TaskData, load_task, training_batches


def heldout_loss(model, data: TaskData) -> float:
    return float(population.heldout_losses(model, data)[0])


def task_loss(model, b, kind: str):
    """lm: mean loss per token. choice: the answer's negative log-likelihood per example (its
    tokens summed), so that a many-token answer does not dilute the token that decides it."""
    return population.task_losses(model, [b], kind)[0]


def finetune(model, data: TaskData, cfg: FinetuneConfig, seed: int, progress: bool = False) -> dict:
    """Train `model` in place, ending with the weights of its best held-out evaluation after
    training began: a population of one (`uncurl.population.train`)."""
    return population.train([model], data, cfg, [seed], progress)[1][0]


def run(
    checkpoint,
    task: str,
    seed: int,
    out,
    cfg: FinetuneConfig,
    data_dir=None,
    task_source: str = "",
    save_model: bool = False,
    progress: bool = False,
) -> dict:
    """Fine-tune and score one (checkpoint, task, seed); write out/result.json; return it.

    A finished run with the same parameters is read back, not redone. The checkpoint and the task
    are loaded before anything is written, so bad input leaves nothing behind; the run holds
    `out`'s lock while it trains (a second run into it is refused).
    """
    out = Path(out)
    params = run_params(checkpoint, task, seed, cfg, data_dir, task_source)
    if (done := finished(out, params)) is not None:
        return done
    started = time.time()
    cpu.configure(cfg.threads)
    model = load_model(checkpoint).to(resolve_device(cfg.device))
    tok = load_tokenizer(checkpoint)
    data = load_task(task, tok, model.cfg.block_size, cfg, data_dir, task_source)
    with layout.locked(out):
        if (done := finished(out, params)) is not None:  # finished while this one loaded
            return done
        layout.remove_temporaries(out)
        model_info = evaluate.describe(checkpoint)
        warmup = warm_up_router(model, model_info, data, cfg, seed)
        trained = finetune(model, data, cfg, seed, progress)
        scores = evaluate.score(model, data)
        result = record(checkpoint, data, seed, scores, warmup, trained, params, started)
        if save_model:
            save_checkpoint(out / "model", model, tok, {"finetune": params})
        write_json(out / evaluate.RESULT, result)
    return result


def run_params(checkpoint, task: str, seed: int, cfg: FinetuneConfig, data_dir, task_source):
    """What a run's result depends on: a result with other parameters is redone."""
    return {
        "checkpoint": str(checkpoint),
        "digest": digest(checkpoint),
        "task": task,
        "seed": seed,
        "finetune": asdict(cfg),
        "task_source": task_source,
        "data_dir": str(data_dir) if data_dir else None,
    }


def finished(out, params: dict) -> dict | None:
    """The result in `out` if it is one of a run with these parameters."""
    if not (Path(out) / evaluate.RESULT).exists():
        return None
    done = layout.read_json(Path(out) / evaluate.RESULT)
    return done if done["params"] == params else None


def record(checkpoint, data: TaskData, seed, scores, warmup, trained, params, started) -> dict:
    """A run's result.json: the scores (`evaluate.Scores`) of a model, fine-tuned from
    `checkpoint` since `started`."""
    metrics, per_example, heldout_per_example, units = scores
    return {
        "model": evaluate.describe(checkpoint),
        "task": data.task.name,
        "kind": data.task.kind,
        "seed": seed,
        "pretrain_seed": evaluate.pretrain_seed(checkpoint),
        "metric": data.task.metric,
        "metrics": metrics,
        "per_example": per_example,
        "units": units,
        "heldout_per_example": heldout_per_example,
        "router_warmup": warmup,
        "training": trained,
        "params": params,
        "sizes": {
            "train": len(data.train),
            "heldout": _count(data.heldout),
            "val": _count(data.val),
            "batch": data.batch_size,
        },
        "wall_s": time.time() - started,
        "environment": environment(),
    }


def warm_up_router(
    model, model_info: dict, data: TaskData, cfg: FinetuneConfig, seed: int
) -> list[float]:
    """Reduced models only: router-only steps on the task's training batches."""
    if model_info["method"] == layout.SCRATCH or cfg.router_warmup_steps == 0:
        return []
    batches = training_batches(data, cfg, seed, model.cfg.block_size)
    return router_warmup(
        model,
        [next(batches) for _ in range(cfg.router_warmup_steps)],
        cfg.router_warmup_steps,
        cfg.router_warmup_lr,
        cfg.grad_clip,
    )


def _count(items: list) -> int:
    """Examples, or windows of a list of batches."""
    return sum(len(b.idx) for b in items) if items and hasattr(items[0], "idx") else len(items)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m uncurl.finetune", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run folder")
    p.add_argument("--task", required=True, help=f"one of {', '.join(sorted(tasks.TASKS))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder for result.json")
    p.add_argument("--profile", default="small", help="fine-tuning recipe and corpus of a profile")
    p.add_argument(
        "--data-dir", type=Path, help="prepared corpus for lm tasks (default: the profile's)"
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override fine-tuning parameters (recorded with the result)",
    )
    p.add_argument("--save-model", action="store_true", help="also keep the fine-tuned weights")
    args = p.parse_args(argv)
    with one_line_errors(p.prog):
        profile = get_profile(args.profile)
        cfg = profile.finetune_config(args.task, **parse_overrides(args.set))
        result = run(
            args.checkpoint,
            args.task,
            args.seed,
            args.out,
            cfg,
            args.data_dir or profile.data_dir,
            profile.task_source,
            args.save_model,
            progress=True,
        )
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    print(
        f"{result['model']['model']} on {args.task} (seed {args.seed}): {metrics}; "
        f"best step {result['training']['best_step']} of {result['training']['steps']}, "
        f"{result['wall_s']:.1f} s -> {args.out / evaluate.RESULT}"
    )


if __name__ == "__main__":
    main()
