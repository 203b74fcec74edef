# %% [markdown]
# # Performance-equivalent dense size
#
# Sarkar et al. (2024, Fig. 2b) motivate pretraining with many experts by the *unified scaling law
# for routed language models* of Clark et al. (2022): a {glue:text}`paper_backbone:s` backbone with
# X experts per MoE layer should be worth a much larger dense model. The law models the validation
# loss L of a routed model with a dense backbone of N parameters and E experts per routed layer as
#
# $$
# \log_{10} L(N, E) = a \log_{10} N + b \log_{10} \hat E + c \log_{10} N \log_{10} \hat E + d,
# \qquad
# \frac{1}{\hat E} = \frac{1}{E - 1 + \left(\frac{1}{E_\text{start}} -
# \frac{1}{E_\text{max}}\right)^{-1}} + \frac{1}{E_\text{max}},
# $$
#
# where $\hat E$ saturates: it is $E_\text{start}$ for a dense model and never exceeds
# $E_\text{max}$. Clark et al.'s fitted coefficients for S-BASE routing (BASE layers balanced by
# Sinkhorn iterations):
#
# ```{glue} law_table
# ```
#
# The *performance-equivalent dense size* N' of a routed model is the size of the dense model with
# the same predicted loss. Two readings exist: N' solving $a \log N' + d = \log L(N, E)$ (the dense
# law without the routing terms, the reading of this project's specification), and
# Clark et al.'s own *Effective Parameter Count*, N' solving $L(N', 1) = L(N, E)$, which gives a
# dense model exactly its own size.

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose trained models to fit
runs: str = "runs"  # parent of the run folders ({runs}/{profile}/dense, e4, ...)
level: float = 0.95  # confidence level of every interval
out: str = "build/smoke/03_dense_equivalent"  # folder for this step's tables and figures

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl.config import get_profile
from uncurl.report import dense_equivalent, paper, pretraining, records, scaling, style

started = time.time()
cfg = get_profile(profile)
out = Path(out)
law = scaling.CLARK_S_BASE
style.use_style()

# %% tags=["remove-cell"]
comparison = scaling.paper_comparison(
    paper.BACKBONE_PARAMS, paper.DENSE_EQUIVALENT, paper.DENSE_EQUIVALENT, law
)

# %% tags=["remove-cell"]
k, k_se, fitted = scaling.fit_paper_exponent(paper.BACKBONE_PARAMS, paper.DENSE_EQUIVALENT)

# %% tags=["remove-cell"]
sizes = dense_equivalent.paper_model_sizes(comparison["n_expert"])

# %% tags=["remove-cell"]
fig_paper = dense_equivalent.plot_dense_equivalent(comparison, fitted, sizes)

# %% tags=["remove-cell"]
models, _ = pretraining.load_pretraining(runs, cfg)

# %% tags=["remove-cell"]
fit = scaling.fit_fixed_size(models["n_expert"], models["val_loss"], law)

# %% tags=["remove-cell"]
ratios = scaling.dense_equivalent_from_fit(fit, models["n_expert"], law.dense_exponent, law, level)

# %% tags=["remove-cell"]
clark = dense_equivalent.clark_ratios(
    law, dense_equivalent.backbone_params(models), models["n_expert"]
)

# %% tags=["remove-cell"]
fig_ours = dense_equivalent.plot_fixed_size_fit(models, fit, ratios, clark, law)

# %% tags=["remove-cell"]
values = dense_equivalent.dense_equivalent_headline(
    comparison, k, k_se, fit, ratios, models, law, level
)

# %% tags=["remove-cell"]
records.write_results(
    out,
    {"profile": profile, "runs": runs, "level": level},
    started,
    values=values,
    tables={"paper_comparison": comparison, "our_ratios": ratios, "law": scaling.law_table(law)},
)
for key, value in values.items():
    glue(key, value, display=False)
glue("law_table", style.display_table(scaling.law_table(law), "{:g}"), display=False)
glue(
    "paper_table", dense_equivalent.dense_equivalent_table(comparison, fitted, sizes), display=False
)
glue("ratios_table", dense_equivalent.ratios_table(ratios, level), display=False)
glue("fig_paper", style.save_figure(fig_paper, out / "paper_dense_equivalent.png"), display=False)
glue("fig_ours", style.save_figure(fig_ours, out / "our_dense_equivalent.png"), display=False)

# %% [markdown]
# ## The paper's backbone with X experts
#
# ```{glue:figure} fig_paper
# :name: fig-paper-dense-equivalent
# :alt: Dense-equivalent size of the paper's models by expert count, by the paper and by the law
#
# Performance-equivalent dense size of the paper's {glue:text}`paper_backbone:s` backbone with X
# experts per MoE layer: the values read off Sarkar et al.'s Fig. 2b, Clark et al.'s S-BASE law in
# both readings, the law's form fitted to the paper's values, and the routed model's total parameter
# count.
# ```
#
# ```{glue} paper_table
# ```
#
# Evaluated with the published S-BASE coefficients, the law does not reproduce the paper's figure.
# At X = {glue:text}`paper_first_x:d` it gives {glue:text}`law_first_b:.2f` B (reading
# $a \log N' + d = \log L$) or {glue:text}`epc_first_b:.2f` B (Clark et al.'s Effective
# Parameter Count) where the paper shows about {glue:text}`paper_first_b:.2f` B; at
# X = {glue:text}`paper_last_x:d` it gives {glue:text}`law_last_b:.2f` B or
# {glue:text}`epc_last_b:.2f` B against the paper's {glue:text}`paper_last_b:.1f` B. The law
# saturates ($\hat E$ cannot exceed $E_\text{max}$ = {glue:text}`e_max:.0f`), so its curve
# flattens beyond a few hundred experts, while the paper's keeps steepening. At a fixed backbone
# the law's form leaves one free number, $\log_{10}(N'/N) = k \log_{10} \hat E$ with
# $k = (b + c \log_{10} N) / a$; fitting it to the paper's values (with $\hat E = E$, since
# saturation only makes the fit worse) gives k = {glue:text}`paper_k:.3f` ± {glue:text}`paper_k_se:.3f`,
# and even that line misses the paper's upward curvature. We could not find which coefficients or
# which reading of the law produce the paper's figure; the difference does not change the
# qualitative point the paper makes (N' grows with X while the compute per token does not).

# %% [markdown]
# ## Our models
#
# The same quantity for the models of this study. All of them share one backbone, so of the law's
# six numbers they identify only two: at a fixed N the law is a straight line
# $\log_{10} L = \alpha + \beta \log_{10} \hat E$ with $\alpha = a \log_{10} N + d$ and
# $\beta = b + c \log_{10} N$. We fit that line to the {glue:text}`our_n_models:d` models
# ({glue:text}`our_dof:d` degrees of freedom), keeping Clark et al.'s $E_\text{start}$ and
# $E_\text{max}$, and obtain $\beta$ = {glue:text}`our_beta:.4f`
# ({glue:text}`level_pct:s` interval {glue:text}`our_beta_lo:.4f` to {glue:text}`our_beta_hi:.4f`,
# $R^2$ = {glue:text}`our_r2:.2f`): {glue:text}`our_sign:s`.
#
# Turning $\beta$ into a dense-equivalent size needs how fast the loss falls with the dense size,
# $a + c \log_{10} E_\text{start}$, which models of one size cannot measure; we borrow Clark et al.'s
# value ({glue:text}`dense_exponent:.4f`): $\log_{10}(N'/N) = \beta \,(\log_{10} \hat E -
# \log_{10} E_\text{start}) / (a + c \log_{10} E_\text{start})$.
#
# ```{glue:figure} fig_ours
# :name: fig-our-dense-equivalent
# :alt: Our models' final loss against the expert count with the fitted line, and the implied N'/N
#
# (a) Final validation loss of our models against the expert count with the fitted line and its
# confidence band. (b) The dense-equivalent size relative to our backbone implied by the fit, with
# the interval from the uncertainty of beta, beside what Clark et al.'s law predicts at our size.
# ```
#
# ```{glue} ratios_table
# ```
#
# With {glue:text}`our_max_x:d` experts our fit puts the dense-equivalent size at
# {glue:text}`our_ratio_max:.3g` times our {glue:text}`our_params:s`-parameter backbone
# ({glue:text}`level_pct:s` interval {glue:text}`our_ratio_max_lo:.3g` to
# {glue:text}`our_ratio_max_hi:.3g`); Clark et al.'s law, extrapolated far below the sizes it was
# fitted on (tens of millions of parameters and more), predicts {glue:text}`clark_ratio_max:.3g`.
#
# What this can and cannot say:
#
# - The interval covers only the statistical uncertainty of $\beta$ from a handful of models
#   (one training seed each, so seed-to-seed noise sits in the residuals rather than being
#   measured), not the borrowed dense exponent: if the dense loss fell twice as fast with size as
#   Clark et al.'s fit says, every $\log(N'/N)$ here would halve.
# - $a$, $c$ and $d$ are not identified at all, nor are $E_\text{start}$ and $E_\text{max}$;
#   identifying them needs backbones of several sizes, each with several expert counts.
# - Clark et al. fit models trained for far longer on far more text; our models see a few million
#   tokens, and a model with more parameters per token is further from convergence after the same
#   number of tokens, which biases the comparison against the MoE models.
