"""A GPT-2 style decoder whose alternate FFNs are Switch-routed mixtures of experts (GLaM layout).

Sarkar et al. 2024, section 2: MoE on layers 0, 2, 4, ...; router logits h = W x, gate
g = softmax(h), top-k experts, each expert's output scaled by its (full-softmax) gate value;
load-balancing loss alpha * E * sum_i f_i P_i (Fedus et al. 2022); capacity factor with overflow
tokens dropped onto the residual path.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from uncurl.config import ModelConfig
from uncurl.kernels import SoftmaxTopK, expert_mm, expert_outer, sort_slots


class Routing(NamedTuple):
    """What one MoE layer's router decided for the N tokens it saw."""

    logits: torch.Tensor  # (N, E) pre-softmax router logits
    experts: torch.Tensor  # (N, k) chosen experts, best first
    gates: torch.Tensor  # (N, k) full-softmax probability of each chosen expert
    counts: torch.Tensor  # (E,) tokens routed to each expert (all k choices, before dropping)
    dropped: torch.Tensor  # (N, k) True where capacity overflow dropped the assignment


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # lm_loss + aux_loss_weight * aux_loss
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # summed over MoE layers, unweighted
    routing: tuple[Routing, ...] | None


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

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        one = lambda t: None if t is None else t[None]  # noqa: E731  as a stack of one expert
        y = GroupedMLP.apply(rows, [len(rows)], one(self.c_fc.weight.t()), one(self.c_fc.bias),
                             one(self.c_proj.weight.t()), one(self.c_proj.bias))
        return y.view(*x.shape[:-1], -1)


class MoE(nn.Module):
    """Top-k routed experts stored as stacked tensors; each expert runs once on its sorted slice."""

    def __init__(self, cfg: ModelConfig, n_expert: int):
        super().__init__()
        self.cfg, self.n_expert = cfg, n_expert
        d, h = cfg.n_embd, cfg.hidden
        self.router = nn.Linear(d, n_expert, bias=False)
        self.w_fc = nn.Parameter(torch.empty(n_expert, d, h))  # x @ w_fc[e]
        self.w_proj = nn.Parameter(torch.empty(n_expert, h, d))
        self.b_fc = nn.Parameter(torch.zeros(n_expert, h)) if cfg.bias else None
        self.b_proj = nn.Parameter(torch.zeros(n_expert, d)) if cfg.bias else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        d = self.route(x)
        return self.experts(x, d).view(shape), d.routing

    def route(self, x: torch.Tensor) -> "Dispatch":
        """Where each of the N tokens (rows of x) goes, at the capacity of the current mode."""
        capacity = self.cfg.capacity(len(x), self.n_expert, self.training)
        return dispatch(self.router(x), self.cfg.top_k, capacity)

    def experts(self, x: torch.Tensor, d: "Dispatch") -> torch.Tensor:
        """The gate-weighted sum of each token's experts' outputs (zero for dropped tokens)."""
        # index_select, not x[d.token]: its backward is an index_add, not an index_put
        xs = x.index_select(0, d.token)  # (M, C), rows sorted by expert
        y = GroupedMLP.apply(xs, d.sizes.tolist(), self.w_fc, self.b_fc, self.w_proj, self.b_proj)
        return torch.zeros_like(x).index_add_(0, d.token, y * d.weight.to(y.dtype))


class Dispatch(NamedTuple):
    """Where each kept (token, choice) slot goes: rows sorted by expert, then by queue position."""

    token: torch.Tensor  # (M,) token of each kept slot
    sizes: torch.Tensor  # (E,) kept slots per expert
    weight: torch.Tensor  # (M, 1) gate of each kept slot
    routing: Routing


def dispatch(logits: torch.Tensor, k: int, capacity: int | None) -> Dispatch:
    """Top-k routing of N tokens from their router logits (N, E), at most `capacity` per expert.

    A pure function, so that the single-process layer and the expert-parallel one
    (`uncurl.expert_parallel`) route identically.
    """
    n, n_expert = logits.shape
    gates, experts = SoftmaxTopK.apply(logits.float(), k)  # (N, k)
    kept, counts, sizes, dropped = sort_slots(experts, n_expert, capacity)
    weight = gates.t().reshape(-1)[kept].unsqueeze(1)
    routing = Routing(logits, experts, gates, counts, dropped.view(k, n).t())
    return Dispatch(kept % n, sizes, weight, routing)


class GroupedMLP(torch.autograd.Function):
    """Expert e's MLP (linear, GELU, linear) on the e-th block of `sizes[e]` rows of xs.

    A hand-written backward writes each expert's gradient straight into one stacked buffer;
    through autograd, 64 small experts cost more in per-op bookkeeping and in concatenating
    gradients than in arithmetic. GELU runs once over all rows, and each of the six products runs
    every expert in one call (`uncurl.kernels`).
    """

    @staticmethod
    def forward(ctx, xs, sizes, w_fc, b_fc, w_proj, b_proj):
        pre = expert_mm(xs, w_fc, sizes, b_fc)  # (M, H) pre-activation
        act = F.gelu(pre)
        out = expert_mm(act, w_proj, sizes, b_proj)  # (M, C)
        ctx.save_for_backward(xs, pre, act, w_fc, w_proj)
        ctx.sizes, ctx.has_bias = sizes, (b_fc is not None, b_proj is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, pre, act, w_fc, w_proj = ctx.saved_tensors
        sizes = ctx.sizes
        # bias gradients are the experts' row sums of the output gradients
        g_bfc, g_bproj = (xs.new_empty(len(sizes), w.shape[2]) if has else None
                          for w, has in zip((w_fc, w_proj), ctx.has_bias, strict=True))
        g_wproj = expert_outer(act, grad_out, sizes, g_bproj)
        g_pre = torch.ops.aten.gelu_backward(expert_mm(grad_out, w_proj.transpose(1, 2), sizes),
                                             pre)
        g_wfc = expert_outer(xs, g_pre, sizes, g_bfc)
        g_xs = expert_mm(g_pre, w_fc.transpose(1, 2), sizes)
        return g_xs, None, g_wfc, g_bfc, g_wproj, g_bproj


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        n_expert = cfg.experts_at(layer)
        self.mlp = MoE(cfg, n_expert) if n_expert else MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        if isinstance(self.mlp, MLP):
            return x + self.mlp(self.ln_2(x)), None
        # an MoE layer, or a stand-in for one (uncurl.expert_parallel): returns (y, routing)
        y, routing = self.mlp(self.ln_2(x))
        return x + y, routing


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "w_proj")):
                nn.init.normal_(p, 0.0, std_proj)
            elif name.endswith("w_fc"):
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("router.weight"):
                nn.init.normal_(p, 0.0, cfg.router_init_std)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def moe_blocks(self) -> list[MoE]:
        return [b.mlp for b in self.h if isinstance(b.mlp, MoE)]

    def forward(self, idx, targets=None, return_routing=False, loss_mask=None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        routing = []
        for block in self.h:
            x, r = block(x)
            if r is not None:
                routing.append(r)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        token_mask = None if loss_mask is None else loss_mask.reshape(-1).bool()
        aux = sum(
            (load_balancing_loss(r.logits, r.experts, token_mask) for r in routing),
            start=logits.new_zeros(()),
        )
        lm_loss = loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                      ignore_index=-1)
            loss = lm_loss + self.cfg.aux_loss_weight * aux
        return Output(logits, loss, lm_loss, aux, tuple(routing) if return_routing else None)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and active-per-token parameters, computed from shapes alone (no allocation)."""
    d, h, V = cfg.n_embd, cfg.hidden, cfg.vocab_size
    b = int(cfg.bias)
    ln = d * (1 + b)
    attn = 4 * d * d + 4 * d * b
    ffn = 2 * d * h + (h + d) * b
    total = V * d + cfg.block_size * d + ln  # tied embedding/head, positions, final norm
    active = total
    for layer in range(cfg.n_layer):
        e = cfg.experts_at(layer)
        common = 2 * ln + attn + (d * e if e else 0)  # norms, attention, router
        total += common + ffn * max(e, 1)
        active += common + ffn * (cfg.top_k if e else 1)
    return {"total": total, "active": active}
