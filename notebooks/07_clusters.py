# %% [markdown]
# # Inside the clusters
#
# UNCURL groups a layer's experts by how alike the router scores them on the task's tokens
# (spectral clustering of the $(1 + \cos)/2$ similarity of router-logit columns; the Method
# chapter). This chapter looks at what that clustering finds in the
# {glue:text}`n_reductions:d` UNCURL reductions of this build (every source model, target, task
# and seed): the clusters themselves, how stable they are when only the seed changes, and whether
# a layer has cluster structure to find at all. Sarkar et al. (2024, Fig. 7) show a t-SNE of the
# spectral embedding in which the first MoE layer has no distinct clusters, and suggest pruning
# that layer greedily instead; the last section compares that variant with UNCURL everywhere.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose reductions to inspect
runs: str = "runs"  # reductions under {runs}/{profile}/reduced, results under .../finetune
out: str = "build/smoke/07_clusters"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl import evaluate
from uncurl.config import get_profile
from uncurl.report import clusters, records, style
from uncurl.report import tasks as task_chapter

started = time.time()
cfg = get_profile(profile)
out = Path(out)
style.use_style()

# %% tags=["remove-cell"]
layers = clusters.load_reductions(runs, cfg)
stable = clusters.stability(layers)
struct = clusters.structure(layers)
sizes = clusters.cluster_sizes(layers)
variants = clusters.variant_table(evaluate.summary(task_chapter.load(runs, cfg)))

# %% tags=["remove-cell"]
fig_embedding = clusters.plot_embeddings(layers)
fig_structure = clusters.plot_structure(struct)
values = clusters.headline(stable, struct)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "runs": runs},
    started,
    values=values,
    tables={"stability": stable, "structure": struct, "sizes": sizes, "variants": variants},
)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_embedding", style.save_figure(fig_embedding, out / "embedding.png"), display=False)
glue("fig_structure", style.save_figure(fig_structure, out / "structure.png"), display=False)
glue(
    "stability_table",
    style.display_table(stable, {"ari": "{:.2f}", "ari_random": "{:.2f}"}),
    display=False,
)
glue("sizes_table", style.display_table(sizes), display=False)
glue("variant_table", style.display_table(variants), display=False)

# %% [markdown]
# ## The clusters
#
# ```{glue:figure} fig_embedding
# :name: fig-embedding
# :alt: t-SNE of the spectral embedding of each MoE layer's experts, coloured by cluster
#
# The spectral embedding of one reduction's MoE layers, drawn in two dimensions by t-SNE: each
# point is an original expert, its colour its cluster, its size how often the router chose it
# on the task.
# ```
#
# Cluster sizes, over every reduction and seed:
#
# ```{glue} sizes_table
# ```
#
# ## Stability across seeds
#
# A reduction's seed draws the sample of task tokens its statistics read and the start of the
# K-means step. The adjusted Rand index of two seeds' partitions is one when they agree and
# about zero when they agree no more than random partitions of the same sizes; the median over
# reductions and layers is {glue:text}`median_ari:.2f` (from {glue:text}`min_ari:.2f` to
# {glue:text}`max_ari:.2f`), against {glue:text}`median_ari_random:.2f` for random partitions.
#
# ```{glue} stability_table
# ```
#
# ## Is there structure to find?
#
# ```{glue:figure} fig_structure
# :name: fig-structure
# :alt: Within-minus-between cluster similarity per MoE layer, UNCURL against random partitions
#
# For every reduction and seed, how much more alike the router scores experts within one of
# UNCURL's clusters than across clusters, beside random partitions of the same sizes.
# ```
#
# Measured in standard deviations of the random partitions, the median contrast of MoE layer
# {glue:text}`first_layer:d` is {glue:text}`first_layer_z:.1f` and that of the later layers
# {glue:text}`other_layers_z:.1f`; the first MoE layer {glue:text}`first_is_weakest:s` the one
# with the least cluster structure here.
#
# ## Greedy pruning in the first layer
#
# The paper's suggestion as a method (`greedy-first`: greedy pruning in the first MoE layer,
# UNCURL in the others) beside UNCURL everywhere and the from-scratch model of the same size,
# every model fine-tuned and scored as in the tasks chapter:
#
# ```{glue} variant_table
# ```
