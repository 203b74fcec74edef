"""Switch-routed mixture-of-experts FFN and the dense FFN, on one grouped matrix-product code.

Router logits h = W x (pre-softmax), gate g = softmax(h), top-k experts per token, each expert's
output scaled by its full-softmax gate; tokens past an expert's capacity are dropped (they pass
on the residual path). The load-balancing loss is alpha * E * sum_i f_i P_i (Fedus et al. 2022).
The book's Method chapter states the model in full.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from uncurl.config import ModelConfig
from uncurl.model import members
from uncurl.model.kernels import (
    SoftmaxTopK,
    expert_mm,
    expert_mm_gelu,
    expert_mm_gelu_grad,
    expert_outer,
    sort_slots,
)
from uncurl.model.members import Rows


class Routing(NamedTuple):
    """What one MoE layer's router decided for the N tokens it saw, and the layer's input and
    output on them (what reduction statistics read)."""

    logits: torch.Tensor  # (N, E) pre-softmax router logits
    experts: torch.Tensor  # (N, k) chosen experts, best first
    gates: torch.Tensor  # (N, k) full-softmax probability of each chosen expert
    counts: torch.Tensor  # (E,) tokens routed to each expert (all k choices, before dropping)
    dropped: torch.Tensor  # (N, k) True where capacity overflow dropped the assignment
    inputs: torch.Tensor | None = None  # (N, C) the layer's input
    outputs: torch.Tensor | None = None  # (N, C) the layer's output (gate-weighted experts)


def load_balancing_loss(logits: torch.Tensor, experts: torch.Tensor, mask=None) -> torch.Tensor:
    """Switch loss E * sum_i f_i P_i: f_i = share of tokens whose top-1 is i, P_i = mean prob."""
    probs = logits.float().softmax(-1)  # (N, E)
    n_expert = probs.shape[-1]
    top1 = F.one_hot(experts[:, 0], n_expert).float()  # (N, E)
    if mask is not None:
        probs, top1 = probs[mask], top1[mask]
    return n_expert * (top1.mean(0) * probs.mean(0)).sum()


class MLP(nn.Module):
    """The dense FFN, computed as one expert of `GroupedMLP` so that dense and MoE models run
    their FFNs on the same matrix-product code and their latencies compare."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rows: Rows | None = None):
        flat = x.reshape(-1, x.shape[-1])
        rows = rows or Rows.of([len(flat)], False)
        w_fc, w_proj = (rows.stack(lin.weight).transpose(1, 2) for lin in (self.c_fc, self.c_proj))
        b_fc, b_proj = rows.stack(self.c_fc.bias), rows.stack(self.c_proj.bias)
        flat, *weights = autocast_operands(flat, w_fc, b_fc, w_proj, b_proj)
        y = GroupedMLP.apply(flat, rows.sizes, *weights)
        return y.view(*x.shape[:-1], -1)


class MoE(nn.Module):
    """Top-k routed experts stored as stacked tensors; each expert runs once on its sorted slice.

    The experts start from GPT-2's initialisation; `init=False` leaves them to the caller (`GPT`
    draws every weight itself, in GPT-2's order). With `ties` (tied experts, after an
    `hcsmoe-tied` reduction) the router has one output per entry and output i dispatches to
    expert ties[i] (`tie`)."""

    def __init__(
        self, cfg: ModelConfig, n_expert: int, init: bool = True, ties: tuple | None = None
    ):
        super().__init__()
        self.cfg, self.n_expert = cfg, n_expert
        d, h = cfg.n_embd, cfg.hidden
        self.router = nn.Linear(d, n_expert if ties is None else len(ties), bias=False)
        # a tuple, not a buffer: the config holds it, and transformers' loading on the meta
        # device would leave a buffer that is not in the weights uninitialised
        self.ties = None if ties is None else tuple(ties)
        self.w_fc = nn.Parameter(torch.empty(n_expert, d, h))  # x @ w_fc[e]
        self.w_proj = nn.Parameter(torch.empty(n_expert, h, d))
        self.b_fc = nn.Parameter(torch.zeros(n_expert, h)) if cfg.bias else None
        self.b_proj = nn.Parameter(torch.zeros(n_expert, d)) if cfg.bias else None
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's scheme: N(0, 0.02), the residual projection scaled by 1/sqrt(2 n_layer); the
        router with its own standard deviation; zero biases."""
        nn.init.normal_(self.w_fc, 0.0, 0.02)
        nn.init.normal_(self.w_proj, 0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))
        nn.init.normal_(self.router.weight, 0.0, self.cfg.router_init_std)
        for b in (self.b_fc, self.b_proj):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x, dropless: bool = False, rows: Rows | None = None):
        """The layer's output and routing; for a population's rows, each member routed on its
        own rows at its own capacity and every member's experts in one grouped product."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        rows = rows or Rows.of([len(x)], False)
        logits = members.linear(x, rows, self.router.weight)
        parts = [self._dispatch(part, dropless) for part in rows.split(logits)]
        d = parts[0] if len(parts) == 1 else _merge(parts, rows.sizes)
        y = self.experts(x, d)
        routing = tuple(
            p.routing._replace(inputs=x_m, outputs=y_m)
            for p, x_m, y_m in zip(parts, rows.split(x), rows.split(y), strict=True)
        )
        return y.view(shape), routing if rows.stacked else routing[0]

    def route(self, x: torch.Tensor, dropless: bool = False) -> "Dispatch":
        """Where each of the N tokens (rows of x) goes, at the capacity of the current mode (none
        when `dropless`)."""
        return self._dispatch(self.router(x), dropless)

    def _dispatch(self, logits: torch.Tensor, dropless: bool) -> "Dispatch":
        d = dispatch(logits, self.cfg.top_k, self._capacity(len(logits), dropless))
        return d if self.ties is None else tie(d, self.ties, self.n_expert)

    def _capacity(self, n_tokens: int, dropless: bool) -> int | None:
        """Per router output: tied experts route and drop as the model they came from did."""
        if dropless:
            return None
        return self.cfg.capacity(n_tokens, self.router.out_features, self.training)

    def experts(self, x: torch.Tensor, d: "Dispatch") -> torch.Tensor:
        """The gate-weighted sum of each token's experts' outputs (zero for dropped tokens); a
        population's experts are the groups m * E + e of its stacked weights."""
        # index_select, not x[d.token]: its backward is an index_add, not an index_put
        xs = x.index_select(0, d.token)  # (M, C), rows sorted by expert
        w_fc, w_proj = (w.reshape(-1, *w.shape[-2:]) for w in (self.w_fc, self.w_proj))
        b_fc, b_proj = (
            None if b is None else b.reshape(-1, b.shape[-1]) for b in (self.b_fc, self.b_proj)
        )
        xs, *weights = autocast_operands(xs, w_fc, b_fc, w_proj, b_proj)
        y = GroupedMLP.apply(xs, d.sizes.tolist(), *weights)
        return x.new_zeros(x.shape, dtype=y.dtype).index_add_(0, d.token, y * d.weight.to(y.dtype))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on every row of x: gelu(x W_fc + b_fc) W_proj + b_proj."""
        h = x @ self.w_fc[e] + (0 if self.b_fc is None else self.b_fc[e])
        return F.gelu(h) @ self.w_proj[e] + (0 if self.b_proj is None else self.b_proj[e])


class Dispatch(NamedTuple):
    """Where each kept (token, choice) slot goes: rows sorted by expert, then by queue position."""

    token: torch.Tensor  # (M,) token of each kept slot
    sizes: torch.Tensor  # (E,) kept slots per expert
    weight: torch.Tensor  # (M, 1) gate of each kept slot
    routing: Routing | None  # None for the merged dispatch of a population


def dispatch(logits: torch.Tensor, k: int, capacity: int | None) -> Dispatch:
    """Top-k routing of N tokens from their router logits (N, E), at most `capacity` per expert.

    A pure function, so that the single-process layer and the expert-parallel one
    (`uncurl.model.expert_parallel`) route identically.
    """
    n, n_expert = logits.shape
    gates, experts = SoftmaxTopK.apply(logits.float(), k)  # (N, k)
    kept, counts, sizes, dropped = sort_slots(experts, n_expert, capacity)
    weight = gates.t().reshape(-1)[kept].unsqueeze(1)
    routing = Routing(logits, experts, gates, counts, dropped.view(k, n).t())
    return Dispatch(kept % n, sizes, weight, routing)


def tie(d: Dispatch, ties, n_expert: int) -> Dispatch:
    """A dispatch over router outputs regrouped by the expert each output points to (`ties[i]`,
    of n_expert experts). Every kept slot keeps its token and gate, so which outputs a token
    chose, and what capacity dropped, are unchanged; the slots of tied outputs run their one
    expert together (in output order, then queue order)."""
    device = d.token.device
    expert_of = torch.tensor(ties, device=device)
    slot_output = torch.repeat_interleave(
        torch.arange(len(ties), device=device), d.sizes.to(device)
    )
    order = expert_of[slot_output].argsort(stable=True)
    sizes = d.sizes.new_zeros(n_expert).index_add_(0, expert_of.to(d.sizes.device), d.sizes)
    return Dispatch(d.token[order], sizes, d.weight[order], d.routing)


def _merge(parts: list[Dispatch], sizes: list[int]) -> Dispatch:
    """Members' dispatches as one over the groups m * E + e; tokens index all members' rows."""
    offsets = [sum(sizes[:m]) for m in range(len(sizes))]
    return Dispatch(
        torch.cat([p.token + o for p, o in zip(parts, offsets, strict=True)]),
        torch.cat([p.sizes for p in parts]),
        torch.cat([p.weight for p in parts]),
        None,
    )


def autocast_operands(*tensors):
    """The operands of a grouped product in autocast's dtype where autocast is on, as it casts a
    linear layer's (it leaves custom functions such as `GroupedMLP` alone)."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


class GroupedMLP(torch.autograd.Function):
    """Expert e's MLP (linear, GELU, linear) on the e-th block of `sizes[e]` rows of xs.

    A hand-written backward writes each expert's gradient straight into one stacked buffer;
    through autograd, 64 small experts cost more in per-op bookkeeping and in concatenating
    gradients than in arithmetic. Each of the six products runs every expert in one call
    (`uncurl.model.kernels`), GELU and its gradient inside the products that feed them.
    """

    @staticmethod
    def forward(ctx, xs, sizes, w_fc, b_fc, w_proj, b_proj):
        pre, act = expert_mm_gelu(xs, w_fc, sizes, b_fc)  # (M, H) pre-activation, its GELU
        out = expert_mm(act, w_proj, sizes, b_proj)  # (M, C)
        ctx.save_for_backward(xs, pre, act, w_fc, w_proj)
        ctx.sizes, ctx.has_bias = sizes, (b_fc is not None, b_proj is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, pre, act, w_fc, w_proj = ctx.saved_tensors
        sizes = ctx.sizes
        # bias gradients are the experts' row sums of the output gradients
        g_bfc, g_bproj = (
            xs.new_empty(len(sizes), w.shape[2]) if has else None
            for w, has in zip((w_fc, w_proj), ctx.has_bias, strict=True)
        )
        g_wproj = expert_outer(act, grad_out, sizes, g_bproj)
        g_pre = expert_mm_gelu_grad(grad_out, w_proj.transpose(1, 2), sizes, pre)
        g_wfc = expert_outer(xs, g_pre, sizes, g_bfc)
        g_xs = expert_mm(g_pre, w_fc.transpose(1, 2), sizes)
        return g_xs, None, g_wfc, g_bfc, g_wproj, g_bproj
