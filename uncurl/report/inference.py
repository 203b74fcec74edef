"""Figures and headline numbers of the chapter "What experts cost", from the results of
`python -m uncurl.bench inference` (`uncurl.bench.inference.run_bench`), beside the paper's; its
tables are the command's own (`uncurl.bench.inference_tables`)."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from uncurl import cpu
from uncurl.bench import costmodel
from uncurl.bench.inference_tables import (
    comparison_world,
    forward_table,
    layer_table,
)
from uncurl.report import paper
from uncurl.report.records import setting
from uncurl.report.style import (
    LOSS_LABEL,
    display_table,
    expert_color,
    expert_label,
    expert_range,
    human,
    plain_axis,
    plain_values,
)

A2A, COMPUTE = "All2All (both exchanges)", "expert computation"
PAPER_SMALL = human(costmodel.PAPER_SMALL_BACKBONE_PARAMS)  # the backbone of Fig. 4 and 5
FIG2A, FIG4, FIG5 = costmodel.PAPER_FIG2A_SETUP, costmodel.PAPER_FIG4, costmodel.PAPER_FIG5


def _experts(n_expert) -> int:
    """One number for a model's expert count (the mean, for per-layer counts)."""
    return round(float(np.mean(n_expert)))


def _label(name: str, n_expert) -> str:
    return name if name.startswith("reduced/") else expert_label(_experts(n_expert))


def display(df: pd.DataFrame):
    """A table for the book, numbers to four significant digits."""
    numeric = df.select_dtypes("number").columns
    return display_table(df, {c: "{:.4g}" for c in numeric})


# ---------------------------------------------------------------------------------- figures


def plot_loss_vs_latency(result: dict) -> Figure:
    """Fig. 2a's analog: validation loss against forward latency, one point per model."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ours, theirs = fig.subplots(1, 2)
    single = {r["model"]: r["median_ms"] for r in result["single"]}
    for m in result["models"]:
        if m["val_loss"] is None:
            continue
        reduced = m["kind"] == "reduced"
        ours.scatter(
            single[m["name"]],
            m["val_loss"],
            s=45,
            zorder=3,
            marker="D" if reduced else "o",
            facecolors="none" if reduced else None,
            color=expert_color(_experts(m["n_expert"])),
        )
        ours.annotate(
            _label(m["name"], m["n_expert"]),
            (single[m["name"]], m["val_loss"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize="small",
        )
    for n, (ms, loss) in costmodel.PAPER_FIG2A.items():
        theirs.scatter(ms, loss, s=45, color=expert_color(n), zorder=3)
        theirs.annotate(
            expert_label(n), (ms, loss), textcoords="offset points", xytext=(5, 4), fontsize="small"
        )
    for ax in (ours, theirs):
        ax.set_xlabel("forward latency (ms)")
        ax.set_ylabel(LOSS_LABEL)
    ours.set_title(f"(a) this study, {result['profile']} profile, one process")
    theirs.set_title(
        f"(b) Sarkar et al. Fig. 2a: {human(paper.BACKBONE_PARAMS)}, {FIG2A['gpus']} A10 GPUs"
    )
    return fig


def plot_a2a_vs_compute(result: dict) -> Figure:
    """Fig. 4's analog: per expert count, the layer's All2All and expert computation stacked."""
    layer = layer_table(result)
    layer = layer[layer["P"] > 1]
    panels = [(f"{impl}, P = {p}", g) for (impl, p), g in layer.groupby(["implementation", "P"])]
    fig = Figure(figsize=(3.4 * (len(panels) + 1), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels) + 1))
    paper = pd.DataFrame(
        {
            "experts": list(costmodel.PAPER_FIG4_A2A_US),
            "a2a": list(costmodel.PAPER_FIG4_A2A_US.values()),
            "compute": costmodel.PAPER_FIG4_COMPUTE_US,
        }
    )
    for ax, (title, g) in zip(axes, panels, strict=False):
        a2a = 1e3 * (g["first All2All (ms)"] + g["second All2All (ms)"])
        _stacked(ax, g["experts"], a2a, 1e3 * g["expert computation (ms)"], title)
    _stacked(
        axes[-1],
        paper["experts"],
        paper["a2a"],
        paper["compute"],
        f"Sarkar et al. Fig. 4: {PAPER_SMALL}, GPUs, EP {FIG4['world']}",
    )
    axes[0].legend(fontsize="small")
    return fig


def _stacked(ax, experts, a2a, compute, title):
    x = np.arange(len(experts))
    ax.bar(x, compute, color="C0", label=COMPUTE)
    ax.bar(x, a2a, bottom=compute, color="C3", label=A2A)
    ax.set_xticks(x, [str(e) for e in experts])
    ax.set_xlabel("experts per MoE layer")
    ax.set_ylabel("µs per layer")
    ax.set_title(title, fontsize="medium")


def plot_latency_vs_procs(result: dict) -> Figure:
    """Fig. 5's analog: forward latency against the number of processes, one line per model."""
    fwd = forward_table(result)
    names = {m["name"]: m["n_expert"] for m in result["models"]}
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ours, theirs = fig.subplots(1, 2)
    for model, g in fwd.groupby("model", sort=False):
        n = names[model]
        ours.plot(
            g["P"],
            g["forward (ms)"],
            marker="o",
            color=expert_color(_experts(n)),
            linestyle="--" if model.startswith("reduced/") else "-",
            label=_label(model, n),
        )
        ours.fill_between(
            g["P"], g["q1 (ms)"], g["q3 (ms)"], color=expert_color(_experts(n)), alpha=0.15
        )
    theirs.plot(
        list(costmodel.PAPER_FIG5_MS),
        list(costmodel.PAPER_FIG5_MS.values()),
        marker="o",
        color=expert_color(FIG5["n_expert"]),
        label=f"{PAPER_SMALL}+{FIG5['n_expert']}e",
    )
    ours.set_xlabel(f"processes P on {result['environment']['cpus']} cores")
    theirs.set_xlabel("GPUs")
    for ax in (ours, theirs):
        ax.set_xscale("log", base=2)
        plain_axis(ax.xaxis)
        ax.set_ylabel("forward latency (ms)")
        ax.legend(fontsize="small")
    ours.set_title("(a) this study: each process its own batch")
    theirs.set_title(
        f"(b) Sarkar et al. Fig. 5: {FIG5['batch_size']} x {FIG5['seq_len']} tokens per GPU"
    )
    return fig


def plot_cost_model(result: dict) -> Figure:
    """(a) the fit to bare exchanges, our layers' exchanges beside it; (b) the model at the
    paper's Fig. 4 setup on published links against the paper's measurement."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    ex, fit = pd.DataFrame(result["exchanges"]), result["fit"]
    layer = pd.DataFrame(result["layer"])
    layer = layer[(layer["impl"] == "uncurl") & (layer["world"] > 1)]
    for i, (world, g) in enumerate(ex.groupby("world")):
        grid = np.geomspace(g["bytes"].min(), g["bytes"].max(), 50)
        left.plot(
            grid,
            1e3 * costmodel.exchange_time(grid, world, fit["alpha"], fit["bandwidth"]),
            color=f"C{i}",
        )
        left.scatter(g["bytes"], g["median_ms"], color=f"C{i}", label=f"bare, P = {world}")
        mine = layer[layer["world"] == world]
        left.scatter(
            mine["bytes_sent"] / 2,
            1e3 * (mine["first_a2a"] + mine["second_a2a"]) / 2,
            marker="x",
            color=f"C{i}",
            label=f"in our layer, P = {world}",
        )
    left.set_xscale("log")
    left.set_yscale("log")
    plain_axis(left.xaxis, human)
    plain_axis(left.yaxis)
    left.set_xlabel("bytes per rank and exchange")
    left.set_ylabel("ms per exchange")
    left.legend(fontsize="small")
    left.set_title(
        f"(a) fit on gloo: {1e6 * fit['alpha']:.0f} µs per message, "
        f"{fit['bandwidth'] / 1e6:.0f} MB/s",
        fontsize="medium",
    )
    paper = pd.DataFrame(result["paper_fig4"])
    for i, (link, g) in enumerate(paper.groupby("link", sort=False)):
        right.plot(
            g["n_expert"], g["model_us"], marker="s", color=f"C{i + 2}", label=f"model: {link}"
        )
    right.plot(
        list(costmodel.PAPER_FIG4_A2A_US),
        list(costmodel.PAPER_FIG4_A2A_US.values()),
        marker="o",
        color="black",
        label="Sarkar et al. Fig. 4, measured",
    )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    plain_axis(right.xaxis)
    plain_axis(right.yaxis)
    right.set_xlabel("experts per MoE layer")
    right.set_ylabel("All2All per layer (µs)")
    right.legend(fontsize="small")
    right.set_title("(b) the paper's setup: model against measurement", fontsize="medium")
    return fig


# ---------------------------------------------------------------------------------- numbers


def headline(result: dict) -> dict:
    """The numbers and phrases the chapter pastes."""
    layer = layer_table(result)
    world = comparison_world(result)
    ours = layer[(layer["implementation"] == "uncurl") & (layer["P"] == world)]
    top = ours.iloc[-1] if len(ours) else None
    fwd = forward_table(result)
    dense = fwd[fwd["model"] == "dense"]
    a100 = [r for r in result["paper_fig4"] if r["link"] == costmodel.LINKS[0].name]
    kinds = {m["kind"] for m in result["models"]}
    n_reduced = sum(m["kind"] == "reduced" for m in result["models"])
    return plain_values(
        {
            "profile": result["profile"],
            "threads": result["threads"],
            "cpus": result["environment"]["cpus"],
            "load_before": result["load_avg_before"],
            "load_after": result["load_avg_after"],
            "batch_size": result["settings"]["batch_size"],
            "seq_len": result["settings"]["seq_len"],
            "repeats": result["settings"]["repeats"],
            "warmup_runs": result["settings"]["warmup_runs"],
            "procs": ", ".join(map(str, result["settings"]["procs"])),
            "max_procs": max(result["settings"]["procs"]),
            "models_source": (
                "trained checkpoints"
                if kinds <= {"trained", "reduced"}
                else "randomly initialised models at the profile's shapes (no trained "
                "checkpoints were found)"
            ),
            "world": world,
            "top_experts": int(top["experts"]) if top is not None else 0,
            "top_ratio": float(top["All2All / computation"]) if top is not None else float("nan"),
            "dense_slowdown": float(dense["vs smallest P"].iloc[-1])
            if len(dense)
            else float("nan"),
            "fit_alpha_us": 1e6 * result["fit"]["alpha"],
            "fit_bandwidth_mbs": result["fit"]["bandwidth"] / 1e6,
            "fit_r2": result["fit"]["r2"],
            "a100_min_us": min(r["model_us"] for r in a100),
            "a100_ratio_min": min(r["paper_over_model"] for r in a100),
            "a100_ratio_max": max(r["paper_over_model"] for r in a100),
            "gpu_alpha_us": 1e6 * costmodel.GPU_ALPHA,
            "reduced_sentence": (
                f"{n_reduced} reduced model(s) were found and are compared below."
                if n_reduced
                else "No reduced models were found under "
                f"{result['runs']}/{result['profile']}/reduced/ when this copy was "
                "built, so this section has nothing to compare yet."
            ),
            **paper_setups(),
        }
    )


def paper_setups() -> dict:
    """The setups of the paper's measurements and of the cost model, as the prose states them,
    and the allocator setting of our memory measurement."""
    cfg = costmodel.PAPER_FIG4_CONFIG
    return {
        **paper.headline(),
        "fig2a_experts": expert_range(costmodel.PAPER_FIG2A),
        **{f"fig2a_{k}": v for k, v in FIG2A.items()},
        "fig4_backbone": PAPER_SMALL,
        **{f"fig4_{k}": v for k, v in FIG4.items()},
        "fig4_d": cfg.n_embd,
        "fig4_capacity_factor": cfg.eval_capacity_factor,
        "fig4_min_capacity": cfg.min_capacity,
        "fig5_model": f"{PAPER_SMALL}+{FIG5['n_expert']}e",
        **{f"fig5_{k}": v for k, v in FIG5.items()},
        "links": "; ".join(
            f"{link.name}: {link.bandwidth / 1e9:g} GB/s ({link.source})"
            for link in costmodel.LINKS
        ),
        "mmap_threshold_kib": setting(cpu.map_large_blocks_afresh, "threshold") >> 10,
    }
