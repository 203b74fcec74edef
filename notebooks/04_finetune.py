# %% [markdown]
# # Fine-tune every model on every task
#
# The profile's fine-tuning grid: for each task, reduce each source model on the task's training
# split (every method of the profile's `reductions`), then fine-tune every model, reduced or
# trained from scratch, with every seed, and score it on the task's validation split. All models
# of one target size and all seeds train as one population, each member exactly as alone
# (`uncurl.protocol.run_grid`); the jobs, one per task and target size, run on this machine's
# cores or on a Ray cluster (`python -m uncurl.study --executor ray`). Reduced models get the
# router warm-up first. Finished reductions and fine-tuning runs are reused; results go to
# `{runs}/{profile}/finetune/{task}/{model}/s{seed}/result.json`, which the tasks chapter reads.

# %% tags=["hide-input", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml: tasks, reductions, fine-tuning recipe
runs: str = "runs"  # pretrained models in {runs}/{profile}; results under {runs}/{profile}/finetune
out: str = "build/smoke/04_finetune"  # folder for this step's results

# %% tags=["hide-input"]
import statistics
import time

from uncurl import evaluate, executor, layout, protocol
from uncurl.config import get_profile
from uncurl.report import records

started = time.time()
settings = get_profile(profile)
results = protocol.run_grid(settings, runs, *executor.configured())

# %% tags=["hide-input"]
summary = evaluate.summary(results)
summary

# %% tags=["hide-input"]
records.write_results(
    out,
    {"profile": profile, "runs": runs},
    started,
    tables={"summary": summary},
    values={"runs": len(results), "median_run_s": statistics.median(r["wall_s"] for r in results)},
    outputs=sorted(layout.Runs(runs, profile).finetune.glob(f"*/*/*/{layout.RESULT}")),
)
