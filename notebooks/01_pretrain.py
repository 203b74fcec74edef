# %% [markdown]
# # Pretrain one model
#
# Trains (or resumes, or finds finished) one model of the profile: the dense backbone or an SMoE
# with `n_expert` experts in every MoE layer, once per pretraining seed of the profile (its
# initialisation and data order). Each run folder keeps the checkpoint, the metrics of every step
# and a summary; the report notebooks read those.

# %% tags=["hide-input", "parameters"]
profile: str = "smoke"  # profile in uncurl/profiles.toml: model shape, training recipe, data
n_expert: int = 4  # experts per MoE layer (1: the dense backbone)
runs: str = "runs"  # the run goes to {runs}/{profile}/dense or {runs}/{profile}/e{n_expert}
out: str = "build/smoke/01_pretrain"  # folder for this step's results

# %% tags=["hide-input"]
import time

from uncurl import data, layout
from uncurl.config import get_profile
from uncurl.report import records
from uncurl.train import train

started = time.time()
cfg = get_profile(profile)
vocab_size = data.load_meta(cfg.data_dir)["vocab_size"]
model_cfg = cfg.model_config(n_expert=n_expert, vocab_size=vocab_size)
folders = layout.Runs(runs, profile)

# %% tags=["hide-input"]
summaries = {
    seed: train(
        folders.pretrained(n_expert, seed),
        model_cfg,
        cfg.train_config(seed=seed),
        cfg.data_dir,
        progress=False,
    )
    for seed in cfg.pretrain_seeds
}

# %% tags=["hide-input"]
records.write_results(
    out,
    {"profile": profile, "n_expert": n_expert, "runs": runs},
    started,
    values=summaries[cfg.pretrain_seeds[0]],
    outputs=[
        folders.pretrained(n_expert, seed) / name
        for seed in cfg.pretrain_seeds
        for name in (layout.CHECKPOINT, layout.SUMMARY, layout.METRICS)
    ],
)
