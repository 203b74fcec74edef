# %% [markdown]
# # Merging baselines and newer methods against UNCURL
#
# Every reduction method of the library on the same reductions, tasks and seeds: the paper's
# merging baselines (frequency-based merging, its Table 3; MC-SMoE adapted, its Table 4),
# methods published since (REAP, HC-SMoE, NAEE), random pruning as the floor, greedy pruning,
# and the paper's suggestion of greedy pruning in the first MoE layer only (the Method chapter
# describes each). Of {glue:text}`n_against_uncurl:d` comparisons with UNCURL on the same
# reduction and task, after Holm's adjustment, {glue:text}`n_beat_uncurl:d` favour the other
# method, {glue:text}`n_tie_uncurl:d` are ties and {glue:text}`n_lose_uncurl:d` favour UNCURL.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose fine-tuning results to read
runs: str = "runs"  # results under {runs}/{profile}/finetune (the finetune step writes them)
out: str = "build/smoke/09_baselines"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl.config import get_profile
from uncurl.report import baselines, paper, records, style
from uncurl.report import tasks as task_chapter

started = time.time()
cfg = get_profile(profile)
out = Path(out)
style.use_style()

# %% tags=["remove-cell"]
results = [r for r in task_chapter.load(runs, cfg) if r["task"] in cfg.tasks]
scratch = baselines.over_scratch(results)
uncurl = baselines.over_uncurl(results)
fig = baselines.plot(scratch)
values = baselines.headline(scratch, uncurl)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "runs": runs},
    started,
    values=values,
    tables={"over_scratch": scratch.drop(columns="draws"), "over_uncurl": uncurl},
)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_baselines", style.save_figure(fig, out / "baselines.png"), display=False)
shown = [
    "model",
    "task",
    "seeds",
    "advantage",
    "ci_low",
    "ci_high",
    "p",
    "verdict",
    "p_holm",
    "verdict_holm",
]
numbers = dict.fromkeys(["advantage", "ci_low", "ci_high"], "{:+.2f}") | dict.fromkeys(
    ["p", "p_holm"], "{:.3f}"
)
glue("uncurl_table", style.display_table(uncurl[shown], numbers), display=False)
table = paper.baselines()
glue(
    "paper_table",
    style.display_table(table, dict.fromkeys(table.columns[1:], "{:.2f}")),
    display=False,
)

# %% [markdown]
# ```{glue:figure} fig_baselines
# :name: fig-baselines
# :alt: Every reduced model's advantage over the from-scratch model of its size, per task
#
# Every reduced model's advantage over the from-scratch model of its size, per task, with its
# interval; the colour is the method.
# ```
#
# ## Against UNCURL
#
# Each method minus UNCURL on the same source model, target and task, paired by seed (positive:
# the method is better), with the raw and the Holm-adjusted verdict:
#
# ```{glue} uncurl_table
# ```
#
# The paper's baselines beside its UNCURL reductions (Sarkar et al. 2024, Table 2, Table 3 and Table 4,
# accuracy in %, single runs):
#
# ```{glue} paper_table
# ```
