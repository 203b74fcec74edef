"""The reproducing chapter: the machine and packages this book was built with, and the wall time
of every step of the study, from the study runner's own records."""

from pathlib import Path

import pandas as pd

from uncurl import layout
from uncurl.provenance import environment
from uncurl.report.style import duration, plain_values


def step_times(build) -> pd.DataFrame:
    """Every run of the study with the seconds its last execution took (the runner's records
    under <build>/.cache), and the step it belongs to."""
    rows = []
    for path in sorted((Path(build) / ".cache").glob("*.json")):
        record = layout.read_json(path)
        if "label" in record and "seconds" in record:
            rows.append(
                {
                    "run": record["label"],
                    "step": record["label"].split("[")[0],
                    "seconds": float(record["seconds"]),
                }
            )
    return pd.DataFrame(rows, columns=["run", "step", "seconds"])


def per_step(times: pd.DataFrame) -> pd.DataFrame:
    """Seconds per step, summed over its runs, longest first."""
    out = times.groupby("step", as_index=False).agg(
        runs=("run", "size"), seconds=("seconds", "sum")
    )
    return out.sort_values("seconds", ascending=False, ignore_index=True)


def machine() -> pd.DataFrame:
    """What this process runs on: the same record every result file carries."""
    env = environment()
    rows = [{"what": k, "value": _shown(v)} for k, v in env.items() if k != "packages"]
    rows += [{"what": name, "value": version} for name, version in env["packages"].items()]
    return pd.DataFrame(rows)


def _shown(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def headline(times: pd.DataFrame) -> dict:
    steps = per_step(times)
    return plain_values(
        {
            "n_runs": len(times),
            "total_time": duration(times["seconds"].sum()) if len(times) else "not measured",
            "longest_step": steps["step"].iloc[0] if len(steps) else "none",
            "longest_step_time": duration(steps["seconds"].iloc[0]) if len(steps) else "none",
        }
    )


def grid_benchmark(path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """`python -m uncurl.bench finetune --json` read back: a member-step on each path against
    the FLOP floor, where a population's member-step goes, whole runs per core-minute on each
    path, and what it ran on."""
    bench = layout.read_json(path)
    floor = bench["floor"]
    steps = pd.DataFrame(
        [
            {
                "path": name,
                "ms per member-step": t["median_ms"],
                "tokens per CPU second": t["tokens_per_s"],
            }
            for name, t in bench["steps"].items()
        ]
    )
    steps["x floor"] = steps["ms per member-step"] / floor["floor_ms"]
    step_ms = bench["steps"][f"population of {bench['members']}"]["median_ms"]
    parts = bench["breakdown"]
    kinds = pd.DataFrame(
        [
            {
                "kind of work": kind,
                "in the floor": "yes" if kind in parts["in_floor"] else "no",
                "share": share,
                "ms per member-step": share * step_ms,
            }
            for kind, share in parts["shares"].items()
        ]
    )
    outside = sum(s for k, s in parts["shares"].items() if k not in parts["in_floor"])
    runs = {k: v for k, v in bench["end_to_end"].items() if k != "steps"}
    whole = pd.DataFrame([{"path": name} | t for name, t in runs.items()])
    ref = runs.get("today's (baseline)", runs["solo"])["runs_per_core_min"]
    whole["x baseline"] = whole["runs_per_core_min"] / ref
    env = bench["environment"]
    values = {
        "bench_floor_ms": f"{floor['floor_ms']:.1f} ms",
        "bench_gflops": f"{floor['step_flops'] / 1e9:.2f} GFLOP",
        "bench_rate": f"{floor['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s",
        "bench_task": bench["task"],
        "bench_experts": bench["n_expert"],
        "bench_revision": env["git"][:7],
        "bench_baseline": bench["baseline"],
        "bench_outside_ms": f"{outside * step_ms:.1f} ms",
        "bench_step_ms": f"{step_ms:.1f} ms",
        "bench_profiled_ms": f"{parts['profiled_ms']:.1f} ms",
        "bench_width": floor["sgemm_shape"][1],  # n_embd
        # the step with every product at the floor's rate and the rest as measured
        "bench_best_floors": f"{1 + outside * step_ms / floor['floor_ms']:.1f}",
        "bench_products_floors": f"{(1 - outside) * step_ms / floor['floor_ms']:.1f}",
    }
    return steps, kinds, whole, plain_values(values)
