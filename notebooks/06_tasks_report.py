# %% [markdown]
# # Tasks: reduced models against smaller ones trained from scratch
#
# The paper's protocol (Sarkar et al. 2024, section 5): a pretrained SMoE with Z experts per MoE
# layer is reduced to D experts on a task's own training data, its routers are warmed up, the
# whole model is fine-tuned on the task and scored on the task's validation split. A reduced model
# is worth having if it beats the SMoE with D experts trained from scratch, which costs the same at
# inference; both get the same fine-tuning.
#
# The paper fine-tunes on six SuperGLUE tasks, one run each, and reads differences of a few tenths
# of a point as wins. We cannot download SuperGLUE here, and our models are tiny, so we use tasks
# that ship in package registries, fine-tune every model with several seeds, and give every number a
# {glue:text}`level_pct:s` interval: a bootstrap over validation examples and seeds. A reduced model
# is marked (+) or (-) against its from-scratch equivalent only when the paired interval of the
# difference excludes zero, (=) otherwise.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose fine-tuning results to report
runs: str = "runs"  # results under {runs}/{profile}/finetune (the finetune step writes them)
out: str = "build/smoke/06_tasks_report"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl import evaluate
from uncurl.config import get_profile
from uncurl.report import paper, records, style
from uncurl.report import tasks as chapter

started = time.time()
cfg = get_profile(profile)
out = Path(out)
style.use_style()
results = chapter.load(runs, cfg)

# %% tags=["remove-cell"]
table = chapter.task_table(results, cfg)
summary = evaluate.summary(results)
comparisons = evaluate.adjust(evaluate.comparisons(results), cfg.tasks)
heldout = evaluate.summary(results, split="heldout")
scratch = chapter.from_scratch(summary, heldout, table)
readable = chapter.readable_tasks(table, scratch)

# %% tags=["remove-cell"]
fig_tasks = chapter.plot_tasks(summary, table)

# %% tags=["remove-cell"]
values = chapter.headline(results, table, scratch, comparisons, cfg)
harness_model, harness_table = chapter.harness_check(runs, cfg)
values |= chapter.harness_values(harness_model, harness_table)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "runs": runs},
    started,
    values=values,
    tables={
        "results": evaluate.tidy(results),
        "summary": summary,
        "heldout_summary": heldout,
        "comparisons": comparisons,
        "tasks": table,
        "from_scratch": scratch,
        "harness": harness_table,
    },
)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_tasks", style.save_figure(fig_tasks, out / "tasks.png"), display=False)
glue(
    "tasks_table",
    style.display_table(
        table.drop(columns=["appendix"]),
        {"chance": "{:.1%}", "majority": "{:.1%}", "heldout_majority": "{:.1%}"},
    ),
    display=False,
)
glue("results_table", style.display_table(chapter.results_table(summary, cfg)), display=False)
glue(
    "comparison_table",
    style.display_table(chapter.comparison_table(comparisons[comparisons["task"].isin(readable)])),
    display=False,
)
glue(
    "verdict_table",
    style.display_table(chapter.verdict_counts(comparisons, readable)),
    display=False,
)
glue(
    "scratch_table",
    style.display_table(
        scratch[~scratch["appendix"]].drop(columns=["appendix"]),
        {
            c: "{:.1%}"
            for c in scratch.columns
            if c in ("chance", "majority", "mean", "ci_low", "ci_high", "margin")
            or c.startswith("heldout_")
        },
    ),
    display=False,
)
glue(
    "appendix_table",
    style.display_table(
        chapter.appendix_table(scratch, readable), {"chance": "{:.1f}", "majority": "{:.1f}"}
    ),
    display=False,
)
glue(
    "paper_table",
    style.display_table(chapter.paper_table(cfg), dict.fromkeys(paper.SUPERGLUE_TASKS, "{:.2f}")),
    display=False,
)

# %% [markdown]
# ## The tasks
#
# {glue:text}`n_tasks:d` tasks, {glue:text}`n_lm_tasks:d` of them language modelling of one
# domain of our corpus (metric: validation loss; the domain's validation documents were never
# trained on, in pretraining either) and {glue:text}`n_labelled_tasks:d` labelled tasks from
# package registries (metric: accuracy, by ranking the candidate answers by log-likelihood, as
# lm-evaluation-harness does). lm-evaluation-harness itself, given the same validation examples
# (the prompts our models see and the same candidate answers, written out as its tasks), scores
# the pretrained {glue:text}`harness_model:s` model, before fine-tuning, as we do on
# {glue:text}`harness_agree:d` of {glue:text}`harness_examples:d` examples (its accuracy, then
# ours: {glue:text}`harness_tasks:s`). It reads text, not our token ids:
# {glue:text}`harness_retokenised:d` of the prompts, cut inside a word, re-encode to other tokens,
# and our model scored on its tokens gives its answer on {glue:text}`harness_their_ids_agree:d`
# examples. Splits of a labelled task are decided by a hash of its text (up to
# case, punctuation and links) or of the premise it shares with other examples, so an example is
# in the same split on every machine, near-duplicates cannot straddle two splits, and texts whose
# copies disagree on the label are dropped; early stopping reads a held-out part of the training
# split, never the validation split.
#
# ```{glue} tasks_table
# ```
#
# BIG-bench's `winowhy`, `presuppositions_as_nli` and `strategyqa` stand in for the paper's WSC,
# CB and BoolQ; we expected models of this size to stay near chance on them and keep them in an
# appendix table at the end rather than drop them.

# %% [markdown]
# ## Do the models learn the tasks?
#
# A labelled task counts only if the from-scratch models beat the majority-class baseline by more
# than their interval, and this is decided on the held-out split, not on the validation split
# whose verdicts it filters: the lower end of the interval of their held-out accuracy must lie
# above the held-out majority share (the share of the most frequent answer among the held-out
# examples themselves, a slightly generous baseline). The held-out examples are part of the
# training split that no model trained on; early stopping chose each run's weights by their loss,
# which flatters held-out accuracy a little, the same for every task. Learned by every from-scratch model: {glue:text}`learned:s`. Not learned:
# {glue:text}`not_learned:s`; of the main list: {glue:text}`main_not_learned:s`. The main
# labelled tasks:
#
# ```{glue} scratch_table
# ```
#
# Tasks not learned are left out of the verdicts below: a comparison between two models at chance
# says nothing about reduction.

# %% [markdown]
# ## Every model on every task
#
# ```{glue:figure} fig_tasks
# :name: fig-tasks
# :alt: Accuracy or validation loss with bootstrap intervals, per task and model
#
# Mean over seeds and {glue:text}`level_pct:s` bootstrap interval (validation examples and seeds
# resampled) of every model on every task. Dashed: majority-class share; dotted: chance.
# ```
#
# ```{glue} results_table
# ```
#
# Each cell is the mean over {glue:text}`seeds:d` fine-tuning seeds with its
# {glue:text}`level_pct:s` interval; accuracy in per cent, loss in nats per token. Model names: `eX`
# is an SMoE with X experts per MoE layer trained from scratch; `eZ-method-dD` was trained with Z
# and reduced to D by `method` on the task.

# %% [markdown]
# ## Reduced against from scratch
#
# Paired comparison of every reduced model with the from-scratch model of its size, on the same
# validation examples and seeds, for the domain tasks and the learned labelled tasks. Differences
# are reduced minus from scratch (accuracy points, or loss, where lower is better); the raw verdict
# is (+) or (-) when the {glue:text}`level_pct:s` interval excludes zero. With many comparisons some
# raw calls are expected by chance, so the calls are also made after Holm's adjustment of the
# bootstrap p-values over the comparisons of the profile's main tasks (a family fixed before the
# results, the appendix tasks outside it), which keeps the chance of any false call among them
# as low as that of a single interval. Of {glue:text}`n_comparisons:d` comparisons,
# {glue:text}`n_plus:d` are (+), {glue:text}`n_equal:d` (=) and {glue:text}`n_minus:d` (-) raw,
# and {glue:text}`n_plus_holm:d`, {glue:text}`n_equal_holm:d` and {glue:text}`n_minus_holm:d`
# after the adjustment.
#
# ```{glue} comparison_table
# ```
#
# ```{glue} verdict_table
# ```
#
# For scale, the paper's single-run SuperGLUE accuracies (%) of the same kinds of models
# (Sarkar et al. 2024, Table 1), pretrained on {glue:text}`paper_tokens:s` tokens at
# {glue:text}`paper_backbone:s` parameters per backbone:
#
# ```{glue} paper_table
# ```

# %% [markdown]
# ## How it was run
#
# Every model gets the same recipe: AdamW at learning rate {glue:text}`lr:g` with
# {glue:text}`lr_warmup_steps:d` learning-rate warm-up steps and linear decay, batches of about
# {glue:text}`batch_tokens:d` tokens, at most {glue:text}`max_steps:d` steps (adjusted for some
# tasks, the same for every model on them: {glue:text}`task_adjustments:s`), held-out loss every {glue:text}`eval_interval:d` steps and a
# stop after {glue:text}`patience:d` evaluations without improvement, keeping the best weights.
# Labelled tasks train on the negative log-likelihood of the right answer; reduced models first
# train only their routers for {glue:text}`router_warmup_steps:d` steps. Scoring is dropless (no
# expert capacity), so an example's score does not depend on its batch.
# {glue:text}`n_runs:d` fine-tuning runs took {glue:text}`total_run_min:.1f` minutes in all, a
# median of {glue:text}`median_run_s:.1f` s per run, {glue:text}`threads:d` thread(s) each.
#
# What the intervals cover: dropout is off; a from-scratch model's seeds vary the order of its
# training data, and a reduced model's seeds each make their own reduction too (the sample of
# task tokens its statistics read, UNCURL's K-means initialisation, `random`'s experts, the new
# router) before the router warm-up and the data order. The bootstrap resamples the pretraining
# seeds, then the seeds within each, then the validation units. This profile pretrains
# {glue:text}`pretrain_seeds:d` model(s) per expert count; with one, the intervals say nothing
# about the variation between pretraining runs, which the `full` profile's two measure. For the
# domain tasks the resampled units are not the
# windows of {glue:text}`window_tokens:d` tokens, which are correlated within a document, but
# blocks of {glue:text}`unit_windows:d` consecutive windows ({glue:text}`unit_tokens:d` tokens)
# of one validation document, whole units drawn in a fixed pseudo-random order until the windows
# scored are taken ({glue:text}`val_units:s` units). They come from few validation documents per
# domain ({glue:text}`val_documents:s`), so the intervals cover the variation between passages of
# those documents, not between documents; correlation across neighbouring blocks still makes them
# somewhat narrow.

# %% [markdown]
# ## Appendix: tasks the models do not learn
#
# The paper's SuperGLUE relatives from BIG-bench, and any main labelled task the from-scratch
# models did not learn, with chance, the majority-class share and the from-scratch accuracy (%):
#
# ```{glue} appendix_table
# ```
#
# BIG-bench's `winowhy`, `presuppositions_as_nli` and `strategyqa` stand in for WSC, CB and BoolQ.
# Their examples share premises, so they are split by premise (winowhy by its Winograd sentence,
# `presuppositions_as_nli` by its first sentence), and no validation premise is seen in training.
