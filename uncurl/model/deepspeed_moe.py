"""DeepSpeed in one process or P, without the ops it would compile just in time on a CPU; its MoE
layer at our model's shapes and capacity rules (the benchmarks' peer implementation); and our own
expert-parallel layer as DeepSpeed's engine recognises an MoE layer (training under DeepSpeed)."""

import functools
import os
import sys

import torch.nn as nn

from uncurl.model.expert_parallel import ExpertParallelMoE, free_port, shard_model
from uncurl.model.gpt import GPT


def init_deepspeed(backend: str = "gloo"):
    """DeepSpeed's process group (world size 1, on a free port, unless a launcher set RANK,
    WORLD_SIZE and MASTER_PORT), without JIT-compiling its shared-memory op."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # it would JIT-compile a C++ op
    if "MASTER_PORT" not in os.environ:  # a fixed port would collide with another such process
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in dict(
        MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    ).items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(backend, verbose=False)


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


def shard_for_deepspeed(model: GPT, ep_size: int) -> list[ExpertParallelMoE]:
    """Split every MoE layer's experts over DeepSpeed's expert-parallel group of `ep_size` ranks
    (created if need be), in place, and mark the experts as DeepSpeed's own: reduced over the
    expert-data-parallel group only (`allreduce = False`, `group_name`)."""
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    rank, group = groups._get_expert_parallel_rank(name), groups._get_expert_parallel_group(name)
    layer = functools.partial(_recognised_layer(), group_name=name)
    layers = shard_model(model, rank, ep_size, group, layer)
    for expert in (p for la in layers for p in la.expert_parameters()):
        expert.allreduce, expert.group_name = False, name
    return layers


@functools.cache
def _recognised_layer():
    """`ExpertParallelMoE` with DeepSpeed's MoE layer as a base class. DeepSpeed's engine treats a
    model as MoE (experts reduced over their own group, MoE optimizer groups, expert-aware
    ZeRO) only if a module is an instance of its layer; nothing else of that class is used."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedExpertParallelMoE(DeepSpeedMoE, ExpertParallelMoE):
        forward = ExpertParallelMoE.forward

        def __init__(self, moe, rank, world, group, group_name):
            ExpertParallelMoE.__init__(self, moe, rank, world, group)
            self.num_experts, self.ep_size, self.expert_group_name = moe.n_expert, world, group_name
            self.num_local_experts = self.n_local

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
            """The engine calls this on MoE layers; `shard_for_deepspeed` made the groups."""

    return DeepSpeedExpertParallelMoE
