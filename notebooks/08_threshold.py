# %% [markdown]
# # Reduced against from scratch, and the threshold pruning factor
#
# The paper's headline: a model pretrained with $Z$ experts and reduced to $D$ for a task beats
# the $D$-expert model trained from scratch up to a *threshold pruning factor* $Z/D$, which
# depends on $Z$. Sarkar et al. (2024, Section 6.2) read it off single runs of six SuperGLUE
# tasks. This chapter measures it for this build's {glue:text}`n_reductions:d` UNCURL
# reductions on {glue:text}`n_tasks:d` tasks, every comparison paired by seed, with intervals
# that cover the seeds (each its own reduction, router warm-up and data order) and the
# validation examples. A reduction wins a task when its advantage over the from-scratch model of
# its size is positive; a factor is won when more than half of the tasks are; the threshold of
# a pretraining expert count is the largest factor that is won together with every smaller one.
#
# The threshold pruning factor found here is {glue:text}`thresholds:s`; the paper reports
# {glue:text}`paper_thresholds:s`.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose fine-tuning results to read
runs: str = "runs"  # results under {runs}/{profile}/finetune (the finetune step writes them)
out: str = "build/smoke/08_threshold"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl.config import get_profile
from uncurl.report import paper, records, style, threshold
from uncurl.report import tasks as task_chapter

started = time.time()
cfg = get_profile(profile)
out = Path(out)
style.use_style()

# %% tags=["remove-cell"]
results = task_chapter.load(runs, cfg)
readable = list(cfg.tasks)  # the main tasks: a family fixed before the results
results = [r for r in results if r["task"] in readable]
adv = threshold.advantages(results, "uncurl")
greedy = threshold.advantages(results, "greedy")
shares = threshold.win_shares(adv)
thr = threshold.thresholds(adv)
thr_tasks = threshold.per_task(adv)

# %% tags=["remove-cell"]
fig = threshold.plot_advantages(adv, shares)
values = {
    **threshold.headline(adv, thr, "uncurl"),
    "paper_thresholds": style.listing(f"{f} for {z} experts" for z, f in paper.THRESHOLD.items()),
}

# %% tags=["remove-cell"]
plain = {
    "advantages": adv.drop(columns="draws"),
    "greedy": greedy.drop(columns="draws"),
    "shares": shares,
    "thresholds": thr,
    "task_thresholds": thr_tasks,
}
records.write_results(out, {"profile": profile, "runs": runs}, started, values=values, tables=plain)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_threshold", style.save_figure(fig, out / "threshold.png"), display=False)
glue("uncurl_table", style.display_table(threshold.table(adv)), display=False)
glue("greedy_table", style.display_table(threshold.table(greedy)), display=False)
for key, df in {"threshold_table": thr, "task_threshold_table": thr_tasks}.items():
    shown = threshold.readable(df)
    glue(key, style.display_table(shown, {shown.columns[-1]: "{:.2f}"}), display=False)
for method in ("uncurl", "greedy"):
    table = paper.advantages(method)
    signed = dict.fromkeys(paper.SUPERGLUE_TASKS, "{:+.2f}") | {"tasks won (%)": "{:.0f}"}
    glue(f"paper_{method}", style.display_table(table, signed), display=False)

# %% [markdown]
# ## The threshold
#
# ```{glue:figure} fig_threshold
# :name: fig-threshold
# :alt: Advantage of reduced over from-scratch models against the pruning factor, per task
#
# The UNCURL-reduced model's advantage over the from-scratch model of its size against the
# pruning factor $Z/D$, one line per pretraining expert count $Z$ (points above zero: the
# reduction is better), one panel per task, with the interval of each point; the last panel
# pools the tasks: the share won, and where it crosses one half.
# ```
#
# ```{glue} threshold_table
# ```
#
# The threshold is the factor the point estimates give, the interval the range the bootstrap
# draws give, and the last column the share of draws in which at least a halving is won.
# {glue:text}`answer:s` A factor counts as won when more than half of the tasks are; each task
# on its own:
#
# ```{glue} task_threshold_table
# ```
#
# ## UNCURL against from scratch
#
# Advantage of each UNCURL reduction over the from-scratch model of its size, per task
# (accuracy points, or nats of loss saved), with its interval:
#
# ```{glue} uncurl_table
# ```
#
# The paper's (Sarkar et al. 2024, Table 2 against Table 1's from-scratch rows), in accuracy
# points, single runs:
#
# ```{glue} paper_uncurl
# ```
#
# ## Greedy frequency pruning against from scratch
#
# Keeping the most-used experts and dropping the rest (the paper's Table 1 baseline):
#
# ```{glue} greedy_table
# ```
#
# The paper's:
#
# ```{glue} paper_greedy
# ```
