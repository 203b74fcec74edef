"""Time of each expert-reduction step, and how weight matching's cost grows with the FFN width.

1. Steps: every method reduces a 64-expert model of the profile to D experts on the task data,
   timing statistics, planning, alignment and applying (one run each), and one router warm-up
   step. Without --checkpoint the model is randomly initialised at the profile's shapes: the
   times depend on shapes and token counts, not on training (only the number of merged members,
   hence alignments, depends on the clusters found).
2. Alignment vs FFN width H (d_model = 2H/7, Mixtral's ratio 4096/14336): two unrelated random
   experts, as independently initialised experts are, the hardest case for the assignment.
   Exact Hungarian (scipy) against the greedy solver; objective gap = share of the exact
   matching's gain over the identity permutation that the greedy matching loses. A width not
   measured (Mixtral's 14336 by default) is extrapolated by a power law fitted to the measured
   ones, and labelled so; measuring it takes minutes on one core:
       python -m uncurl.bench reduce --methods --widths 14336 --repeats 1
"""

from pathlib import Path

import numpy as np
import torch

from uncurl import cpu
from uncurl.config import get_profile
from uncurl.data import load_meta
from uncurl.model import GPT
from uncurl.model.checkpoint import load_model
from uncurl.provenance import environment
from uncurl.reduce import (
    METHODS,
    load_task_docs,
    match_neurons,
    neuron_scores,
    reduce_model,
    router_warmup,
)
from uncurl.reduce.align import matching_objective
from uncurl.reduce.stats import NAEE_MAX_EXPERTS
from uncurl.tasks import make_batches
from uncurl.timing import stopwatch, time_it

MIXTRAL = {"d_ff": 14336, "n_embd": 4096, "n_layer": 32, "n_expert": 8}


def add_arguments(p):
    p.add_argument("--profile", default="small", help="shapes and data of this profile")
    p.add_argument("--checkpoint", type=Path, help="SMoE checkpoint (default: random init)")
    p.add_argument(
        "--source-n-expert",
        type=int,
        default=64,
        help="Z, experts per MoE layer of the random model",
    )
    p.add_argument("--target-n-expert", type=int, default=8, help="D, experts per layer after")
    p.add_argument("--task-data", help="default: the profile's prepared data, domain drama")
    p.add_argument("--max-tokens", type=int, default=16384, help="task tokens for statistics")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help="none: skip the steps")
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--extrapolate-to", type=int, default=MIXTRAL["d_ff"])
    p.add_argument("--candidates", type=int, default=16, help="greedy solver's list per neuron")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per solver (median)")
    p.add_argument("--device", default="cpu", help="where the neuron scores are computed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")


def run(args) -> dict:
    cpu.configure(args.threads)
    return {
        "steps": time_steps(args) if args.methods else None,
        "alignment": time_alignment(args),
        "environment": environment(),
    }


def time_steps(args) -> dict:
    profile = get_profile(args.profile)
    spec = args.task_data or f"{profile.data_dir}:drama"
    model = _model(args, profile, spec)
    docs = load_task_docs(spec, vocab_size=model.cfg.vocab_size)
    batch_size = profile.train_config().batch_size
    batches = make_batches(docs, model.cfg.block_size, batch_size, args.max_tokens)
    z = model.moe_blocks[0].n_expert
    print(
        f"reduction steps, {len(model.moe_blocks)} MoE layers of {z} -> {args.target_n_expert} "
        f"experts, d_model {model.cfg.n_embd}, d_ff {model.cfg.hidden}, top-{model.cfg.top_k}, "
        f"{sum(int(b.mask.sum()) for b in batches):,} tokens of {spec}, "
        f"{args.threads} thread(s)"
    )
    print(
        f"  {'method':11s} {'stats':>8s} {'plan':>8s} {'align':>8s} {'apply':>8s} "
        f"{'total':>8s}  (s)  alignments"
    )
    rows = []
    for method in args.methods:
        if method == "naee" and z > NAEE_MAX_EXPERTS:
            print(
                f"  {method:11s} skipped: enumerates C({z}, {args.target_n_expert}) subsets "
                "per layer"
            )
            continue
        _, record = reduce_model(model, batches, method, args.target_n_expert)
        t = {step: record["timings_s"][step] for step in ("stats", "plan", "align", "apply")}
        n_align = sum(
            len(g["members"]) - 1 for layer in record["plan"]["layers"] for g in layer["groups"]
        )
        rows.append({"method": method, **t, "alignments": n_align})
        print(
            f"  {method:11s} {t['stats']:8.2f} {t['plan']:8.2f} {t['align']:8.2f} "
            f"{t['apply']:8.2f} {sum(t.values()):8.2f}       {n_align}"
        )
    step_ms = _warmup_step_ms(model, batches, args.target_n_expert)
    print(
        f"  router warm-up: {step_ms:.1f} ms per step (batch {batch_size} x "
        f"{model.cfg.block_size}, routers only)"
    )
    return {
        "tokens": sum(int(b.mask.sum()) for b in batches),
        "task_data": spec,
        "source_n_expert": z,
        "target_n_expert": args.target_n_expert,
        "rows": rows,
        "warmup_step_ms": step_ms,
        "checkpoint": str(args.checkpoint or "random init"),
    }


def _model(args, profile, spec) -> GPT:
    if args.checkpoint:
        return load_model(args.checkpoint)
    vocab = load_meta(spec.rpartition(":")[0] or spec)["vocab_size"]
    torch.manual_seed(0)
    return GPT(profile.model_config(n_expert=args.source_n_expert, vocab_size=vocab)).eval()


def _warmup_step_ms(model, batches, d) -> float:
    reduced, _ = reduce_model(model, batches[:1], "greedy", d)
    return time_it(lambda: router_warmup(reduced, batches, 1), repeats=5, warmup=1)["median_ms"]


def time_alignment(args) -> dict:
    print(
        f"weight matching of two unrelated random experts, d_model = 2/7 d_ff, scores on "
        f"{args.device}; greedy solver: {args.candidates} candidates per neuron"
    )
    print(
        f"  {'d_ff':>6s} {'scores':>8s} {'hungarian':>10s} {'greedy':>8s} (s)   "
        f"{'greedy gap: of gain':>19s} {'of objective':>12s}"
    )
    rows = []
    for h in args.widths:
        rows.append(r := _align_row(h, args))
        print(
            f"  {h:6d} {r['scores_s']:8.2f} {r['hungarian_s']:10.2f} {r['greedy_s']:8.2f}"
            f"       {r['gap_of_gain']:18.3%} {r['gap_of_objective']:12.3%}"
        )
    out, target = {"rows": rows}, args.extrapolate_to
    at_target = {r["d_ff"]: r for r in rows}.get(target)
    if at_target is None and len(rows) >= 2:
        out["extrapolated"] = at_target = _extrapolate(rows, target)
        print(
            f"  {target:6d} {at_target['scores_s']:8.0f} {at_target['hungarian_s']:10.0f} "
            f"{at_target['greedy_s']:8.0f}       extrapolated: power law fitted to "
            f"{at_target['fitted_on']}, exponents {at_target['scores_exponent']:.2f} / "
            f"{at_target['hungarian_exponent']:.2f} / {at_target['greedy_exponent']:.2f}"
        )
    if at_target and target == MIXTRAL["d_ff"]:
        n = (MIXTRAL["n_expert"] // 2) * MIXTRAL["n_layer"]
        hours = {k: n * at_target[f"{k}_s"] / 3600 for k in ("scores", "hungarian", "greedy")}
        print(
            f"  Mixtral 8x7B to 4 experts per layer aligns up to {n} members (4 per layer x "
            f"{MIXTRAL['n_layer']}): {hours['hungarian']:.2f} h of Hungarian or "
            f"{hours['greedy']:.2f} h greedy, plus {hours['scores']:.2f} h of scores on "
            f"{args.device}, one pair at a time"
        )
    return out


def _align_row(h: int, args) -> dict:
    d = max(1, round(h * MIXTRAL["n_embd"] / MIXTRAL["d_ff"]))
    g = torch.Generator(device=args.device).manual_seed(h)
    a_fc, a_proj, y_fc, y_proj = (
        torch.randn(shape, generator=g, device=args.device)
        for shape in ((d, h), (h, d), (d, h), (h, d))
    )
    scores, t_scores = _timed(lambda: neuron_scores(a_fc, a_proj, y_fc, y_proj).double().cpu())
    scores = scores.numpy()
    exact, t_exact = _timed(lambda: match_neurons(scores, "hungarian"), args.repeats)
    fast, t_fast = _timed(lambda: match_neurons(scores, "greedy", args.candidates), args.repeats)
    best, got = matching_objective(scores, exact), matching_objective(scores, fast)
    identity = float(np.trace(scores))
    return {
        "d_ff": h,
        "d_model": d,
        "scores_s": t_scores,
        "hungarian_s": t_exact,
        "greedy_s": t_fast,
        "objective_hungarian": best,
        "objective_greedy": got,
        "objective_identity": identity,
        "gap_of_gain": (best - got) / (best - identity),
        "gap_of_objective": (best - got) / best,
    }


def _extrapolate(rows: list[dict], target: int) -> dict:
    """t = c * H^p, least squares in log-log over the measured widths from 1024 (smaller ones
    are dominated by fixed costs), for each step."""
    fit = [r for r in rows if r["d_ff"] >= 1024] if len(rows) > 2 else rows
    out = {"d_ff": target, "fitted_on": [r["d_ff"] for r in fit]}
    widths = np.log([r["d_ff"] for r in fit])
    for step in ("scores", "hungarian", "greedy"):
        p, c = np.polyfit(widths, np.log([r[f"{step}_s"] for r in fit]), 1)
        out[f"{step}_exponent"], out[f"{step}_s"] = p, float(np.exp(c) * target**p)
    return out


def _timed(fn, repeats: int = 1):
    """fn's result and its wall time in seconds: of that one run, or the median of `repeats`
    further runs (the first then serves as warm-up)."""
    clock = {}
    with stopwatch(clock, "s"):
        out = fn()
    if repeats <= 1:
        return out, clock["s"]
    return out, time_it(fn, repeats, warmup=0)["median_ms"] / 1e3
