# %% [markdown]
# # Data
#
# Prepares the profile's corpus once (document-level splits, a tokenizer fitted on the training
# split, flat token arrays) and records what it holds, and fetches the packages that hold its
# labelled tasks. Every later step reads the prepared folder.

# %% tags=["hide-input", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml whose data to prepare
out: str = "build/smoke/00_data"  # folder for this step's results

# %% tags=["hide-input"]
import time

from uncurl import data, tasks
from uncurl.config import get_profile
from uncurl.report import pretraining, records

started = time.time()
cfg = get_profile(profile)

# %% tags=["hide-input"]
data_dir = data.prepare_profile(cfg)
task_files = tasks.fetch_packages(cfg.all_tasks, cfg.task_source)

# %% tags=["hide-input"]
meta = data.load_meta(data_dir)

# %% tags=["hide-input"]
corpus = pretraining.corpus_table(meta)

# %% tags=["hide-input"]
records.write_results(
    out,
    {"profile": profile},
    started,
    tables={"corpus": corpus},
    values={"data_dir": str(data_dir), "vocab_size": meta["vocab_size"], "hash": meta["hash"]},
    outputs=[data_dir / "meta.json"],
)
