"""DeepSpeed in one process or P, without the ops it would compile just in time on a CPU, and its
MoE layer at our model's shapes and capacity rules (the benchmarks' peer implementation)."""

import os
import sys

import torch.nn as nn


def init_deepspeed():
    """World-size-1 gloo group without JIT-compiling DeepSpeed's shared-memory op."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # it would JIT-compile a C++ op
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    ).items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)


def deepspeed_moe(cfg, n_expert: int, ep_size: int = 1) -> nn.Module:
    """DeepSpeed's MoE layer at cfg's shapes and capacity rules, its experts split over ep_size
    ranks (after `init_deepspeed`); `layer(x)[0]` is the output."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    d, h = cfg.n_embd, cfg.hidden
    expert = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
    layer = DeepSpeedMoE(
        d,
        expert,
        n_expert,
        ep_size=ep_size,
        k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        eval_capacity_factor=cfg.eval_capacity_factor,
        min_capacity=cfg.min_capacity,
    )
    layer.set_deepspeed_parallelism()
    return layer
