"""Expert parallelism across real processes: each of P ranks holds E/P experts of every MoE layer
and the ranks exchange tokens with two `all_to_all` calls (GShard; DeepSpeed-MoE), over gloo.

    results = launch(worker, 2, *args)          # worker(rank, world, *args) in 2 processes
    layers = shard_model(model, rank, world)    # in each: its MoE layers, expert-parallel

Tokens are data-parallel, as in DeepSpeed: every rank runs the whole model on its own batch shard.
In each MoE layer a rank routes its tokens exactly as `uncurl.model.MoE` does (the same
`dispatch`), scatters the kept slots into a capacity buffer (E, C, d), sends each rank the rows
of that rank's experts (first all_to_all), runs its own experts on what it received from every
rank (the padding rows too, as GShard and DeepSpeed do), sends the outputs back (second
all_to_all) and combines them with the gates. So each rank's output equals the single-process
layer's output on that rank's tokens. The exchanges carry gradients (`AllToAll`): an expert's
weights receive the gradients of every rank's tokens routed to it, summed, which is what
training under DeepSpeed (`uncurl.distributed`) reduces.
"""

import os
import socket
import sys
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from uncurl import cpu
from uncurl.model.gpt import GPT
from uncurl.model.members import Rows
from uncurl.model.moe import GroupedMLP, MoE, dispatch
from uncurl.timing import stopwatch


@dataclass
class Phases:
    """Seconds spent in each phase of one layer's forward calls, and bytes given to all_to_all.

    An exchange's time includes waiting for the slowest rank to arrive, as DeepSpeed's own
    timers do; `bytes_sent` counts the whole buffers handed to `all_to_all_single` (the 1/P of
    each that a rank keeps for itself is copied locally, not sent).
    """

    route: float = 0.0  # router, dispatch, scatter into the capacity buffer
    first_a2a: float = 0.0
    compute: float = 0.0  # this rank's experts on every rank's slots
    second_a2a: float = 0.0
    combine: float = 0.0  # gather the outputs back to tokens, weighted by the gates
    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict:
        return asdict(self)


class ExpertParallelMoE(nn.Module):
    """Rank `rank`'s part of an MoE layer: the shared router and a copy of its E/P experts."""

    def __init__(self, moe: MoE, rank: int, world: int, group=None):
        super().__init__()
        if moe.ties is not None:
            raise ValueError("tied experts (an hcsmoe-tied reduction) run in one process only")
        if moe.n_expert % world:
            raise ValueError(f"{moe.n_expert} experts cannot be split evenly over {world} ranks")
        self.cfg, self.n_expert, self.world, self.group = moe.cfg, moe.n_expert, world, group
        self.n_local = moe.n_expert // world
        mine = slice(rank * self.n_local, (rank + 1) * self.n_local)
        self.router = moe.router
        for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
            full = getattr(moe, name)
            local = None if full is None else nn.Parameter(full.detach()[mine].clone())
            setattr(self, name, local)
        self.phases = Phases()
        self.train(moe.training)  # the capacity factor depends on the mode

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert weights (the router is shared by every rank)."""
        return [p for p in (self.w_fc, self.b_fc, self.w_proj, self.b_proj) if p is not None]

    def forward(self, x, dropless: bool = False, rows: Rows | None = None):
        if rows is not None and rows.stacked:
            raise ValueError("an expert-parallel layer serves one model, not a population")
        shape, ph, clock = x.shape, self.phases, vars(self.phases)
        x = x.reshape(-1, shape[-1])  # (N, d): this rank's tokens; equal N on every rank
        with stopwatch(clock, "route"):
            capacity = None if dropless else self.cfg.capacity(len(x), self.n_expert, self.training)
            d = dispatch(self.router(x), self.cfg.top_k, capacity)
            buffer, slot = scatter(x, d.token, d.sizes, capacity or self._largest(d.sizes))
        with stopwatch(clock, "first_a2a"):
            received = self._exchange(buffer)  # (P, E/P, C, d): every rank's slots of my experts
        with stopwatch(clock, "compute"):
            p, e, c, width = received.shape
            rows = received.transpose(0, 1).reshape(e * p * c, width)  # each expert contiguous
            y = GroupedMLP.apply(rows, [p * c] * e, self.w_fc, self.b_fc, self.w_proj, self.b_proj)
            outputs = y.view(e, p, c, width).transpose(0, 1)  # (P, E/P, C, d): by origin rank
        with stopwatch(clock, "second_a2a"):
            returned = self._exchange(outputs)  # (P, E/P, C, d) = (E, C, d): my slots, computed
        with stopwatch(clock, "combine"):
            y = returned.reshape(-1, width).index_select(0, slot)
            out = torch.zeros_like(x).index_add_(0, d.token, y * d.weight.to(y.dtype))
        ph.calls += 1
        return out.view(shape), d.routing

    def _exchange(self, t: torch.Tensor) -> torch.Tensor:
        """Block r of dim 0 goes to rank r; block r of the result came from rank r."""
        out = AllToAll.apply(t.contiguous(), self.group)
        self.phases.bytes_sent += t.numel() * t.element_size()
        return out.view(self.world, self.n_local, *t.shape[-2:])

    def _largest(self, sizes: torch.Tensor) -> int:
        """Dropless routing: the buffer must hold the fullest expert of any rank."""
        largest = sizes.max().reshape(1).clone()
        dist.all_reduce(largest, dist.ReduceOp.MAX, group=self.group)
        return int(largest)


class AllToAll(torch.autograd.Function):
    """`all_to_all_single` in equal blocks along dim 0, with its gradient: the same exchange of
    the output's gradient the other way (block r of the result came from rank r)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad.contiguous(), ctx.group), None


def scatter(
    x: torch.Tensor, token: torch.Tensor, sizes: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The capacity buffer (E, C, d) holding each kept slot's token at (expert, queue position),
    zeros elsewhere, and each slot's flat index into it; slots come sorted by expert."""
    n_expert = len(sizes)
    expert = torch.repeat_interleave(torch.arange(n_expert, device=x.device), sizes)  # (M,)
    starts = sizes.cumsum(0) - sizes
    slot = expert * capacity + torch.arange(len(token), device=x.device) - starts[expert]
    rows = x.new_zeros(n_expert * capacity, x.shape[1])
    buffer = rows.index_copy(0, slot, x.index_select(0, token))
    return buffer.view(n_expert, capacity, x.shape[1]), slot


def shard_model(
    model: GPT, rank: int, world: int, group=None, layer=ExpertParallelMoE
) -> list[ExpertParallelMoE]:
    """Replace each MoE layer of `model` (in place) by rank `rank`'s expert-parallel part (made
    by `layer`); the full expert tensors are released. Returns the new layers, whose `phases`
    time each call."""
    layers = []
    for block in model.h:
        if isinstance(block.mlp, MoE):
            block.mlp = layer(block.mlp, rank, world, group)
            layers.append(block.mlp)
    return layers


# ------------------------------------------------------------------------------ processes


def launch(fn, world: int, *args) -> list:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined in one gloo group on
    localhost, one torch thread each; returns each rank's (picklable) result, by rank.

    A failing rank raises here with its traceback (torch's ProcessRaisedException), and takes
    the others down with it.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.spawn(_run, args=(world, free_port(), queue, fn, args), nprocs=world, join=False)
    results, done = {}, False
    while not done:  # read while waiting: a rank blocks on a full pipe until its result is read
        done = procs.join(timeout=0.05)
        while not queue.empty():
            rank, value = queue.get()
            results[rank] = value
    return [results[r] for r in range(world)]


def _run(rank, world, port, queue, fn, args):
    cpu.configure(1)
    # environment variables as well, so that DeepSpeed's initialisation finds the same group
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()  # no rank tears its groups down while another still talks to them
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo groups that DeepSpeed still references are destroyed
    # there, and that can abort the process (std::terminate) after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
