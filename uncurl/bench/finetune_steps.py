"""A worker process of `python -m uncurl.bench finetune`: fine-tuning steps of M members, on
whatever `uncurl` its path holds first, so that one benchmark times today's revision and an
earlier one side by side. Only names both revisions have are used: the population path where
there is one (`uncurl.population`), else one model through `uncurl.finetune.task_loss`.

    python -c "import runpy, sys; sys.path.insert(0, TREE); runpy.run_path(THIS_FILE,
        run_name='__main__')" PROFILE TASK N_EXPERT MEMBERS DATA_DIR

It sets up, runs warm-up steps and prints `ready`; then for each line N it reads, it runs N
steps and prints their CPU seconds and tokens; for a line `profile N`, it runs N steps under
torch.profiler and prints each operator's self CPU microseconds, as one line of JSON.
"""

import dataclasses
import json
import sys
import time

import torch


def main(profile_name: str, task: str, n_expert: int, members: int, data_dir: str) -> None:
    from uncurl import cpu, data
    from uncurl.config import get_profile
    from uncurl.model import GPT
    from uncurl.tasks import load_task, training_batches

    try:
        from uncurl.optim import make_optimizer
    except ImportError:  # revisions before uncurl.optim
        from uncurl.train import make_optimizer

    cpu.configure(1)
    profile = get_profile(profile_name)
    if data_dir:  # as the benchmark's --data-dir (a profile's data name may be a path)
        profile = dataclasses.replace(profile, data={**profile.data, "name": data_dir})
    cfg = profile.finetune_config(task)
    vocab = data.load_meta(profile.data_dir)["vocab_size"]
    tok = data.load_tokenizer(profile.data_dir)
    model_cfg = profile.model_config(n_expert=n_expert, vocab_size=vocab)
    task_data = load_task(
        task, tok, model_cfg.block_size, cfg, profile.data_dir, profile.task_source
    )
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(GPT(model_cfg).train())
    step = _population_step if members > 1 or _has_population() else _model_step
    run = step(models, make_optimizer, cfg, task_data.task.kind)
    batches = [
        training_batches(task_data, cfg, seed, model_cfg.block_size) for seed in range(members)
    ]
    for _ in range(3):
        run([next(b) for b in batches])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("profile"):
            print(json.dumps(_profile(run, batches, int(line.split()[1]))), flush=True)
            continue
        seconds = tokens = 0
        for _ in range(int(line)):
            step_batches = [next(b) for b in batches]
            start = time.process_time()  # this process's CPU time: on a shared machine, the
            run(step_batches)  # time it waited for a core is not the step's
            seconds += time.process_time() - start
            tokens += sum(b.idx.numel() for b in step_batches)
        print(seconds, tokens, flush=True)


def _profile(run, batches, steps: int) -> dict[str, float]:
    """Each operator's self CPU microseconds over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run([next(b) for b in batches])
    return {e.key: e.self_cpu_time_total for e in prof.key_averages()}


def _has_population() -> bool:
    try:
        import uncurl.population  # noqa: F401
    except ImportError:
        return False
    return True


def _population_step(models, make_optimizer, cfg, kind: str):
    """Today's path: the members stacked (a model alone is the population of one)."""
    from uncurl.model.population import clip_grad_norms, stack
    from uncurl.population import task_losses

    model = models[0] if len(models) == 1 else stack(models).train()
    opt = make_optimizer(model, cfg)

    def run(batches):
        losses = task_losses(model, batches, kind)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        clip_grad_norms(model, cfg.grad_clip)
        opt.step()

    return run


def _model_step(models, make_optimizer, cfg, kind: str):
    """An earlier revision's path: one model, its fine-tuning step as that revision wrote it."""
    from uncurl.finetune import task_loss

    (model,) = models
    opt = make_optimizer(model, cfg)

    def run(batches):
        loss = task_loss(model, batches[0], kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    return run


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
