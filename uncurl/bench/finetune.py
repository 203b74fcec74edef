"""The fine-tuning grid's cost: a step against its FLOP floor, and whole runs per core-minute.

1. Floor: the FLOPs of one member's fine-tuning step, counted from the shapes of the task's
   training batches (forward + backward = 3 x forward; attention's two causal products; the
   experts at their top-k share; the LM head at the positions the loss reads), at the
   single-thread sgemm rate of a torch.mm of the population's size (tokens of all members x
   n_embd by n_embd x d_ff), measured in every round of the step timing (the median).
2. Steps: one member-step's CPU time on each path, each in its own worker process, timed in turns
   (round-robin): a model alone and a population of M members on this revision, and with
   `--baseline REV` a model alone on that revision of the repository (today's path before the
   populations, say). Models are randomly initialised at the profile's shapes (a step's time
   depends on shapes, not on training). Then where the population's step goes: the self CPU
   time of its torch operators (torch.profiler, over the same number of member-steps as a turn)
   in kinds of work (`KINDS`), the products the floor counts and the rest.
3. End to end: whole runs as the grid makes them (task loading, router warm-up, fine-tuning with
   held-out evaluations and early stopping, scoring, the result written): the members of one
   job, the from-scratch model of `--n-expert` experts and a random `--source-n-expert` model
   reduced to it by UNCURL and by greedy pruning, with `--seeds` seeds each, run as one
   population; and `--solo-runs` of them alone (`python -m uncurl.finetune`), on this revision
   and on the baseline. A run's cost is its CPU time (a population member's share of the
   population's); runs per core-minute = 60 / CPU seconds per run, one thread each.

Times are CPU time (`time.process_time`) throughout: on a machine others share, wall time also
counts the waits for a core, which differ from one path's turn to the next.
"""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from uncurl import cpu, data, layout, protocol, tasks
from uncurl.config import get_profile
from uncurl.model import GPT, save_checkpoint
from uncurl.provenance import environment
from uncurl.reduce.save import reduce_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("finetune_steps.py")


def add_arguments(p):
    p.add_argument("--profile", default="small", help="shapes, recipe and data of this profile")
    p.add_argument("--task", default="bbc_news", help="a task of the registry")
    p.add_argument("--n-expert", type=int, default=8, help="D: the members' experts per layer")
    p.add_argument("--source-n-expert", type=int, default=32, help="Z of the reduced members")
    p.add_argument("--members", type=int, default=9, help="M, for the step timing")
    p.add_argument("--rounds", type=int, default=5, help="turns of step timing per path")
    p.add_argument("--steps", type=int, default=10, help="member-steps per turn")
    p.add_argument("--baseline", help="git revision of today's path (default: not measured)")
    p.add_argument("--seeds", type=int, default=3, help="end to end: seeds per model")
    p.add_argument("--solo-runs", type=int, default=3, help="end to end: runs alone per path")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--data-dir", type=Path, help="prepared corpus (default: the profile's)")
    p.add_argument("--no-end-to-end", action="store_true", help="time steps only")
    p.add_argument("--json", type=Path, help="also write the results here")


def run(args) -> dict:
    cpu.configure(1)
    profile = corpus(get_profile(args.profile), args.data_dir)
    with tempfile.TemporaryDirectory(prefix="uncurl-bench-") as tmp:
        tree = _export(args.baseline, Path(tmp)) if args.baseline else None
        flops = floor(profile, args)
        steps, rates, ops = time_steps(args, tree, flops["sgemm_shape"])
        flops["sgemm_flops_per_s"] = rate = median(rates)
        flops["floor_ms"] = 1e3 * flops["step_flops"] / rate
        results = {
            "profile": args.profile,
            "task": args.task,
            "n_expert": args.n_expert,
            "members": args.members,
            "baseline": args.baseline,
            "floor": flops,
            "steps": steps,
            "breakdown": breakdown(ops, member_steps=args.steps * args.members),
            "environment": environment(),
        }
        if not args.no_end_to_end:
            results["end_to_end"] = end_to_end(profile, args, tree, Path(tmp))
    print_tables(results)
    return results


# ------------------------------------------------------------------------------- the floor


def step_flops(cfg, batch) -> float:
    """FLOPs of one training step of a model of config `cfg` on `batch`: 3 x the forward's."""
    b, t = batch.idx.shape
    c, h = cfg.n_embd, cfg.hidden
    per_token = 0
    for layer in range(cfg.n_layer):
        e = cfg.experts_at(layer)
        per_token += 2 * 4 * c * c  # query, key, value and output projections
        per_token += 2 * 2 * c * h * (cfg.top_k if e else 1) + 2 * c * e  # FFN or experts, router
    attention = cfg.n_layer * b * 2 * 2 * c * t * (t + 1) / 2  # q k^T and p v, causal
    head = 2 * c * cfg.vocab_size * int((batch.targets >= 0).sum())
    return 3 * (b * t * per_token + attention + head)


def floor(profile, args) -> dict:
    """The mean step's FLOPs over the members' first batches and the sgemm rate."""
    cfg = profile.finetune_config(args.task)
    model_cfg = profile.model_config(n_expert=args.n_expert, vocab_size=_vocab(profile))
    task_data = _load(profile, args.task, cfg, model_cfg.block_size)
    batches = [
        b
        for seed in range(args.members)
        for b in itertools.islice(
            tasks.training_batches(task_data, cfg, seed, model_cfg.block_size), 20
        )
    ]
    tokens = float(np.mean([b.idx.numel() for b in batches]))
    return {
        "step_flops": float(np.mean([step_flops(model_cfg, b) for b in batches])),
        "tokens_per_step": tokens,
        "sgemm_shape": (int(tokens * args.members), model_cfg.n_embd, model_cfg.hidden),
    }


def sgemm_rate(shape: tuple[int, int, int], repeats: int = 10) -> float:
    """FLOP/s of torch.mm at `shape` (rows, inner, columns), the median of a few, in CPU time."""
    a, w = torch.randn(shape[0], shape[1]), torch.randn(shape[1], shape[2])
    torch.mm(a, w)
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        torch.mm(a, w)
        seconds.append(time.process_time() - start)
    return 2 * shape[0] * shape[1] * shape[2] / median(seconds)


# ------------------------------------------------------------------------------- the steps


class _Worker:
    """A worker process (finetune_steps.py) on a tree's `uncurl`, answering for N steps."""

    def __init__(self, tree: Path, args, members: int):
        code = (
            "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
            f"runpy.run_path({str(WORKER)!r}, run_name='__main__')"
        )
        command = [sys.executable, "-c", code, str(tree), args.profile, args.task]
        data_dir = str(Path(args.data_dir).absolute()) if args.data_dir else ""
        self.members = members
        self.proc = subprocess.Popen(
            [*command, str(args.n_expert), str(members), data_dir],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": ""},
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the step worker on {tree} did not start")

    def member_steps(self, steps: int) -> tuple[float, float]:
        """Milliseconds per member-step over `steps` member-steps (steps / M of the population),
        and tokens per CPU second (every member's: what a core puts through)."""
        n = max(1, steps // self.members)
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        seconds, tokens = (float(v) for v in self.proc.stdout.readline().split())
        return 1e3 * seconds / (n * self.members), tokens / seconds

    def profile(self, steps: int) -> dict[str, float]:
        """Each operator's self CPU microseconds over `steps` member-steps."""
        self.proc.stdin.write(f"profile {max(1, steps // self.members)}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()  # the worker's loop ends
        self.proc.wait()
        self.proc.stdout.close()


def time_steps(args, tree: Path | None, shape) -> tuple[dict, list[float], dict]:
    """Each path's median ms per member-step over `rounds` turns taken in order, the sgemm
    rate measured in every round (the floor's rate under the same load), and the population's
    operators' self CPU microseconds over one turn's member-steps."""
    paths = {"solo": (ROOT, 1), f"population of {args.members}": (ROOT, args.members)}
    if tree:
        paths = {"today's (baseline)": (tree, 1), **paths}
    workers = {name: _Worker(root, args, m) for name, (root, m) in paths.items()}
    times, rates = {name: [] for name in workers}, []
    try:
        for _ in range(args.rounds):
            rates.append(sgemm_rate(shape))
            for name, worker in workers.items():
                times[name].append(worker.member_steps(args.steps * worker.members))
        population = workers[f"population of {args.members}"]
        ops = population.profile(args.steps * population.members)
    finally:
        for worker in workers.values():
            worker.close()
    steps = {
        name: {
            "median_ms": median(ms for ms, _ in t),
            "tokens_per_s": median(rate for _, rate in t),
            "turns_ms": [ms for ms, _ in t],
        }
        for name, t in times.items()
    }
    return steps, rates, ops


# the kinds of work in a step, by torch operator (self time): the first three are what the floor
# counts; everything else is outside it
KINDS = {
    "expert and FFN products with GELU (kernel)": {"GroupedMLP", "GroupedMLPBackward"},
    "attention (kernel)": {"CausalAttention", "CausalAttentionBackward"},
    "projections and head (BLAS)": {"aten::mm", "aten::addmm", "aten::bmm"},
    "GELU (torch, where the kernel does not run)": {"aten::gelu", "aten::gelu_backward"},
    "AdamW": {"aten::_fused_adamw_"},
    "gradient norms and clipping": {"aten::linalg_vector_norm", "aten::mul_"},
    "layer norms": {"aten::native_layer_norm", "aten::native_layer_norm_backward"},
    "softmax and losses": {
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    },
    "copies, gathers and concatenations": {
        "aten::cat",
        "aten::copy_",
        "aten::index_select",
        "aten::index_add_",
        "aten::index",
        "aten::scatter_add_",
        "aten::embedding_dense_backward",
    },
}
IN_FLOOR = list(KINDS)[:3]


def breakdown(ops: dict[str, float], member_steps: int) -> dict:
    """Each kind's share of the operators' self CPU time, and the rest's (elementwise adds,
    allocation, views, the bookkeeping of autograd's nodes); which kinds the floor counts (kinds
    that did not run are left out); and the operators' total per member-step, which counts the
    profiler's own cost and, next to the timed step, shows how much it distorts."""
    total = sum(ops.values())
    shares = {kind: sum(ops.get(op, 0.0) for op in names) / total for kind, names in KINDS.items()}
    shares = {kind: share for kind, share in shares.items() if share > 0}
    return {
        "shares": shares | {"everything else": 1 - sum(shares.values())},
        "in_floor": IN_FLOOR,
        "profiled_ms": total / 1e3 / member_steps,
    }


# ------------------------------------------------------------------------------ end to end


def end_to_end(profile, args, tree: Path | None, tmp: Path) -> dict:
    """CPU seconds per run (what a run costs a core: on a shared machine its wall time also
    counts the waits for one) and runs per core-minute of one job's members, alone and as one;
    the wall seconds each result records beside."""
    cfg = profile.finetune_config(args.task, **_overrides(args))
    starts = _starting_points(profile, args, tmp / "models")
    members = [
        (start, seed, tmp / "population" / f"{i}-s{seed}")
        for i, start in enumerate(starts)
        for seed in range(args.seeds)
    ]
    solo = members[:: args.seeds][: args.solo_runs]  # each model once, seed 0
    paths = {"solo": ROOT} | ({"today's (baseline)": tree} if tree else {})
    runs = {name: [] for name in paths}  # (CPU seconds, wall seconds) of each run
    for i, (start, seed, _) in enumerate(solo):
        for name, root in paths.items():
            runs[name].append(_solo_run(root, start, seed, tmp / name / str(i), args))
    started = time.process_time()
    population = protocol.run_members(
        members, args.task, cfg, profile.data_dir, profile.task_source
    )
    cpu_s = (time.process_time() - started) / len(members)
    runs[f"population of {len(members)}"] = [(cpu_s, r["wall_s"]) for r in population]
    return {
        name: {
            "runs": len(r),
            "cpu_s_per_run": float(np.mean([c for c, _ in r])),
            "wall_s_per_run": float(np.mean([w for _, w in r])),
            "runs_per_core_min": 60 / float(np.mean([c for c, _ in r])),
        }
        for name, r in runs.items()
    } | {"steps": [r["training"]["steps"] for r in population]}


def _starting_points(profile, args, folder: Path) -> list[Path]:
    """A random D-expert checkpoint and a random Z-expert one reduced to D by UNCURL and by
    greedy pruning on the task's training split (reductions are made once, not timed)."""
    tok = data.load_tokenizer(profile.data_dir)
    starts = {}
    for n in (args.n_expert, args.source_n_expert):
        torch.manual_seed(0)
        model = GPT(profile.model_config(n_expert=n, vocab_size=_vocab(profile)))
        starts[n] = save_checkpoint(folder / layout.model_label(n), model, tok)
    cfg = profile.finetune_config(args.task)
    docs = tasks.training_documents(
        tasks.get_task(args.task),
        tok,
        profile.model_config().block_size,
        profile.data_dir,
        profile.task_source,
        cfg.val_frac,
        cfg.heldout_frac,
    )
    reduced = [
        reduce_checkpoint(
            starts[args.source_n_expert],
            folder / layout.model_label(args.n_expert, method, args.source_n_expert),
            method,
            args.n_expert,
            docs,
            f"{args.task} train split",
        )
        for method in ("uncurl", "greedy")
    ]
    return [starts[args.n_expert], *reduced]


def _solo_run(root: Path, checkpoint, seed: int, out: Path, args) -> tuple[float, float]:
    """`python -m uncurl.finetune` on the tree at `root`: its CPU seconds (from the run's start,
    imports done) and the wall seconds its result records."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv.pop(1)); from uncurl.finetune import main;"
        " t = time.process_time(); main(); print('cpu', time.process_time() - t)"
    )
    command = [sys.executable, "-c", code, str(root), "--checkpoint", str(checkpoint)]
    command += ["--task", args.task, "--seed", str(seed), "--out", str(out)]
    command += ["--profile", args.profile, *(["--set", *args.set] if args.set else [])]
    command += ["--data-dir", str(Path(args.data_dir).absolute())] if args.data_dir else []
    done = subprocess.run(
        command,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    cpu_s = float(done.stdout.split()[-1])
    return cpu_s, layout.read_json(out / layout.RESULT)["wall_s"]


# ---------------------------------------------------------------------------------- helpers


def _export(revision: str, tmp: Path) -> Path:
    """The `uncurl` package of a git revision, unpacked into tmp/baseline."""
    tree = tmp / "baseline"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", revision, "uncurl"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def corpus(profile, data_dir: Path | None):
    """The profile, reading its corpus from `data_dir` if one is given."""
    if data_dir is None:
        return profile
    return dataclasses.replace(
        profile, data={**profile.data, "name": str(Path(data_dir).absolute())}
    )


def _vocab(profile) -> int:
    return data.load_meta(profile.data_dir)["vocab_size"]


def _load(profile, task: str, cfg, block_size: int):
    tok = data.load_tokenizer(profile.data_dir)
    return tasks.load_task(task, tok, block_size, cfg, profile.data_dir, profile.task_source)


def _overrides(args) -> dict:
    from uncurl.config import parse_overrides

    return parse_overrides(args.set)


def print_tables(r: dict) -> None:
    f = r["floor"]
    rows, cols, n = f["sgemm_shape"]
    print(
        f"fine-tuning step, profile {r['profile']}, task {r['task']}, {r['n_expert']} experts, "
        f"{f['tokens_per_step']:.0f} tokens per member-step, one thread; "
        f"load average {r['environment']['load_avg_1m']:.1f}"
    )
    print(
        f"floor: {f['step_flops'] / 1e9:.2f} GFLOP per member-step at "
        f"{f['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s (torch.mm {rows}x{cols} @ {cols}x{n}) = "
        f"{f['floor_ms']:.1f} ms"
    )
    print(f"  {'path':26s} {'ms per member-step':>19s} {'tokens per CPU s':>17s} {'x floor':>8s}")
    for name, t in r["steps"].items():
        print(
            f"  {name:26s} {t['median_ms']:19.1f} {t['tokens_per_s']:17.0f} "
            f"{t['median_ms'] / f['floor_ms']:8.2f}"
        )
    step_ms = r["steps"][f"population of {r['members']}"]["median_ms"]
    print(
        f"where the population's member-step goes (shares of its operators' self CPU time, "
        f"{r['breakdown']['profiled_ms']:.1f} ms per member-step under the profiler; ms at the "
        f"{step_ms:.1f} ms measured):"
    )
    print(f"  {'kind':42s} {'in floor':>8s} {'share':>6s} {'ms':>6s}")
    for kind, share in r["breakdown"]["shares"].items():
        counted = "yes" if kind in r["breakdown"]["in_floor"] else "no"
        print(f"  {kind:42s} {counted:>8s} {share:6.1%} {share * step_ms:6.1f}")
    if "end_to_end" not in r:
        return
    e = dict(r["end_to_end"])
    steps = e.pop("steps")
    print(
        "end to end (loading, router warm-up, fine-tuning, held-out evaluations, early "
        f"stopping, scoring; the population's members stopped after {min(steps)}-{max(steps)} "
        "steps):"
    )
    ref = e.get("today's (baseline)", e["solo"])["runs_per_core_min"]
    print(
        f"  {'path':26s} {'runs':>5s} {'CPU s per run':>14s} {'(wall)':>7s} "
        f"{'runs per core-minute':>21s} {'x':>6s}"
    )
    for name, t in e.items():
        print(
            f"  {name:26s} {t['runs']:5d} {t['cpu_s_per_run']:14.1f} {t['wall_s_per_run']:7.1f} "
            f"{t['runs_per_core_min']:21.2f} {t['runs_per_core_min'] / ref:6.2f}"
        )
