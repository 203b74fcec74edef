"""The tables of `python -m uncurl.bench inference`'s results (`inference.run_bench`), which the
command prints and the book's chapter "What experts cost" shows."""

import pandas as pd

from uncurl.bench import costmodel


def models_table(result: dict) -> pd.DataFrame:
    """One process: each model's latency, memory and validation loss."""
    single = {r["model"]: r for r in result["single"]}
    dense = single.get("dense", {}).get("median_ms")
    rows = []
    for m in result["models"]:
        r = single[m["name"]]
        rows.append(
            {
                "model": m["name"],
                "source": m["kind"],
                "experts": str(m["n_expert"]),
                "validation loss": m["val_loss"],
                "parameters (MB)": r["param_bytes"] / 1e6,
                "forward peak (MB)": None
                if r["forward_peak_bytes"] is None
                else r["forward_peak_bytes"] / 1e6,
                "latency (ms)": r["median_ms"],
                "q1 (ms)": r["q1_ms"],
                "q3 (ms)": r["q3_ms"],
                "vs dense": r["median_ms"] / dense if dense else None,
            }
        )
    return pd.DataFrame(rows)


def layer_table(result: dict) -> pd.DataFrame:
    """One MoE layer under expert parallelism: All2All against expert computation."""
    df = pd.DataFrame(result["layer"])
    out = pd.DataFrame(
        {
            "implementation": df["impl"],
            "P": df["world"],
            "experts": df["n_expert"],
            "layer (ms)": df["median_ms"],
            "first All2All (ms)": 1e3 * df["first_a2a"],
            "expert computation (ms)": 1e3 * df["compute"],
            "second All2All (ms)": 1e3 * df["second_a2a"],
            "KiB per exchange": df["bytes_sent"] / 2 / 1024,
        }
    )
    out["All2All / computation"] = (out["first All2All (ms)"] + out["second All2All (ms)"]) / out[
        "expert computation (ms)"
    ]
    return out.sort_values(["implementation", "P", "experts"], ignore_index=True)


def forward_table(result: dict) -> pd.DataFrame:
    """Whole forward passes against P: latency, and its All2All and expert parts."""
    df = pd.DataFrame(result["forward"])
    out = pd.DataFrame(
        {
            "model": df["model"],
            "P": df["world"],
            "forward (ms)": df["median_ms"],
            "q1 (ms)": df["q1_ms"],
            "q3 (ms)": df["q3_ms"],
            "All2All (ms)": 1e3 * (df["first_a2a"] + df["second_a2a"]),
            "expert computation (ms)": 1e3 * df["compute"],
            "KiB exchanged per rank": df["bytes_sent"] / 1024,
        }
    )
    first = out.groupby("model")["forward (ms)"].transform("first")
    out["vs smallest P"] = out["forward (ms)"] / first
    return out


def exchanges_table(result: dict) -> pd.DataFrame:
    """Bare all_to_all exchanges against the fitted cost model."""
    df = pd.DataFrame(result["exchanges"])
    fit = result["fit"]
    model = costmodel.exchange_time(df["bytes"], df["world"], fit["alpha"], fit["bandwidth"])
    return pd.DataFrame(
        {
            "P": df["world"],
            "KiB per rank": df["bytes"] / 1024,
            "measured (ms)": df["median_ms"],
            "model (ms)": 1e3 * model,
            "q1 (ms)": df["q1_ms"],
            "q3 (ms)": df["q3_ms"],
        }
    )


def fit_table(result: dict) -> pd.DataFrame:
    fit = result["fit"]
    return pd.DataFrame(
        [
            {
                "alpha, per message (µs)": 1e6 * fit["alpha"],
                "bandwidth (MB/s)": fit["bandwidth"] / 1e6,
                "R²": fit["r2"],
                "points": fit["n_points"],
                "largest |residual| (ms)": 1e3 * max(abs(r) for r in fit["residuals"]),
            }
        ]
    )


def paper_fig4_table(result: dict) -> pd.DataFrame:
    df = pd.DataFrame(result["paper_fig4"])
    return pd.DataFrame(
        {
            "experts": df["n_expert"],
            "link": df["link"],
            "KiB per exchange": df["buffer_bytes"] / 1024,
            "model (µs)": df["model_us"],
            "paper (µs)": df["paper_us"],
            "paper / model": df["paper_over_model"],
            "alpha that would match (µs)": df["alpha_to_match_us"],
        }
    )


def fig4_comparison(result: dict, world: int = costmodel.PAPER_FIG4["world"]) -> pd.DataFrame:
    """Ours (our layer and DeepSpeed's at P = world) beside the paper's Fig. 4, microseconds."""
    layer = layer_table(result)
    layer = layer[layer["P"] == world]
    rows = [
        {
            "source": f"{r['implementation']}, P = {world} (ours)",
            "experts": r["experts"],
            "All2All (µs)": 1e3 * (r["first All2All (ms)"] + r["second All2All (ms)"]),
            "expert computation (µs)": 1e3 * r["expert computation (ms)"],
        }
        for r in layer.to_dict("records")
    ]
    for n, a2a in costmodel.PAPER_FIG4_A2A_US.items():
        rows.append(
            {
                "source": "Sarkar et al. Fig. 4",
                "experts": n,
                "All2All (µs)": a2a,
                "expert computation (µs)": costmodel.PAPER_FIG4_COMPUTE_US,
            }
        )
    out = pd.DataFrame(rows)
    out["All2All / computation"] = out["All2All (µs)"] / out["expert computation (µs)"]
    return out


def reduced_table(result: dict, world: int | None = None) -> pd.DataFrame:
    """Each reduced model against the model it came from and its from-scratch equivalent:
    latency in one process, parameters, and All2All per forward at P = world."""
    world = world or comparison_world(result)
    single = {r["model"]: r for r in result["single"]}
    fwd = forward_table(result)
    a2a = dict(
        zip(
            fwd.loc[fwd["P"] == world, "model"],
            fwd.loc[fwd["P"] == world, "All2All (ms)"],
            strict=True,
        )
    )
    rows = []
    for m in result["models"]:
        if m["kind"] != "reduced":
            continue
        for role, name in (
            ("reduced", m["name"]),
            ("came from", m.get("source")),
            ("from scratch", m.get("equivalent")),
        ):
            r = single.get(name)
            rows.append(
                {
                    "reduced model": m["name"],
                    "role": role,
                    "model": name or "unknown",
                    "latency (ms)": r["median_ms"] if r else None,
                    "parameters (MB)": r["param_bytes"] / 1e6 if r else None,
                    f"All2All per forward, P = {world} (ms)": a2a.get(name),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "reduced model",
            "role",
            "model",
            "latency (ms)",
            "parameters (MB)",
            f"All2All per forward, P = {world} (ms)",
        ],
    )


def comparison_world(result: dict) -> int:
    """P = 2 as in the paper when measured, else the largest P measured."""
    worlds = sorted({r["world"] for r in result["forward"]})
    return 2 if 2 in worlds else worlds[-1]


TITLES = {
    "models": "Latency of one forward pass, one process",
    "layer": "One MoE layer under expert parallelism (P processes)",
    "forward": "Whole forward pass against P (each rank its own batch)",
    "exchanges": "Bare all_to_all exchanges and the fitted cost model",
    "fit": "Cost model fit",
    "paper_fig4": "Cost model at the paper's Fig. 4 setup (a model, not a measurement)",
    "fig4_comparison": "Our layer beside the paper's Fig. 4",
    "reduced": "Reduced models against their source and from-scratch equivalent",
}


def chapter_tables(result: dict) -> dict[str, pd.DataFrame]:
    """Every table of the chapter (and of the command's output), by name."""
    makers = {
        "models": models_table,
        "layer": layer_table,
        "forward": forward_table,
        "exchanges": exchanges_table,
        "fit": fit_table,
        "paper_fig4": paper_fig4_table,
        "fig4_comparison": fig4_comparison,
        "reduced": reduced_table,
    }
    return {name: make(result) for name, make in makers.items()}


def printed_tables(result: dict) -> list[tuple[str, pd.DataFrame]]:
    """What the command prints, rounded for reading."""
    out = []
    for name, df in chapter_tables(result).items():
        title = TITLES[name]
        if name == "reduced" and df.empty:
            title = f"No reduced models under {result['runs']}/{result['profile']}/reduced/"
        out.append((title, df.round(3)))
    return out
