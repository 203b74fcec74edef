# %% [markdown]
# # What experts cost
#
# An SMoE model keeps the arithmetic per token of its dense backbone, but at inference every expert
# must be resident, and once the experts are spread over several devices (expert parallelism) every
# MoE layer exchanges tokens twice: an All2All sends each token to the device holding its expert and
# a second one brings the result back. Sarkar et al. (2024) motivate task-specific expert reduction
# with three measurements of that cost: validation loss against inference latency (their Fig. 2a),
# the time one MoE layer spends in All2All against expert computation as the expert count grows
# (Fig. 4), and forward latency against the number of GPUs (Fig. 5). This chapter measures the same
# three things here, with real processes exchanging real tensors, and puts a cost model between our
# numbers and theirs.
#
# This copy was built at the {glue:text}`profile:s` profile from {glue:text}`models_source:s`.
# Every measurement is a forward pass of {glue:text}`batch_size:d` sequences of
# {glue:text}`seq_len:d` tokens per process at the evaluation capacity factor, timed
# {glue:text}`repeats:d` times after {glue:text}`warmup_runs:d` discarded warm-up runs (median and
# quartiles). The single-process runs use {glue:text}`threads:d` thread(s); the expert-parallel runs
# start P = {glue:text}`procs:s` processes (gloo over localhost, one thread each) on a machine with
# {glue:text}`cpus:d` cores, whose one-minute load average was {glue:text}`load_before:.2f` before and
# {glue:text}`load_after:.2f` after the measurements.
#
# ```{important}
# The P processes share {glue:text}`cpus:d` CPU cores, so their computation slows as P grows,
# independently of any communication. The dense model, which exchanges nothing, shows that part
# alone: its forward pass is {glue:text}`dense_slowdown:.2f` times slower at P =
# {glue:text}`max_procs:d` than in one process. Read the expert-parallel latencies against it, and
# read the communication through the bytes exchanged, which do not depend on the machine.
# ```

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose models to measure
runs: str = "runs"  # parent of the run folders ({runs}/{profile}/dense, e4, ..., reduced/<name>)
batch_size: int = 0  # sequences per process; 0: the profile's inference_bench size
seq_len: int = 0  # tokens per sequence; 0: the profile's size
repeats: int = 0  # timed runs per measurement; 0: the profile's number
procs: str = ""  # process counts P, space-separated (e.g. "1 2 4"); empty: the profile's
expert_counts: str = ""  # of the one-layer sweep, space-separated; empty: the profile's
out: str = "build/smoke/05_inference_cost"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import json
import time
from pathlib import Path

from myst_nb import glue

from uncurl import layout
from uncurl.bench import inference, inference_tables
from uncurl.report import inference as chapter
from uncurl.report import records, style

started = time.time()
out = Path(out)
style.use_style()
sizes = inference.notebook_overrides(
    batch_size=batch_size,
    seq_len=seq_len,
    repeats=repeats,
    procs=procs,
    expert_counts=expert_counts,
)

# %% tags=["remove-cell"]
result = inference.run_bench(profile, runs, **sizes)

# %% tags=["remove-cell"]
tables = inference_tables.chapter_tables(result)

# %% tags=["remove-cell"]
figures = {
    "loss_latency": chapter.plot_loss_vs_latency(result),
    "a2a_compute": chapter.plot_a2a_vs_compute(result),
    "latency_procs": chapter.plot_latency_vs_procs(result),
    "cost_model": chapter.plot_cost_model(result),
}

# %% tags=["remove-cell"]
values = chapter.headline(result)

# %% tags=["remove-cell"]
layout.write_text(out / "bench.json", json.dumps(result, indent=2, default=str) + "\n")
records.write_results(
    out, {"profile": profile, "runs": runs, **sizes}, started, values=values, tables=tables
)
for key, value in values.items():
    glue(key, value, display=False)
for name, fig in figures.items():
    glue(f"fig_{name}", style.save_figure(fig, out / f"{name}.png"), display=False)
for name, table in tables.items():
    glue(f"{name}_table", chapter.display(table), display=False)

# %% [markdown]
# ## Latency and memory in one process
#
# ```{glue:figure} fig_loss_latency
# :name: fig-loss-latency
# :alt: Validation loss against forward latency, one point per model, beside the paper's Fig. 2a
#
# Validation loss against the latency of one forward pass, one point per model (reduced models as
# open diamonds). (a) Our models in one process. (b) Sarkar et al. (2024, Fig. 2a): the
# {glue:text}`paper_backbone:s` backbone with {glue:text}`fig2a_experts:s` experts on
# {glue:text}`fig2a_gpus:d` A10 GPUs, batch {glue:text}`fig2a_batch_size:d` x
# {glue:text}`fig2a_seq_len:d` tokens per GPU, expert parallelism {glue:text}`fig2a_world:d`
# (losses read off the plot).
# ```
#
# ```{glue} models_table
# ```
#
# Parameters counts the bytes of every parameter once (the tied embedding and output head once). The
# forward peak is the resident memory the operating system had to add during one forward pass: the
# process's high-water mark is reset to its current size just before the pass (through
# `/proc/self/clear_refs`), and the C allocator is told to map every block of
# {glue:text}`mmap_threshold_kib:d` KiB or more afresh, so activations are not hidden in memory an
# earlier pass left behind; smaller blocks it may still reuse, so the number is a lower bound,
# dominated here by the output logits. In one process, experts cost memory in proportion to their
# number, and latency through the router, the dispatch and the experts' small matrix products. Dense
# and MoE FFNs run on the same grouped matrix product (`uncurl.model.kernels`, one expert for a
# dense FFN), so their latencies differ by what routing and many small experts cost, not by the code
# that multiplies.

# %% [markdown]
# ## All2All against expert computation
#
# One MoE layer at the profile's width, with its experts split over P processes, each process
# routing its own {glue:text}`batch_size:d` x {glue:text}`seq_len:d` tokens: ours
# (`uncurl.model.expert_parallel`, two `all_to_all_single` calls around the local experts) and DeepSpeed's
# layer with `ep_size` = P (its own All2All timers; experts timed by hooks). An exchange's time
# includes waiting for the processes that reach it later, as in DeepSpeed's timers.
#
# ```{glue:figure} fig_a2a_compute
# :name: fig-a2a-compute
# :alt: Stacked All2All and expert computation time of one MoE layer per expert count
#
# Time of one MoE layer in its two All2All exchanges (red) and its expert computation (blue) per
# expert count, ours and DeepSpeed's for each $P > 1$, beside Sarkar et al. (2024, Fig. 4): a
# {glue:text}`fig4_backbone:s` backbone, {glue:text}`fig4_tokens:d` tokens per GPU, expert
# parallelism {glue:text}`fig4_world:d`.
# ```
#
# ```{glue} layer_table
# ```
#
# At P = {glue:text}`world:d` with {glue:text}`top_experts:d` experts the two exchanges of our layer
# take {glue:text}`top_ratio:.1f` times as long as its expert computation. Side by side with the
# paper, in microseconds:
#
# ```{glue} fig4_comparison_table
# ```

# %% [markdown]
# ## Latency against the number of processes
#
# Every model's whole forward pass, each process holding $1/P$ of each MoE layer's experts and its
# own batch of the same size (data-parallel tokens, as in DeepSpeed), so the work per process stays
# the same and an ideal machine would show flat lines.
#
# ```{glue:figure} fig_latency_procs
# :name: fig-latency-procs
# :alt: Forward latency against the number of processes, one line per model, beside the paper's Fig. 5
#
# (a) Forward latency (slowest process, median and quartiles) against P. (b) Sarkar et al.
# (2024, Fig. 5): {glue:text}`fig5_model:s`, batch {glue:text}`fig5_batch_size:d` x
# {glue:text}`fig5_seq_len:d` tokens per GPU.
# ```
#
# ```{glue} forward_table
# ```

# %% [markdown]
# ## A cost model of the exchanges
#
# Each of P processes routes its own n tokens into a buffer of E experts x C slots x d values,
# C = max(min capacity, ⌈f n k / E⌉) at capacity factor f and top-k routing. An exchange hands that
# whole buffer to All2All; the process keeps $1/P$ of it and sends the rest as $P - 1$ messages, so
# with a fixed cost α per message and a bandwidth B
#
# $$
# t = \alpha\,(P - 1) + \frac{P - 1}{P}\,\frac{E\,C\,d\,s}{B},
# $$
#
# with s bytes per value, twice per MoE layer. At a fixed number of tokens E·C stays close to
# f n k until the minimum capacity binds, so the bytes barely grow with the expert count. Fitted by
# non-negative least squares to bare exchanges between our processes (the same gloo transport),
# the model gives α = {glue:text}`fit_alpha_us:.0f` µs and B = {glue:text}`fit_bandwidth_mbs:.0f`
# MB/s (R² = {glue:text}`fit_r2:.2f`):
#
# ```{glue} fit_table
# ```
#
# ```{glue} exchanges_table
# ```
#
# ```{glue:figure} fig_cost_model
# :name: fig-cost-model
# :alt: The cost model fitted to measured exchanges, and evaluated for the paper's setup
#
# (a) Bare exchanges (dots) and the fitted model (lines) against bytes, with the exchanges inside
# our MoE layer (crosses) for comparison. (b) The model at the setup of the paper's Fig. 4
# ($d$ = {glue:text}`fig4_d:d`, {glue:text}`fig4_tokens:d` tokens per GPU, expert parallelism
# {glue:text}`fig4_world:d`, capacity factor {glue:text}`fig4_capacity_factor:.1f`, minimum
# capacity {glue:text}`fig4_min_capacity:d`, {glue:text}`fig4_dtype_bytes:d`-byte values assumed)
# on published peak bandwidths, against the paper's measurement.
# ```
#
# **This is a model, not a measurement.** It is evaluated for the paper's setup with an assumed
# {glue:text}`gpu_alpha_us:.0f` µs per message and these published peak bandwidths per direction:
# {glue:text}`links:s`. Both exchanges of a layer would then take about {glue:text}`a100_min_us:.0f`
# µs on A100 NVLink at every expert count; the paper measured {glue:text}`a100_ratio_min:.0f` to
# {glue:text}`a100_ratio_max:.0f` times as much, growing with the expert count while the bytes do
# not. Data volume and link speed cannot account for the paper's All2All times; what grows with the
# expert count in its measurement is something the model leaves out, such as waiting for the slowest
# device, per-expert work around the exchange, or framework overheads. The last column below is the
# per-message cost that would make the model match.
#
# ```{glue} paper_fig4_table
# ```

# %% [markdown]
# ## Reduced models against what they came from
#
# {glue:text}`reduced_sentence:s` Each reduced model (written by the expert-reduction step to
# `{runs}/{profile}/reduced/<name>/`) is measured like every other model: its latency in one process,
# its parameter memory and its All2All time per forward pass, beside the model it was reduced from
# and the model with its expert count trained from scratch.
#
# ```{glue} reduced_table
# ```
