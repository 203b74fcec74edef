"""The optimiser pretraining and fine-tuning share: AdamW over named parameter groups, and the
learning-rate schedule (linear warm-up, then linear decay)."""

import torch

from uncurl.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up to cfg.lr, then linear decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    frac = (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * min(frac, 1.0))


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on matrices (and stacked experts), none on biases and norms; a population's
    parameters are told apart by their members' shapes. The groups are named, as DeepSpeed's MoE
    group split needs (`uncurl.distributed`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    member_axis = int(getattr(model, "members", None) is not None)
    decay = [p for p in params if p.dim() - member_axis >= 2]
    no_decay = [p for p in params if p.dim() - member_axis < 2]
    return [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, groups=None) -> torch.optim.AdamW:
    """AdamW over `groups` (default: `param_groups(model, cfg)`)."""
    groups = param_groups(model, cfg) if groups is None else groups
    params = [p for g in groups for p in g["params"]]
    # fused: one pass over each tensor instead of one per operation (3-4x faster here)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )
