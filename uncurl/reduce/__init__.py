"""Task-specific expert reduction: statistics -> plan -> aligned merge, each step usable alone.

    stats = collect_stats(model, batches, needs=NEEDS.get(method, ()), subset_size=D)
    plan = make_plan(stats, method, D, cfg)         # JSON-serializable (cfg: a ReduceConfig)
    plan = align_plan(model, plan)                   # weight matching of merged members
    small = apply_plan(model, plan, router="reinit")
    router_warmup(small, batches, steps=50)

`reduce_model` runs them in order; `python -m uncurl.reduce` does it for a checkpoint on disk.
Each step takes our GPT or a transformers MoE causal LM (`hf.FAMILIES`): it sees the model
through one interface, `adapter.MoEAdapter`.
"""

import numpy as np

from uncurl.config import ReduceConfig
from uncurl.reduce.adapter import MoEAdapter, adapt
from uncurl.reduce.align import SOLVERS, align_plan, match_neurons, neuron_scores
from uncurl.reduce.apply import KEPT, ROUTERS, apply_plan, merge_group
from uncurl.reduce.hf import TIES_REFUSED
from uncurl.reduce.plan import (
    NEEDS,
    PLANNERS,
    PRUNING,
    TIED,
    check_request,
    default_router,
    make_plan,
)
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
    "MoEAdapter",
    "adapt",
    "align_plan",
    "apply_plan",
    "check_model",
    "check_reduction",
    "check_request",
    "check_router",
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


def check_model(model) -> None:
    """Refuse a model no reduction applies to (a dense one, an unsupported architecture)."""
    adapt(model)


def check_reduction(
    adapter: MoEAdapter, method: str, target_n_expert: int, router: str | None = None
) -> None:
    """Refuse a method, target or router handling (None: the method's default) the model cannot
    be reduced with; the error names the fix."""
    counts = [layer.n_expert for layer in adapter.layers]
    check_request(method, target_n_expert, counts, adapter.top_k, adapter.cap_top_k)
    adapter.check_target(method, target_n_expert)
    check_router(method, router or default_router(method), adapter.ties)


def check_router(method: str, router: str, ties: bool = True) -> None:
    """Refuse a router handling the method's plan cannot have, or tied experts on a model that
    cannot hold them (`ties` False)."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router handling {router!r}; choose one of {ROUTERS}")
    if method in TIED and router != "tie":
        raise ValueError(
            f"{method} keeps the router whole with tied experts (router 'tie'); for its "
            f"clusters with router {router!r} choose method hcsmoe"
        )
    if router == "tie" and method in PRUNING:
        raise ValueError(
            f"router 'tie' points every original expert at its group's merged expert, but "
            f"{method} prunes experts; choose keep, merge or reinit"
        )
    if router == "tie" and not ties:
        raise ValueError(TIES_REFUSED)


def reduce_model(
    model,
    batches,
    method: str,
    target_n_expert: int,
    cfg: ReduceConfig = ReduceConfig(),
    stats: list[LayerStats] | None = None,
):
    """Reduce every MoE layer of `model` (our GPT or a transformers MoE causal LM) to
    `target_n_expert` experts on task batches.

    Returns the reduced model and a JSON-serializable record: the plan (with permutations),
    per-layer selection counts and similarity matrices, router warm-up losses and each step's
    time. `stats`, if given, are `collect_stats` of this model on these batches for the method
    (read once for several methods, `uncurl.reduce.save`).
    """
    router = cfg.router or default_router(method)
    adapter = adapt(model)
    check_reduction(adapter, method, target_n_expert, router)
    if cfg.solver not in SOLVERS:
        raise ValueError(f"unknown solver {cfg.solver!r}; choose one of {SOLVERS}")
    times = {}
    with stopwatch(times, "stats"):
        if stats is None:
            stats = collect_stats(adapter, batches, NEEDS.get(method, ()), target_n_expert)
    with stopwatch(times, "plan"):
        plan = make_plan(stats, method, target_n_expert, cfg)
    with stopwatch(times, "align"):
        plan = align_plan(adapter, plan, cfg.solver)
    with stopwatch(times, "apply"):
        reduced = apply_plan(adapter, plan, router, cfg.seed)
    steps = cfg.router_warmup_steps if router not in KEPT else 0  # kept rows already route
    with stopwatch(times, "router_warmup"):
        losses = router_warmup(reduced, batches, steps, cfg.router_warmup_lr)
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
            "steps": steps,
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
