# %% [markdown]
# # The paper's claims, checked
#
# Every claim of the paper's abstract, introduction and conclusion, as a row: the claim, the
# paper's evidence, this build's evidence (from the chapters before this one), and a verdict by
# the rule the row states: reproduced, not reproduced, or inconclusive at this scale. Of
# {glue:text}`n_claims:d` claims, {glue:text}`n_reproduced:d` are reproduced,
# {glue:text}`n_not:d` are not and {glue:text}`n_inconclusive:d` are inconclusive at this
# build's scale. A verdict holds for this build's profile only: its models are far smaller and
# far shorter trained than the paper's, pretrained once each, and fine-tuned directly on each
# task without the paper's instruction-tuning stage (the Method chapter says why).

# %% tags=["remove-cell", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose study to check the claims on
build: str = "build/smoke"  # the profile's build folder, where the other chapters' results are
out: str = "build/smoke/10_claims"  # folder for this step's table

# %% tags=["remove-cell"]
import time
from pathlib import Path

from myst_nb import glue

from uncurl.report import claims, records, style

started = time.time()
out = Path(out)

# %% tags=["remove-cell"]
table = claims.table(claims.load(build))
values = claims.headline(table)

# %% tags=["remove-cell"]
records.write_results(
    out, {"profile": profile, "build": build}, started, values=values, tables={"claims": table}
)
for key, value in values.items():
    glue(key, value, display=False)
glue("claims_table", style.display_table(table), display=False)

# %% [markdown]
# ```{glue} claims_table
# ```
