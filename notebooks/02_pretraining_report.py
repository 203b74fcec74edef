# %% [markdown]
# # Pretraining
#
# Every model of the study is pretrained with one recipe and differs only in the number of
# experts per MoE layer. This copy of the book was built at the {glue:text}`profile:s` profile:
# {glue:text}`n_models:d` models ({glue:text}`expert_counts:s` experts per MoE layer), each
# trained for {glue:text}`steps:d` steps, that is {glue:text}`tokens:s` tokens, on the same data.
# Training took {glue:text}`total_train_time:s`, summed over the runs (the study trains two at a time), on {glue:text}`hardware:s`.
#
# Sarkar et al. (2024) pretrain a {glue:text}`paper_backbone:s` dense backbone and SMoE versions
# of it with {glue:text}`paper_experts:s` experts for {glue:text}`paper_tokens:s` tokens; their
# Fig. 6 shows every added expert lowering the validation loss throughout training. This chapter
# puts our curves beside theirs.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose pretraining runs to report
runs: str = "runs"  # parent of the run folders ({runs}/{profile}/dense, e4, ...)
out: str = "build/smoke/02_pretraining_report"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl import data
from uncurl.config import get_profile
from uncurl.report import paper, pretraining, records, style

started = time.time()
cfg = get_profile(profile)
out = Path(out)
style.use_style()

# %% tags=["remove-cell"]
models, curves = pretraining.load_pretraining(runs, cfg)

# %% tags=["remove-cell"]
fig_curves = pretraining.plot_loss_curves(curves, paper.pretraining_curves(), profile)

# %% tags=["remove-cell"]
fig_params = pretraining.plot_loss_vs_params(models)

# %% tags=["remove-cell"]
corpus = pretraining.corpus_table(data.load_meta(cfg.data_dir))

# %% tags=["remove-cell"]
values = pretraining.pretraining_headline(models, cfg)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "runs": runs},
    started,
    values=values,
    tables={"models": models, "curves": curves, "corpus": corpus},
)
for key, value in values.items():
    glue(key, value, display=False)
glue("fig_loss_curves", style.save_figure(fig_curves, out / "loss_curves.png"), display=False)
glue("fig_loss_params", style.save_figure(fig_params, out / "loss_params.png"), display=False)
glue("models_table", pretraining.models_table(models), display=False)
glue("corpus_table", style.display_table(corpus, {"MB": "{:.2f}"}), display=False)
glue("profiles_table", style.display_table(pretraining.profiles_table()), display=False)

# %% [markdown]
# ## Validation loss during training
#
# ```{glue:figure} fig_loss_curves
# :name: fig-loss-curves
# :alt: Validation loss against training tokens for each expert count, ours beside the paper's
#
# Validation loss on the held-out split against training tokens, one line per expert count.
# (a) Our models. (b) The paper's models on its {glue:text}`paper_backbone:s` backbone
# (Sarkar et al. 2024, Fig. 6, values read off the plot); note the token scales.
# ```
#
# At the end of training {glue:text}`moe_vs_dense:s`. The dense model ends at
# {glue:text}`dense_val_loss:.3f` nats per token, the best MoE model ({glue:text}`best_moe:s`) at
# {glue:text}`best_moe_val_loss:.3f`, {glue:text}`best_moe_vs_dense:s` the dense model.

# %% [markdown]
# ## Loss against parameters
#
# ```{glue:figure} fig_loss_params
# :name: fig-loss-params
# :alt: Final validation loss against total and against active parameters
#
# Final validation loss against (a) the total parameter count, which grows with every expert, and
# (b) the parameters active for one token, which stay those of the dense backbone plus the routers
# with top-1 routing.
# ```
#
# An SMoE buys parameters without buying compute per token: with top-1 routing every model here
# spends about the same arithmetic on a token, and only the number of parameters it can choose
# from grows.

# %% [markdown]
# ## The trained models
#
# ```{glue} models_table
# ```
#
# Wall time is the training loop's own time (evaluations included, start-up excluded). The
# validation loss is the mean over the same fixed validation windows for every model, at the
# evaluation capacity factor.
#
# ## The data
#
# Every model reads the same prepared data; tokens per split and domain:
#
# ```{glue} corpus_table
# ```
