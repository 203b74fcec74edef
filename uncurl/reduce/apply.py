"""Apply a plan: a new model that physically holds only the planned experts (the book's Method
chapter: UNCURL's alignment, merge and new router). Each group's members, aligned to its anchor,
are averaged with the plan's weights (a singleton is copied exactly); the router is
re-initialised, kept, or merged."""

import torch

from uncurl.config import ModelConfig
from uncurl.model import GPT, MoE
from uncurl.reduce.align import align_plan

ROUTERS = ("reinit", "keep", "merge")
EXPERT_PARAMS = ("w_fc", "b_fc", "w_proj", "b_proj")


def apply_plan(
    model: GPT, plan: dict, router: str = "keep", seed: int = 0, solver: str = "hungarian"
) -> GPT:
    """The reduced model. Members the plan has not aligned yet are aligned first (`solver`).

    router: "reinit" a fresh router with D outputs (seeded), "keep" each group's anchor row,
    "merge" the members' rows averaged with the group's weights.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router handling {router!r}; choose one of {ROUTERS}")
    check_plan_fits(model, plan)
    plan = align_plan(model, plan, solver)
    reduced = GPT(reduced_config(model.cfg, plan["target_n_expert"])).eval()
    shared = {k: v for k, v in model.state_dict().items() if not _is_expert_param(k)}
    reduced.load_state_dict(shared, strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for old, new, layer in zip(
            model.moe_blocks, reduced.moe_blocks, plan["layers"], strict=True
        ):
            merged = [merge_group(old, g) for g in layer["groups"]]
            for name in EXPERT_PARAMS:
                if getattr(new, name) is not None:
                    getattr(new, name).copy_(torch.stack([m[name] for m in merged]))
            new.router.weight.copy_(_router_rows(old, layer["groups"], router, gen))
    return reduced


def reduced_config(cfg: ModelConfig, counts: list[int]) -> ModelConfig:
    """cfg with `counts` experts per MoE layer: one number when all layers agree (and exceed 1,
    since n_expert=1 would mean the dense backbone)."""
    n_expert = counts[0] if len(set(counts)) == 1 and counts[0] > 1 else list(counts)
    return ModelConfig.from_dict({**cfg.to_dict(), "n_expert": n_expert})


def check_plan_fits(model: GPT, plan: dict) -> None:
    found = [moe.n_expert for moe in model.moe_blocks]
    planned = [layer["source_n_expert"] for layer in plan["layers"]]
    if found != planned:
        raise ValueError(f"the plan is for MoE layers of {planned} experts, the model has {found}")


def merge_group(moe: MoE, group: dict) -> dict:
    """Weighted average of the group's aligned members: {param name: tensor for one expert}."""
    parts = [
        expert_params(moe, m, p) for m, p in zip(group["members"], group["perms"], strict=True)
    ]
    weights = torch.tensor(group["weights"], dtype=moe.w_fc.dtype)
    return {
        name: None
        if parts[0][name] is None
        else torch.einsum("m,m...->...", weights, torch.stack([p[name] for p in parts]))
        for name in EXPERT_PARAMS
    }


def expert_params(moe: MoE, e: int, perm=None) -> dict:
    """Expert e's parameters with its hidden neurons in order `perm` (None: unpermuted)."""
    idx = slice(None) if perm is None else torch.as_tensor(perm)
    return {
        "w_fc": moe.w_fc[e][:, idx],  # (C, H)
        "b_fc": None if moe.b_fc is None else moe.b_fc[e][idx],  # (H,)
        "w_proj": moe.w_proj[e][idx],  # (H, C)
        "b_proj": None if moe.b_proj is None else moe.b_proj[e],  # (C,) not permuted
    }


def _router_rows(old: MoE, groups: list[dict], router: str, gen) -> torch.Tensor:
    rows = old.router.weight  # (Z, C)
    if router == "keep":
        return rows[[g["anchor"] for g in groups]]
    if router == "merge":
        return torch.stack(
            [torch.tensor(g["weights"], dtype=rows.dtype) @ rows[g["members"]] for g in groups]
        )
    fresh = torch.empty(len(groups), rows.shape[1])
    return fresh.normal_(0.0, old.cfg.router_init_std, generator=gen)


def _is_expert_param(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in EXPERT_PARAMS or key.endswith("mlp.router.weight")
