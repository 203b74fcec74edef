"""A population: M same-shape models as one `GPT` whose parameters are stacked along a new
leading member axis, so that one forward pass, one backward pass and one optimizer step serve
them all (the layer maths in `uncurl.model.members` keep each member exactly as it is alone).

    pop = stack([model_a, model_b])      # a GPT with pop.members == 2
    out = pop([idx_a, idx_b], [t_a, t_b])  # out.loss: (2,), each member on its own batch
    model_b.load_state_dict(member_state(pop, 1))
"""

import copy
import json

import torch
import torch.nn as nn

from uncurl.model.gpt import GPT


def stack(models: list[GPT]) -> GPT:
    """One population of `models` (same shapes, same routing parameters), in their order."""
    first = models[0]
    for other in models[1:]:
        _check_same_shape(first, other)
    if first.cfg.dropout:
        raise ValueError("a population trains as its members alone only without dropout")
    pop = copy.deepcopy(first)
    stacked = {}  # old parameter -> its stacked replacement (tied weights share one)
    for path, module in pop.named_modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if p not in stacked:
                parts = [m.get_submodule(path)._parameters[key].detach() for m in models]
                stacked[p] = nn.Parameter(torch.stack(parts), requires_grad=p.requires_grad)
            module._parameters[key] = stacked[p]
    pop.members = len(models)
    return pop


def member_state(model: GPT, m: int) -> dict[str, torch.Tensor]:
    """Member m's weights, as a model of the population's config loads them (copies)."""
    if model.members is None:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v[m].detach().clone() for k, v in model.state_dict().items()}


def select(pop: GPT, keep: list[int]) -> dict[nn.Parameter, nn.Parameter]:
    """Keep only the members at positions `keep`, in place; returns each old parameter's
    replacement (an optimizer's state follows them, `uncurl.population`)."""
    index = torch.tensor(keep)
    replaced = {}
    for module in pop.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if p not in replaced:
                replaced[p] = nn.Parameter(p.detach()[index], requires_grad=p.requires_grad)
            module._parameters[key] = replaced[p]
    pop.members = len(keep)
    return replaced


def clip_grad_norms(model: GPT, max_norm: float) -> torch.Tensor:
    """Each member's gradients scaled to a total norm of at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does for a model alone; returns the norms before, (M,)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # member by member, the calls a model alone makes: a norm over the rows of (M, n) or the
    # columns of (P, M) sums in another order
    members = list(zip(*grads, strict=True)) if model.members else [grads]
    totals = []
    for grads_m in members:
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads_m])
        total = torch.linalg.vector_norm(norms)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads_m:
            g.mul_(coef)
        totals.append(total)
    return torch.stack(totals)


def shape_key(model: GPT) -> str:
    """What members of one population must share: every parameter's shape and the routing
    settings, however the config spells the expert counts (8, or [8, 8] after a reduction)."""
    cfg = model.cfg.to_dict()
    cfg["n_expert"] = [model.cfg.experts_at(layer) for layer in model.cfg.moe_layers]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return json.dumps([cfg, shapes], sort_keys=True)


def _check_same_shape(a: GPT, b: GPT) -> None:
    if shape_key(a) != shape_key(b):
        raise ValueError("members of a population need the same shapes and routing settings")
