"""Training under DeepSpeed, in the processes a launcher started (`torchrun`, `deepspeed`), with
our own MoE layer split over DeepSpeed's expert-parallel groups:

    torchrun --nproc_per_node=2 -m uncurl.train --engine deepspeed --ep-size 2 ...

Each process runs the whole model on its rows of the global batch (data parallelism); each MoE
layer keeps E / ep_size experts per process and exchanges tokens with two differentiable
all_to_all calls (`uncurl.model.expert_parallel`), so routing and loss are those of one process,
except that an MoE layer's capacity and load-balancing loss are those of one process's
micro-batch. The DeepSpeed config is generated from the recipe (`deepspeed_config`): ZeRO stage
`zero_stage`, DeepSpeed's bf16 mode where the precision is bf16, gradient clipping, the batch and
its micro-batches; the client optimizer is our AdamW, its expert parameters in groups of their own.

Gradients, measured (tests/test_distributed.py): the all_to_all backward hands an expert the sum
of the gradients of every process's tokens routed to it, and DeepSpeed divides every gradient,
experts' included, by the data-parallel world size, so the gradients it applies equal the single
process's on the whole batch; ZeRO 1 and 2 clip by the global norm (stage 0 would clip by the
mean of the processes' norms, so it is refused).

Checkpoints stay ours: rank 0 writes the gathered weights (every expert, float32 master copies)
in `uncurl.model.checkpoint`'s format, atomically, and every process writes DeepSpeed's partitioned
optimizer state (its ZeRO optimizer's state dict) and random state beside them, into the same
temporary folder before it is renamed into place. Processes share one file system.
"""

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from uncurl import layout
from uncurl.config import TrainConfig
from uncurl.device import resolve_device, resolve_precision
from uncurl.engine import Engine
from uncurl.model import GPT
from uncurl.model.checkpoint import load_train_state, load_weights, write_weights
from uncurl.model.deepspeed_moe import init_deepspeed, shard_for_deepspeed
from uncurl.optim import make_optimizer, param_groups

CONFIG_FILE = "deepspeed.json"  # the generated DeepSpeed config, in each checkpoint


def deepspeed_config(cfg: TrainConfig, world: int, precision: str) -> dict:
    """DeepSpeed's config for recipe `cfg` over `world` data-parallel processes."""
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch(world),
        "gradient_accumulation_steps": cfg.accumulation(world),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": None,  # the run's metrics.jsonl records every step
    }


class DeepSpeedEngine(Engine):
    """This process's part of a DeepSpeed run: its rows of each batch, its experts."""

    name = "deepspeed"

    def __init__(self, model: GPT, cfg: TrainConfig):
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.cfg = cfg
        self.device = _process_device(cfg.device)
        init_deepspeed("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world % cfg.ep_size:
            raise ValueError(f"ep_size {cfg.ep_size} must divide the {self.world} processes")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.micro_batch = cfg.micro_batch(self.world)
        self.accumulation = cfg.accumulation(self.world)
        if model.cfg.is_moe:
            shard_for_deepspeed(model, cfg.ep_size)
        groups = split_params_into_different_moe_groups_for_optimizer(param_groups(model, cfg))
        self.config = deepspeed_config(cfg, self.world, self.precision)
        self.engine, self.opt, *_ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model, cfg, groups), config=self.config
        )
        self.model = self.engine.module

    def share(self, x, y):
        rows = len(x) // self.world
        mine = slice(self.rank * rows, (self.rank + 1) * rows)
        return x[mine], y[mine]

    def forward(self, x, y):
        """Through DeepSpeed's engine in training (its bf16 mode casts the weights, not the
        inputs), the bare module in evaluation."""
        run = self.engine if self.model.training else self.model
        return run(x.to(self.device), y.to(self.device))

    def backward(self, loss):
        """DeepSpeed divides by the accumulation and steps at its last micro-batch."""
        self.engine.backward(loss)
        self.engine.step()

    def finish_step(self) -> float:
        return float(self.engine.get_global_grad_norm())

    def sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def describe(self) -> dict:
        return {
            **super().describe(),
            "zero_stage": self.cfg.zero_stage,
            "ep_size": self.cfg.ep_size,
            "deepspeed": self.config,
        }

    # ------------------------------------------------------------------------- checkpoints

    def save(self, path, tokenizer, info: dict, state: dict) -> None:
        weights = self._gathered_weights()  # every process takes part
        with layout.atomic_dir(path) if self.is_main else contextlib.nullcontext() as tmp:
            folder = Path(_from_rank_0(tmp))
            mine = {"optimizer": self.opt.state_dict(), **self.rng_state()}
            torch.save(mine, _rank_file(folder, self.rank))
            if self.is_main:
                write_weights(folder, self.model.cfg, weights, tokenizer, info, state)
                layout.write_json(folder / CONFIG_FILE, self.config)
            dist.barrier()  # every rank's file is in before rank 0 renames the folder
        dist.barrier()

    def load_train_state(self, out) -> dict | None:
        """Rank 0 first: it puts back a checkpoint an interrupted save had moved aside."""
        if not self.is_main:
            dist.barrier()
        state = load_train_state(out)
        if self.is_main:
            dist.barrier()
        return state

    def restore(self, path, state: dict) -> None:
        path = Path(path)
        written = len(list(path.glob(_rank_file(path, "*").name)))
        if written != self.world:
            raise ValueError(
                f"{path} was written by {written} DeepSpeed processes; resume it with as many "
                f"(this run has {self.world})"
            )
        weights = load_weights(path)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(_local_rows(p, weights[name]))
        mine = torch.load(_rank_file(path, self.rank), weights_only=False)
        partitions = [mine["optimizer"] if r == self.rank else None for r in range(self.world)]
        self.opt.load_state_dict(partitions, load_from_fp32_weights=True)
        self.set_rng_state(mine)

    def _gathered_weights(self) -> dict:
        """The whole model's float32 weights (rank 0's copy matters): ZeRO's master copies,
        and each MoE layer's experts gathered from its expert-parallel group."""
        from deepspeed.utils import groups, safe_get_full_fp32_param

        weights = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            full = p.detach().float() if full is None else full
            if _is_expert(p):
                group = groups._get_expert_parallel_group(p.group_name)
                parts = [torch.empty_like(full) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, full.contiguous(), group=group)
                full = torch.cat(parts)
            weights[name] = full
        return weights


def rank() -> int:
    """This process's rank in a launched group (0 without one), known from the launcher's
    environment before the group is joined."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def _process_device(name: str) -> torch.device:
    """This process's GPU (LOCAL_RANK's), or the CPU: where DeepSpeed's accelerator runs."""
    from deepspeed.accelerator import get_accelerator

    device = resolve_device(name)
    accelerator = torch.device(get_accelerator().device_name()).type
    if device.type != accelerator:
        raise ValueError(
            f"device {name!r} is {device.type} but DeepSpeed runs on {accelerator} here "
            "(DS_ACCELERATOR=cpu or =cuda chooses)"
        )
    if device.type != "cuda":
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def _from_rank_0(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank_file(folder: Path, rank) -> Path:
    return folder / f"deepspeed_rank{rank}.pt"


def _is_expert(p) -> bool:
    return getattr(p, "allreduce", True) is False


def _local_rows(p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """The part of a whole-model weight this process holds: its experts' rows, or all of it."""
    if not _is_expert(p):
        return full
    from deepspeed.utils import groups

    rank = groups._get_expert_parallel_rank(p.group_name)
    return full[rank * len(p) : (rank + 1) * len(p)]
