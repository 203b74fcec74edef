"""Task-specific expert reduction: statistics -> plan -> aligned merge, each step usable alone.

    stats = collect_stats(model, batches, needs=NEEDS.get(method, ()), subset_size=D)
    plan = make_plan(stats, method, D, seed)        # JSON-serializable
    plan = align_plan(model, plan)                   # weight matching of merged members
    small = apply_plan(model, plan, router="reinit")
    router_warmup(small, batches, steps=50)

`reduce_model` runs them in order; `python -m uncurl.reduce` does it for a checkpoint on disk.
"""

import numpy as np

from uncurl.config import ReduceConfig
from uncurl.model import GPT
from uncurl.reduce.align import SOLVERS, align_plan, match_neurons, neuron_scores
from uncurl.reduce.apply import ROUTERS, apply_plan, merge_group
from uncurl.reduce.plan import NEEDS, PLANNERS, check_request, default_router, make_plan
from uncurl.reduce.stats import LayerStats, collect_stats
from uncurl.reduce.taskdata import load_task_docs
from uncurl.reduce.warmup import router_warmup
from uncurl.timing import stopwatch

METHODS = tuple(PLANNERS)

__all__ = [
    "METHODS",
    "NEEDS",
    "ROUTERS",
    "SOLVERS",
    "LayerStats",
    "align_plan",
    "apply_plan",
    "check_model",
    "check_request",
    "collect_stats",
    "default_router",
    "load_task_docs",
    "make_plan",
    "match_neurons",
    "merge_group",
    "neuron_scores",
    "reduce_model",
    "router_warmup",
]


def check_model(model: GPT) -> None:
    if not model.cfg.is_moe:
        raise ValueError(
            "the checkpoint is a dense model (n_expert=1); expert reduction needs an "
            "SMoE checkpoint (trained with --n-expert > 1, e.g. runs/small/e16)"
        )


def reduce_model(
    model: GPT, batches, method: str, target_n_expert: int, cfg: ReduceConfig = ReduceConfig()
) -> tuple[GPT, dict]:
    """Reduce every MoE layer of `model` to `target_n_expert` experts on task batches.

    Returns the reduced model and a JSON-serializable record: the plan (with permutations),
    per-layer selection counts and similarity matrices, router warm-up losses and each step's
    time.
    """
    router = cfg.router or default_router(method)
    check_model(model)
    check_request(method, target_n_expert, [m.n_expert for m in model.moe_blocks], model.cfg.top_k)
    if router not in ROUTERS or cfg.solver not in SOLVERS:
        raise ValueError(f"router must be one of {ROUTERS} and solver one of {SOLVERS}")
    times = {}
    with stopwatch(times, "stats"):
        stats = collect_stats(model, batches, NEEDS.get(method, ()), target_n_expert)
    with stopwatch(times, "plan"):
        plan = make_plan(stats, method, target_n_expert, cfg.seed)
    with stopwatch(times, "align"):
        plan = align_plan(model, plan, cfg.solver)
    with stopwatch(times, "apply"):
        reduced = apply_plan(model, plan, router, cfg.seed)
    with stopwatch(times, "router_warmup"):
        losses = router_warmup(reduced, batches, cfg.router_warmup_steps, cfg.router_warmup_lr)
    record = {
        "method": method,
        "target_n_expert": target_n_expert,
        "router": router,
        "seed": cfg.seed,
        "solver": cfg.solver,
        "n_tokens": stats[0].n_tokens,
        "plan": plan,
        "layers": [_layer_record(st) for st in stats],
        "router_warmup": {
            "steps": cfg.router_warmup_steps,
            "lr": cfg.router_warmup_lr,
            "losses": losses,
        },
        "timings_s": times,
    }
    return reduced, record


def _layer_record(st: LayerStats) -> dict:
    return {
        "layer": st.layer,
        "counts": st.counts.tolist(),
        "top1": st.top1.tolist(),
        "frequency": st.frequency().tolist(),
        "similarity": np.round(st.similarity(), 6).tolist(),
    }
