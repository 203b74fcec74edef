"""Apply a plan: a new model that physically holds only the planned experts (the book's Method
chapter: UNCURL's alignment, merge and new router). Each group's members, aligned to its anchor
(unless the plan says otherwise), are averaged with the plan's weights (a singleton is copied
exactly); the router is re-initialised, kept, merged, or kept whole with tied experts. Works on
any model `uncurl.reduce.adapter` adapts."""

import torch

from uncurl.reduce.adapter import MoEAdapter, MoELayer, adapt, expert_layer
from uncurl.reduce.adapter import reduced_config as reduced_config  # the book names it here
from uncurl.reduce.align import align_plan

ROUTERS = ("reinit", "keep", "merge", "tie")
KEPT = ("keep", "tie")  # router handlings whose rows already route: no warm-up needed


def apply_plan(model, plan: dict, router: str = "keep", seed: int = 0, solver: str = "hungarian"):
    """The reduced model. Members the plan has not aligned yet are aligned first (`solver`).

    router: "reinit" a fresh router with D outputs (seeded; biases zero), "keep" each group's
    anchor row, "merge" the members' rows averaged with the group's weights, "tie" every row
    kept, each original expert's dispatching to its group's merged expert (tied experts; the
    groups must cover all experts); a layer whose plan names its own handling gets that.

    Tied experts keep the Z-way router rather than combining its rows into D: no D-way linear
    router reproduces top-k over Z logits mapped to groups (that would need a max over each
    group's logits), nor the gates, the softmax over all Z, which tying keeps exactly.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router handling {router!r}; choose one of {ROUTERS}")
    adapter = adapt(model)
    check_plan_fits(adapter, plan)
    plan = align_plan(adapter, plan, solver)
    gen = torch.Generator().manual_seed(seed)
    experts, routers, ties = [], [], []
    with torch.no_grad():
        for layer, planned in zip(adapter.layers, plan["layers"], strict=True):
            merged = [merge_group(layer, g) for g in planned["groups"]]
            experts.append({name: _stack([m[name] for m in merged]) for name in merged[0]})
            own = planned.get("router", router)
            routers.append(_router_rows(layer, planned["groups"], own, gen))
            ties.append(tied_experts(planned["groups"], layer.n_expert) if own == "tie" else None)
        return adapter.reduced(experts, routers, ties)


def tied_experts(groups: list[dict], n_expert: int) -> tuple[int, ...]:
    """For each of the layer's n_expert original experts, the group (merged expert) it is in."""
    group_of = {m: i for i, g in enumerate(groups) for m in g["members"]}
    if sorted(group_of) != list(range(n_expert)):
        missing = sorted(set(range(n_expert)) - set(group_of))
        raise ValueError(
            f"router 'tie' points every original expert at its group's merged expert, but the "
            f"plan's groups leave out experts {missing}: tie a merging method's plan, not a "
            "pruning one"
        )
    return tuple(group_of[e] for e in range(n_expert))


def check_plan_fits(adapter: MoEAdapter, plan: dict) -> None:
    found = [layer.n_expert for layer in adapter.layers]
    planned = [layer["source_n_expert"] for layer in plan["layers"]]
    if found != planned:
        raise ValueError(f"the plan is for MoE layers of {planned} experts, the model has {found}")


def merge_group(layer, group: dict) -> dict:
    """Weighted average of the group's aligned members of `layer` (a MoELayer or one of our MoE
    modules): {tensor name: tensor for one expert}, in at least float32, then the experts' dtype."""
    layer = expert_layer(layer)
    parts = [
        expert_params(layer, m, p) for m, p in zip(group["members"], group["perms"], strict=True)
    ]
    return {
        name: None if value is None else _average(group["weights"], [p[name] for p in parts])
        for name, value in parts[0].items()
    }


def expert_params(layer, e: int, perm=None) -> dict:
    """Expert e's tensors with its hidden neurons in order `perm` (None: unpermuted)."""
    layer = expert_layer(layer)
    params = layer.expert_params(e)
    if perm is None:
        return params
    return {name: _permuted(t, layer.neuron_dims[name], perm) for name, t in params.items()}


def _permuted(t, dim: int | None, perm) -> torch.Tensor | None:
    if t is None or dim is None:
        return t
    return t.index_select(dim, torch.as_tensor(perm, device=t.device))


def _average(weights: list[float], tensors: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    dtype = torch.promote_types(stacked.dtype, torch.float32)
    w = torch.tensor(weights, dtype=dtype, device=stacked.device)
    return torch.einsum("m,m...->...", w, stacked.to(dtype)).to(stacked.dtype)


def _stack(tensors: list) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.stack(tensors)


def _router_rows(layer: MoELayer, groups: list[dict], router: str, gen) -> dict:
    """Each router tensor's D rows (all Z when tied); a fresh router draws its weight and zeroes
    its biases."""
    return {
        name: _rows(t, groups, router, gen, layer.router_init_std if name == "weight" else 0.0)
        for name, t in layer.router_params().items()
    }


def _rows(t: torch.Tensor, groups: list[dict], router: str, gen, std: float) -> torch.Tensor:
    if router == "tie":
        return t.clone()
    if router == "keep":
        return t[[g["anchor"] for g in groups]]
    if router == "merge":
        return torch.stack(
            [
                torch.tensor(g["weights"], dtype=t.dtype, device=t.device) @ t[g["members"]]
                for g in groups
            ]
        )
    if std == 0.0:
        return t.new_zeros((len(groups), *t.shape[1:]))
    fresh = torch.empty(len(groups), *t.shape[1:])
    return fresh.normal_(0.0, std, generator=gen).to(t)
