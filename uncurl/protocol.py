"""The study's protocol on one task (the book's Method chapter, "Protocol"), top to bottom:

1. the models: for every reduction of the profile (Z -> D by each method), the reduced models
   and the D-expert model trained from scratch that they are judged against;
2. each reduced model is made once per seed from the pretrained Z-expert model, on the task's
   training split (`uncurl.reduce`): the seed draws the sample of the task its statistics read,
   the clustering's initialisation (UNCURL's K-means), `random`'s experts and the new router, so
   that the seeds of a comparison cover the reduction's own variance;
3. every model is fine-tuned with every seed (a reduced one, its own seed's reduction, after its
   router warm-up) and scored on the task's validation split: all models of one target size D
   and all seeds as one population (`uncurl.population`), each member exactly as
   `uncurl.finetune.run` alone.

The grid of a profile is one job per (task, D) (`grid_jobs`), which `run_grid` hands to an
executor (`uncurl.executor`: the machine's cores or a Ray cluster). Finished reductions and
fine-tuning runs are found and reused, never redone.
"""

import copy
import time
from collections import Counter
from contextlib import ExitStack

from uncurl import cpu, evaluate, layout, population, tasks
from uncurl.config import ReduceConfig
from uncurl.device import resolve_device
from uncurl.executor import Job, run_jobs
from uncurl.finetune import finished, record, run_params, warm_up_router
from uncurl.model.checkpoint import digest, load_model, load_tokenizer, read_info
from uncurl.model.population import shape_key
from uncurl.reduce.save import RECORD, reduce_checkpoint

# members trained as one population at most: a member holds its weights, optimizer state, best
# weights and activations (about 180 MB each at the small profile; 70 at once took 12.5 GB)
MAX_MEMBERS = 16


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


def targets(profile) -> list[int]:
    """The target sizes D of the profile's reductions, each once, in order."""
    return list(dict.fromkeys(m["target_n_expert"] for m in study_models(profile)))


def run_task(profile, task: str, runs, progress: bool = True) -> list[dict]:
    """Reduce, warm up, fine-tune and score every model of the profile with every seed on
    `task`; the results, one per (model, seed)."""
    return [r for d in targets(profile) for r in run_job(profile, task, d, runs, progress)]


def run_job(profile, task: str, target_n_expert: int, runs, progress: bool = False) -> list[dict]:
    """One job of the grid: every model of `target_n_expert` experts (from scratch, and each
    reduction to it) with every seed, fine-tuned on `task` as one population."""
    folders, cfg = layout.Runs(runs, profile.name), profile.finetune_config(task)
    cpu.configure(cfg.threads)  # before the reductions: a job per core, each of this many threads
    members = [
        (
            starting_point(profile, task, model, seed, folders),
            seed,
            folders.finetuned(task, label(model), seed),
        )
        for model in study_models(profile)
        if model["target_n_expert"] == target_n_expert
        for seed in range(cfg.seeds)
    ]
    return run_members(members, task, cfg, profile.data_dir, profile.task_source, progress)


def run_members(members, task: str, cfg, data_dir=None, task_source="", progress=False):
    """Fine-tune and score (checkpoint, seed, out) members on `task`, those of the same shape as
    one population, and write each one's out/result.json as `uncurl.finetune.run` writes it;
    finished members are read back. The members' folders are held while they train: a second
    executor on the same runs waits for them, then reads their results back."""
    params = [run_params(c, task, seed, cfg, data_dir, task_source) for c, seed, _ in members]
    results = [finished(out, p) for (_, _, out), p in zip(members, params, strict=True)]
    with ExitStack() as held:
        todo = [out for (_, _, out), r in zip(members, results, strict=True) if r is None]
        for out in sorted(todo):  # one order for every executor: none waits on another's
            held.enter_context(layout.locked(out, wait=True))
        results = [finished(out, p) for (_, _, out), p in zip(members, params, strict=True)]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            job = [members[i] for i in todo]
            for part, trained in _train(job, task, cfg, data_dir, task_source, progress):
                for i, result in zip((todo[j] for j in part), trained, strict=True):
                    results[i] = result | {"params": params[i]}  # the same as run() records
                    layout.write_json(members[i][2] / evaluate.RESULT, results[i])
    return results


def _train(members, task: str, cfg, data_dir, task_source, progress: bool):
    """Each population's member indices and results as it ends (a job killed later keeps
    them): the members of one shape trained as populations of at most MAX_MEMBERS. The task
    is loaded once for all; a member's time is its share of its population's and of the
    loading."""
    started = time.time()
    cpu.configure(cfg.threads)
    device = resolve_device(cfg.device)
    loaded = {checkpoint: load_model(checkpoint).to(device) for checkpoint, _, _ in members}
    block_size = next(iter(loaded.values())).cfg.block_size
    data = tasks.load_task(task, _shared_tokenizer(loaded), block_size, cfg, data_dir, task_source)
    groups = {}
    for i, (checkpoint, _, out) in enumerate(members):
        layout.remove_temporaries(out)
        groups.setdefault(shape_key(loaded[checkpoint]), []).append(i)
    loading = (time.time() - started) / len(members)
    uses = Counter(checkpoint for checkpoint, _, _ in members)
    for group in groups.values():
        for at in range(0, len(group), MAX_MEMBERS):
            part = group[at : at + MAX_MEMBERS]
            began = time.time()
            trained = _population([members[i] for i in part], loaded, data, cfg, progress)
            wall = time.time() - began
            for i in part:  # a starting point no later population reads is let go
                uses[members[i][0]] -= 1
                if not uses[members[i][0]]:
                    del loaded[members[i][0]]
            population = {"members": len(part), "wall_s": wall}
            share = {"wall_s": loading + wall / len(part), "population": population}
            yield part, [r | share for r in trained]


def _population(members, loaded: dict, data, cfg, progress: bool) -> list[dict]:
    """Same-shape (checkpoint, seed, out) members warmed up, trained as one and scored."""
    started = time.time()
    models = [copy.deepcopy(loaded[checkpoint]) for checkpoint, _, _ in members]
    infos = [evaluate.describe(checkpoint) for checkpoint, _, _ in members]
    seeds = [seed for _, seed, _ in members]
    warmups = [
        warm_up_router(m, info, data, cfg, seed)
        for m, info, seed in zip(models, infos, seeds, strict=True)
    ]
    best, trained = population.train(models, data, cfg, seeds, progress)
    scores = evaluate.member_scores(best, data)
    return [
        record(checkpoint, data, seed, score, warmup, training, None, started)
        for (checkpoint, _, _), seed, score, warmup, training in zip(
            members, seeds, scores, warmups, trained, strict=True
        )
    ]


def _shared_tokenizer(loaded: dict):
    """The tokenizer every member's checkpoint carries (a population reads one task encoding)."""
    toks = [load_tokenizer(c) for c in loaded]
    if len({t.backend_tokenizer.to_str() for t in toks}) > 1:
        raise ValueError("the members of a population must share a tokenizer")
    return toks[0]


def starting_point(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The checkpoint a model's fine-tuning starts from: its pretrained run (of the pretraining
    seed the run's seed maps to), or its reduction with the run's seed."""
    if model["method"] == layout.SCRATCH:
        return folders.pretrained(model["target_n_expert"], profile.pretrain_seed(seed))
    return reduce_on_task(profile, task, model, seed, folders)


def reduce_on_task(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The pretrained source model reduced on the task's training split with `seed`, made once:
    an earlier reduction is reused only if it came from the same weights, task data, statistics
    budget and seed. Its router warm-up comes later, with the fine-tuning run's batches."""
    if (done := current_reduction(profile, task, model, seed, folders)) is not None:
        return done
    source = folders.pretrained(model["source_n_expert"], profile.pretrain_seed(seed))
    return reduce_checkpoint(
        source,
        _reduced(model, task, seed, folders),
        model["method"],
        model["target_n_expert"],
        _training_documents(profile, task, source),
        _task_data(profile, task, source),
        _reduce_config(profile, task, seed),
        force=True,  # the protocol owns this folder: a reduction with other settings is redone
    )


_DOCUMENTS: dict = {}  # a process's task training documents, per task and encoding


def _training_documents(profile, task: str, source) -> list:
    """The task's training documents as the source's tokenizer encodes them, read once per
    process (a job reduces up to 15 sources and seeds on one task; reading took 2.6 s each)."""
    cfg = profile.finetune_config(task)
    tok = load_tokenizer(source)
    block_size = read_info(source)["model"]["block_size"]
    args = (profile.data_dir, profile.task_source, cfg.val_frac, cfg.heldout_frac)
    key = (task, tok.backend_tokenizer.to_str(), block_size, *map(str, args))
    if key not in _DOCUMENTS:
        _DOCUMENTS[key] = tasks.training_documents(tasks.get_task(task), tok, block_size, *args)
    return _DOCUMENTS[key]


def current_reduction(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The model's reduction on the task with `seed` if it is there from the current source
    weights, task data, statistics budget and seed, else None."""
    out = _reduced(model, task, seed, folders)
    source = folders.pretrained(model["source_n_expert"], profile.pretrain_seed(seed))
    if not (out / RECORD).exists() or not source.exists():
        return None
    done = layout.read_json(out / RECORD)
    cfg = _reduce_config(profile, task, seed)
    current = (_task_data(profile, task, source), cfg.max_tokens, cfg.seed)
    return out if (done["task_data"], done["max_tokens"], done["seed"]) == current else None


def _reduced(model: dict, task: str, seed: int, folders: layout.Runs):
    return folders.reduced(
        model["source_n_expert"], model["method"], model["target_n_expert"], task, seed
    )


def _reduce_config(profile, task: str, seed: int) -> ReduceConfig:
    cfg = profile.finetune_config(task)
    return ReduceConfig(seed=seed, max_tokens=cfg.reduce_tokens, router_warmup_steps=0)


def _task_data(profile, task: str, source) -> str:
    """What a reduction's statistics read: it decides, with the budget, whether one is current."""
    cfg = profile.finetune_config(task)
    return (
        f"{task} train split (val_frac={cfg.val_frac}, heldout_frac={cfg.heldout_frac}, "
        f"source={profile.task_source or 'packages'}, weights {digest(source)})"
    )


# ---------------------------------------------------------------------------------- the grid


def grid_jobs(profile, runs) -> list[Job]:
    """The profile's fine-tuning grid: one job per (task, target size D), each a population of
    every model of D experts with every seed (`run_job`); a job whose results are all there
    with their current parameters is done. The largest jobs come first, so that the last to
    finish are short ones and no core idles long while one big job ends."""
    folders = layout.Runs(runs, profile.name)
    size = Counter(m["target_n_expert"] for m in study_models(profile))
    jobs = [
        Job(
            f"{task} d{d}",
            run_job,
            (profile, task, d, str(runs)),
            folders.job_log(f"{task}-d{d}"),
            _job_done(profile, task, d, folders),
        )
        for task in profile.all_tasks
        for d in targets(profile)
    ]
    return sorted(jobs, key=lambda j: -size[j.args[2]])  # stable: task order among equals


def run_grid(profile, runs, executor: str = "local", address: str | None = None) -> list[dict]:
    """Every job of the grid through `executor` ("local": a process per core; "ray": a Ray
    cluster, at `address` or started here), then every result, task by task."""
    run_jobs(grid_jobs(profile, runs), executor, address)
    return [r for task in profile.all_tasks for r in run_task(profile, task, runs, False)]


def _job_done(profile, task: str, d: int, folders: layout.Runs) -> bool:
    """Whether every member of the job has its result, from its current starting point."""
    cfg = profile.finetune_config(task)
    for model in study_models(profile):
        if model["target_n_expert"] != d:
            continue
        for seed in range(cfg.seeds):
            start = _current_start(profile, task, model, seed, folders)
            out = folders.finetuned(task, label(model), seed)
            if start is None or finished(out, _params(profile, task, start, seed)) is None:
                return False
    return True


def _params(profile, task: str, checkpoint, seed: int) -> dict:
    cfg = profile.finetune_config(task)
    return run_params(checkpoint, task, seed, cfg, profile.data_dir, profile.task_source)


def _current_start(profile, task: str, model: dict, seed: int, folders: layout.Runs):
    """The starting point if it is there and up to date, else None (it is yet to be made)."""
    if model["method"] == layout.SCRATCH:
        path = folders.pretrained(model["target_n_expert"], profile.pretrain_seed(seed))
        return path if path.exists() else None
    return current_reduction(profile, task, model, seed, folders)
