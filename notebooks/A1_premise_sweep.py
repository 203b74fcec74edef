# %% [markdown]
# # Premise sweep
#
# The study's question only arises if, as in the paper, more experts give a lower validation loss
# at an equal number of training tokens. A pilot at our scale found the opposite, so before fixing
# the default profile a sweep compared dense and MoE models under a few settings:
# {glue:text}`n_runs:d` training runs in {glue:text}`n_variants:d` variants,
# {glue:text}`sweep_time:s` of training in all. The results come from
# `python -m uncurl.sweep` and are committed as `data/results/premise_sweep.csv`; this appendix
# only reads them.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile the book is built for (the sweep itself ran at the small profile)
sweep_csv: str = "data/results/premise_sweep.csv"  # the sweep's results (python -m uncurl.sweep)
out: str = "build/smoke/A1_premise_sweep"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl.report import premise, records, style

started = time.time()
out = Path(out)
style.use_style()

# %% tags=["remove-cell"]
sweep = premise.load_sweep(sweep_csv)

# %% tags=["remove-cell"]
fig_sweep = premise.plot_sweep(sweep)

# %% tags=["remove-cell"]
values = premise.sweep_headline(sweep)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "sweep_csv": sweep_csv},
    started,
    values=values,
    tables={"gaps": premise.sweep_gaps(sweep)},
)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_sweep", style.save_figure(fig_sweep, out / "premise_sweep.png"), display=False)
glue("sweep_table", premise.sweep_table(sweep), display=False)

# %% [markdown]
# ```{glue:figure} fig_sweep
# :name: fig-premise-sweep
# :alt: Final validation loss of dense and MoE models for each sweep variant, and their difference
#
# (a) Final validation loss of each sweep run. (b) The MoE model's loss minus that of its dense
# reference; bars to the right mean the MoE model is worse.
# ```
#
# A MoE run's dense reference is the dense run of the same variant and seed; a variant that
# changes only the MoE layers (the router's initialisation, say) trains no dense model of its own
# and is compared with the dense run of the same width, vocabulary, token count and seed.
#
# ```{glue} sweep_table
# ```
#
# In {glue:text}`n_moe_worse:d` of {glue:text}`n_pairs:d` comparisons the MoE model ends with the
# higher validation loss; the differences range from {glue:text}`min_gap:+.3f` to
# {glue:text}`max_gap:+.3f` nats per token. {glue:text}`seed_sentence:s`

# %% [markdown]
# ## What went wrong, what changed, what this scale supports
#
# With GPT-2's initialisation for every linear layer (standard deviation
# {glue:text}`old_router_std:g`), the router's logits start near zero, so the full-softmax gate of
# the chosen expert starts near $1/E$: every expert's output is scaled down by roughly the number
# of experts, and in a few hundred steps the router does not become confident enough to undo it.
# Inspecting the trained MoE model of the second variant showed mean gates close to the uniform
# $1/E$ and a tenth or more of the tokens dropped at capacity. The MoE layers then contribute
# little, and more experts lose to dense.
#
# The fix keeps the paper's routing (softmax gate, top-1, load balancing, capacity): only the
# router's initial weights are drawn with a larger standard deviation
# ({glue:text}`router_std:g`), so routing starts confident though random and the gate starts near
# one for the chosen expert. The {glue:text}`sweep_profile:s` profile uses it, with
# {glue:text}`profile_steps:d` steps.
#
# At that setting, the sweep's last variant, the MoE model ends below the dense model, on the mean
# over seeds, with {glue:text}`below:s` and above it with {glue:text}`above:s`, and among the SMoE
# models the loss falls, though not strictly, as experts are added, the shape of the paper's Fig. 6.
# Against dense the sign flips between the seeds with {glue:text}`flips:s`, so that comparison is
# within seed noise. An advantage over dense larger than the spread between seeds at this setting
# ({glue:text}`last_spread:s`) shows only with {glue:text}`beyond_spread:s`. This scale supports the
# premise qualitatively with {glue:text}`below:s` and not with {glue:text}`above:s`, where capacity
# overflow costs more than the added parameters gain.
#
