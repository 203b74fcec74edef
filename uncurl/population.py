"""Fine-tune several models on one task as one population: each member as it trains alone.

A member is a starting model and a seed (its data order). The members' parameters are stacked
(`uncurl.model.population`), so that each step is one forward and backward pass over every
member's own batch, one per-member gradient clipping and one AdamW step over the stacked
tensors (elementwise, so per member the step it takes alone). Held-out evaluations read the
same examples for every member, in batches all members share. A member stops after `patience`
evaluations without improvement and leaves the population with the weights of its best
evaluation; the others go on. A model alone is the population of one (`uncurl.finetune`).
"""

import copy

import numpy as np
import torch
from tqdm import tqdm

from uncurl import evaluate
from uncurl.config import FinetuneConfig
from uncurl.device import autocast, describe, model_device, resolve_precision, to_device
from uncurl.model import GPT
from uncurl.model.population import clip_grad_norms, member_state, select, stack
from uncurl.optim import lr_at, make_optimizer
from uncurl.tasks import TaskData, training_batches


def heldout_losses(model, data: TaskData) -> np.ndarray:
    """Each member's loss on the held-out part of the training split, (members,)."""
    if data.task.kind == "lm":
        per = evaluate.window_losses(model, data.heldout)
        return per.reshape(evaluate.model_members(model), -1).mean(1)
    return np.atleast_1d(evaluate.answer_loss(model, data.heldout))


def task_losses(model, batches: list, kind: str) -> torch.Tensor:
    """Each member's training loss on its own batch, (members,). lm: the mean loss per token.
    choice: the answer's negative log-likelihood per example (its tokens summed), so that a
    many-token answer does not dilute the token that decides it."""
    batches = [to_device(b, model_device(model)) for b in batches]
    out = model(
        [b.idx for b in batches], [b.targets for b in batches], loss_mask=[b.mask for b in batches]
    )
    if kind == "lm":
        return out.loss
    per_example = torch.stack([(b.targets >= 0).sum() / len(b.idx) for b in batches])
    return out.lm_loss * per_example + model.cfg.aux_loss_weight * out.aux_loss


def train(
    models: list[GPT], data: TaskData, cfg: FinetuneConfig, seeds: list[int], progress=False
) -> tuple[GPT, list[dict]]:
    """Fine-tune member m (models[m], data order seeds[m]) for each m, together; returns the
    members with the weights of their best held-out evaluation after training began (one
    model, trained in place, when there is one member; else a population in member order) and
    each member's training record. The untrained weights are measured, never chosen: early in
    fine-tuning the held-out loss can rise before it falls."""
    torch.manual_seed(seeds[0])  # as a run alone; no randomness is drawn without dropout
    model = models[0] if len(models) == 1 else stack(models)
    device = model_device(model)
    precision = resolve_precision(cfg.precision, device)
    members = [_Member(seed, data, cfg, model.cfg.block_size) for seed in seeds]
    for member, held in zip(members, heldout_losses(model, data), strict=True):
        member.curve.append({"step": 0, "heldout_loss": float(held)})
    opt = make_optimizer(model, cfg)
    active = list(members)
    model.train()
    steps = tqdm(
        range(1, cfg.max_steps + 1), desc=f"{data.task.name} x{len(members)}", disable=not progress
    )
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, cfg)
        with autocast(device, precision):
            losses = task_losses(model, [next(m.batches) for m in active], data.task.kind)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        clip_grad_norms(model, cfg.grad_clip)
        opt.step()
        for member, loss in zip(active, losses.tolist(), strict=True):
            member.losses.append(loss)
        if step % cfg.eval_interval and step != cfg.max_steps:
            continue
        held = heldout_losses(model, data)
        for i, member in enumerate(active):
            member.evaluated(step, float(held[i]), model, i, cfg.patience)
        steps.set_postfix(active=sum(not m.stopped for m in active))
        keep = [i for i, m in enumerate(active) if not m.stopped]
        if not keep:
            break
        if len(keep) < len(active):
            opt = _keep_members(model, opt, cfg, keep)
            active = [active[i] for i in keep]
    for member in active:
        member.steps = step
    where = describe(device, precision, accumulation=1)
    return _best(model, models, members), [m.record() | {"device": where} for m in members]


class _Member:
    """One member's data order, losses, held-out curve and best weights so far."""

    def __init__(self, seed: int, data: TaskData, cfg: FinetuneConfig, block_size: int):
        self.batches = training_batches(data, cfg, seed, block_size)
        self.losses, self.curve = [], []
        self.best = {"loss": float("inf"), "step": 0, "state": None}
        self.waited, self.stopped, self.steps = 0, False, 0

    def evaluated(self, step: int, held: float, model: GPT, index: int, patience: int) -> None:
        self.curve.append({"step": step, "train_loss": self.losses[-1], "heldout_loss": held})
        if held < self.best["loss"]:
            self.best = {"loss": held, "step": step, "state": member_state(model, index)}
            self.waited = 0
        elif (waited := self.waited + 1) >= patience:
            self.stopped, self.steps = True, step
        else:
            self.waited = waited

    def record(self) -> dict:
        return {
            "steps": self.steps,
            "best_step": self.best["step"],
            "best_heldout_loss": self.best["loss"],
            "curve": self.curve,
            "losses": self.losses,
        }


def _keep_members(model: GPT, opt, cfg: FinetuneConfig, keep: list[int]):
    """The population without its stopped members, and an optimizer that goes on with the
    others' state."""
    replaced = select(model, keep)
    new = make_optimizer(model, cfg)
    index = torch.tensor(keep)
    for old, p in replaced.items():
        state = opt.state.get(old)
        if state:
            new.state[p] = {k: v if v.dim() == 0 else v[index] for k, v in state.items()}
    return new


def _best(model: GPT, models: list[GPT], members: list[_Member]) -> GPT:
    """Every member with its best weights, in eval mode: the model itself, or a population."""
    if len(members) == 1:
        model.load_state_dict(members[0].best["state"])
        return model.eval()
    best = [copy.deepcopy(models[0]) for _ in members]  # models may repeat (one per seed)
    for m, member in zip(best, members, strict=True):
        m.load_state_dict(member.best["state"])
    return stack(best).eval()
