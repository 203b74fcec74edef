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
    rows = [{"what": k, "value": str(v)} for k, v in env.items() if k != "packages"]
    rows += [{"what": name, "value": version} for name, version in env["packages"].items()]
    return pd.DataFrame(rows)


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
