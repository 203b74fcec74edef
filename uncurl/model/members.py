"""The layer maths of one model or of a population of same-shape models, on one set of rows.

A population (`uncurl.model.population.stack`) holds M models' parameters stacked along a new
leading axis; a model is the population of one, without that axis. Member m's batch (B_m, T_m)
is flattened into its own block of rows of one (N, C) activation, the members one after another
(`Rows`). Every function here makes, for each member, the torch calls its model alone makes, on
the same shapes: row-wise maths (layer norms, embeddings) runs member by member or on rows that
depend on nothing else, products run member by member (`MemberLinear`), attention on each
member's own (B_m, T_m). So a member computes, to the bit, what it computes alone.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from uncurl.model import kernels


class Rows(NamedTuple):
    """How the rows of an activation divide among the members of a model or population."""

    shapes: tuple[tuple[int, int], ...]  # (B, T) of each member's batch, in row order
    stacked: bool  # the parameters carry a leading member axis (a population)

    @classmethod
    def of(cls, sizes, stacked: bool) -> "Rows":
        """Rows without a sequence structure (the positions a head reads): `sizes[m]` each."""
        return cls(tuple((1, int(n)) for n in sizes), stacked)

    @property
    def members(self) -> int:
        return len(self.shapes)

    @property
    def sizes(self) -> list[int]:
        return [b * t for b, t in self.shapes]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(self.sizes) if self.members > 1 else (x,)

    def stack(self, p: torch.Tensor | None) -> torch.Tensor | None:
        """A parameter with its member axis (a model's gets one of length 1)."""
        return p if p is None or self.stacked else p[None]

    def member_of_row(self, device=None) -> torch.Tensor:
        sizes = torch.tensor(self.sizes, device=device)
        return torch.repeat_interleave(torch.arange(self.members, device=device), sizes)


def linear(x: torch.Tensor, rows: Rows, weight, bias=None) -> torch.Tensor:
    """x @ weight.T + bias for each member's rows with its own (out, in) weight. A model alone
    makes F.linear's call (the same BLAS call, and one that autocast casts)."""
    if not rows.stacked:
        return F.linear(x, weight, bias)
    return MemberLinear.apply(x, rows.sizes, rows.stack(weight), rows.stack(bias))


class MemberLinear(torch.autograd.Function):
    """Member m's rows times its weight, one BLAS call per member (the call `F.linear` makes for
    a model alone), written straight into one output; the backward likewise."""

    @staticmethod
    def forward(ctx, x, sizes, weight, bias):
        out = x.new_empty(len(x), weight.shape[1])
        for x_m, out_m, w, b in zip(
            x.split(sizes), out.split(sizes), weight, _each(bias, weight), strict=True
        ):
            if b is None:
                torch.mm(x_m, w.t(), out=out_m)
            else:
                torch.addmm(b, x_m, w.t(), out=out_m)
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.has_bias = sizes, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        g_x = torch.empty_like(x)
        g_w = torch.empty_like(weight)
        for g_m, x_m, g_xm, w, g_wm in zip(
            grad.split(sizes), x.split(sizes), g_x.split(sizes), weight, g_w, strict=True
        ):
            torch.mm(g_m, w, out=g_xm)
            torch.mm(g_m.t(), x_m, out=g_wm)
        g_b = torch.stack([g_m.sum(0) for g_m in grad.split(sizes)]) if ctx.has_bias else None
        return g_x, None, g_w, g_b


def _each(bias, weight):
    return [None] * len(weight) if bias is None else bias


def layer_norm(x: torch.Tensor, rows: Rows, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """`norm` of each member's rows with its own weight and bias."""
    weight, bias = rows.stack(norm.weight), rows.stack(norm.bias)
    parts = [
        F.layer_norm(x_m, norm.normalized_shape, w, None if bias is None else bias[m], norm.eps)
        for m, (x_m, w) in enumerate(zip(rows.split(x), weight, strict=True))
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def embedding(ids: torch.Tensor, rows: Rows, table: torch.Tensor) -> torch.Tensor:
    """Row r's entry of its member's table: one lookup in the members' tables laid end to end
    (a row's gradient reaches its own member's table only, in row order, as alone)."""
    table = rows.stack(table)
    if rows.members > 1:
        ids = ids + rows.member_of_row(ids.device) * table.shape[1]
    return F.embedding(ids, table.reshape(-1, table.shape[-1]))


def attention(
    qkv: torch.Tensor, rows: Rows, n_head: int, attn_mask=None, dropout: float = 0.0
) -> torch.Tensor:
    """Causal self-attention of each member's sequences on their own (B, T): qkv holds each
    row's query, key and value (N, 3C); `attn_mask`, one (B, T, T) per member (True where a
    position may attend), replaces the causal mask."""
    if attn_mask is None and not dropout and kernels.has_attention(qkv, n_head):
        return kernels.CausalAttention.apply(qkv, rows.shapes, n_head)  # every member in one
    outs = []
    masks = attn_mask if attn_mask is not None else [None] * rows.members
    for part, (b, t), mask in zip(rows.split(qkv), rows.shapes, masks, strict=True):
        c = part.shape[1] // 3
        q, k, v = (
            h.view(b, t, n_head, c // n_head).transpose(1, 2)
            for h in part.view(b, t, 3 * c).split(c, 2)
        )
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],
            dropout_p=dropout,
            is_causal=mask is None,
        )  # (B, nh, T, hs)
        outs.append(y.transpose(1, 2).reshape(b * t, c))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
