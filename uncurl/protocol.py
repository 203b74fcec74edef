"""The study's protocol on one task (the book's Method chapter, "Protocol"), top to bottom:

1. the models: for every reduction of the profile (Z -> D by each method), the reduced models
   and the D-expert model trained from scratch that they are judged against;
2. each reduced model is made once per seed from the pretrained Z-expert model, on the task's
   training split (`uncurl.reduce`): the seed draws the sample of the task its statistics read,
   the clustering's initialisation (UNCURL's K-means), `random`'s experts and the new router, so
   that the seeds of a comparison cover the reduction's own variance;
3. every model is fine-tuned with every seed (a reduced one, its own seed's reduction, after its
   router warm-up) and scored on the task's validation split (`uncurl.finetune.run`).

Finished reductions and fine-tuning runs are found and reused, never redone.
"""

from tqdm import tqdm

from uncurl import layout, tasks
from uncurl.config import ReduceConfig
from uncurl.finetune import run
from uncurl.model.checkpoint import digest, load_tokenizer, read_info
from uncurl.reduce.save import RECORD, reduce_checkpoint


def study_models(profile) -> list[dict]:
    """Every model the profile fine-tunes, as {source_n_expert, method, target_n_expert}: each
    reduction's from-scratch D-expert reference first, then its reduced models."""
    models = []
    for spec in profile.reductions:
        z, d = spec["source_n_expert"], spec["target_n_expert"]
        models += [layout.parse_label(layout.model_label(d))]
        models += [layout.parse_label(layout.model_label(d, m, z)) for m in spec["methods"]]
    return [dict(m) for m in dict.fromkeys(tuple(m.items()) for m in models)]  # each once


def label(model: dict) -> str:
    return layout.model_label(model["target_n_expert"], model["method"], model["source_n_expert"])


def run_task(profile, task: str, runs, progress: bool = True) -> list[dict]:
    """Reduce, warm up, fine-tune and score every model of the profile with every seed on
    `task`; the results, one per (model, seed)."""
    folders, cfg = layout.Runs(runs, profile.name), profile.finetune_config(task)
    jobs = [(model, seed) for model in study_models(profile) for seed in range(cfg.seeds)]
    results = []
    for model, seed in tqdm(jobs, desc=f"{task}: models x seeds", disable=not progress):
        checkpoint = starting_point(profile, task, model, seed, folders)
        out = folders.finetuned(task, label(model), seed)
        results.append(run(checkpoint, task, seed, out, cfg, profile.data_dir, profile.task_source))
    return results


def starting_point(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The checkpoint a model's fine-tuning starts from: its pretrained run, or its reduction
    with the run's seed."""
    if model["method"] == layout.SCRATCH:
        return folders.pretrained(model["target_n_expert"])
    return reduce_on_task(profile, task, model, seed, folders)


def reduce_on_task(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The pretrained source model reduced on the task's training split with `seed`, made once:
    an earlier reduction is reused only if it came from the same weights, task data, statistics
    budget and seed. Its router warm-up comes later, with the fine-tuning run's batches."""
    cfg = profile.finetune_config(task)
    source = folders.pretrained(model["source_n_expert"])
    out = folders.reduced(
        model["source_n_expert"], model["method"], model["target_n_expert"], task, seed
    )
    reduce_cfg = ReduceConfig(seed=seed, max_tokens=cfg.reduce_tokens, router_warmup_steps=0)
    task_data = (
        f"{task} train split (val_frac={cfg.val_frac}, heldout_frac={cfg.heldout_frac}, "
        f"source={profile.task_source or 'packages'}, weights {digest(source)})"
    )
    if (out / RECORD).exists():
        done = layout.read_json(out / RECORD)
        if (done["task_data"], done["max_tokens"], done["seed"]) == (
            task_data,
            reduce_cfg.max_tokens,
            reduce_cfg.seed,
        ):
            return out
    docs = tasks.training_documents(
        tasks.get_task(task),
        load_tokenizer(source),
        read_info(source)["model"]["block_size"],
        profile.data_dir,
        profile.task_source,
        cfg.val_frac,
        cfg.heldout_frac,
    )
    return reduce_checkpoint(
        source,
        out,
        model["method"],
        model["target_n_expert"],
        docs,
        task_data,
        reduce_cfg,
        force=True,  # the protocol owns this folder: a reduction with other settings is redone
    )
