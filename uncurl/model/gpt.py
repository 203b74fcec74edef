"""A GPT-2 style decoder whose alternate FFNs are Switch-routed mixtures of experts (GLaM layout):
MoE on layers 0, 2, 4, ... (`ModelConfig.moe_every`), the others dense. The book's Method chapter
states the model in full."""

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from uncurl.config import ModelConfig
from uncurl.model import members
from uncurl.model.members import Rows
from uncurl.model.moe import MLP, MoE, Routing, load_balancing_loss


class Output(NamedTuple):
    """A forward pass. With targets, the head runs only at the n positions that have one
    (targets >= 0, in row-major order). For a population every field has a leading member
    axis: losses are (M,) tensors, the others tuples of one entry per member."""

    logits: torch.Tensor  # (B, T, V); with targets (n, V)
    loss: torch.Tensor | None  # lm_loss + aux_loss_weight * aux_loss
    lm_loss: torch.Tensor | None  # mean of nll
    aux_loss: torch.Tensor  # summed over MoE layers, unweighted
    routing: tuple[Routing, ...] | None
    nll: torch.Tensor | None = None  # (n,) negative log-likelihood of each target


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, rows: Rows, attn_mask=None):
        qkv = members.linear(x, rows, self.c_attn.weight, self.c_attn.bias)
        p = self.dropout if self.training else 0.0
        y = members.attention(qkv, rows, self.n_head, attn_mask, p)
        return members.linear(y, rows, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        n_expert = cfg.experts_at(layer)
        self.mlp = MoE(cfg, n_expert, False, cfg.ties_at(layer)) if n_expert else MLP(cfg)

    def forward(self, x, rows: Rows, dropless: bool = False, attn_mask=None):
        x = x + self.attn(members.layer_norm(x, rows, self.ln_1), rows, attn_mask)
        h = members.layer_norm(x, rows, self.ln_2)
        if isinstance(self.mlp, MLP):
            return x + self.mlp(h, rows), None
        # an MoE layer, or a stand-in for one (uncurl.model.expert_parallel): returns (y, routing)
        y, routing = self.mlp(h, dropless, rows)
        return x + y, routing


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.members: int | None = None  # M for a population (uncurl.model.population.stack)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer); experts as MoE draws them
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.h:
            nn.init.normal_(block.attn.c_proj.weight, 0.0, std_proj)
            if isinstance(block.mlp, MoE):
                block.mlp.reset_parameters()
            else:
                nn.init.normal_(block.mlp.c_proj.weight, 0.0, std_proj)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def moe_blocks(self) -> list[MoE]:
        return [b.mlp for b in self.h if isinstance(b.mlp, MoE)]

    def forward(
        self,
        idx,
        targets=None,
        return_routing=False,
        loss_mask=None,
        dropless: bool = False,
        positions=None,
        attn_mask=None,
        head: bool = True,
    ):
        """Logits, losses and (on request) every MoE layer's routing; `dropless` lifts the
        experts' capacity, so that a token's result does not depend on its batch; `head=False`
        stops before the LM head (no logits or lm loss: a pass for the routing). `positions`
        (B, T) replace 0..T-1 and `attn_mask` (B, T, T), True where a position may attend,
        replaces the causal mask (several sequences packed in one row).

        A list of tensors, one per member, gives each member of a population its own batch (a
        model takes a list of one); a tensor is read by every member. Outputs then have a
        leading member axis (`Output`)."""
        per_member = isinstance(idx, (list, tuple))
        n = self.members or 1
        idx, targets, loss_mask, positions, attn_mask = (
            _each_member(a, n) for a in (idx, targets, loss_mask, positions, attn_mask)
        )
        rows = Rows(tuple(tuple(i.shape) for i in idx), self.members is not None)
        x = self._embed(idx, positions, rows)  # (N, C)
        layers = []  # each MoE layer's routing of every member
        for block in self.h:
            x, r = block(x, rows, dropless, None if attn_mask[0] is None else attn_mask)
            if r is not None:
                layers.append(r if rows.stacked else (r,))
        out = self._head(x, rows, targets) if head else Output(None, None, None, None, None)
        aux = self._aux_losses(layers, loss_mask, x)
        loss = None if out.lm_loss is None else out.lm_loss + self.cfg.aux_loss_weight * aux
        routing = tuple(zip(*layers, strict=True)) if layers else ((),) * n  # member, layer
        out = out._replace(loss=loss, aux_loss=aux, routing=routing if return_routing else None)
        if per_member or self.members is not None:
            return out
        return Output(*(None if f is None else f[0] for f in out))  # the one member's

    def _embed(self, idx, positions, rows: Rows) -> torch.Tensor:
        """Token plus position embeddings of every row."""
        if positions[0] is None:
            longest = max(t for _, t in rows.shapes)
            if longest > self.cfg.block_size:
                raise ValueError(
                    f"sequence of {longest} tokens exceeds block_size {self.cfg.block_size}"
                )
            positions = [
                torch.arange(t, device=i.device).expand(b, t)
                for i, (b, t) in zip(idx, rows.shapes, strict=True)
            ]
        x = members.embedding(_flat(idx), rows, self.wte.weight)
        return self.drop(x + members.embedding(_flat(positions), rows, self.wpe.weight))

    def _head(self, x, rows: Rows, targets) -> Output:
        """Logits everywhere without targets, else at the target positions, with the nll."""
        if targets[0] is None:
            logits = members.linear(
                members.layer_norm(x, rows, self.ln_f), rows, self.lm_head.weight
            )
            parts = [
                z.view(b, t, -1) for z, (b, t) in zip(rows.split(logits), rows.shapes, strict=True)
            ]
            return Output(tuple(parts), None, None, None, None)
        flat = _flat(targets)
        where = (flat >= 0).nonzero().squeeze(1)
        counts = [int((t >= 0).sum()) for t in targets]
        at = Rows.of(counts, rows.stacked)
        h = members.layer_norm(x.index_select(0, where), at, self.ln_f)
        logits = members.linear(h, at, self.lm_head.weight)
        nll = F.cross_entropy(logits.float(), flat[where], reduction="none")
        lm_loss = torch.stack([part.mean() for part in at.split(nll)])
        return Output(at.split(logits), None, lm_loss, None, None, at.split(nll))

    def _aux_losses(self, layers, loss_mask, x) -> torch.Tensor:
        """Each member's load-balancing losses (its padding left out), summed over its MoE
        layers: (M,)."""
        per_member = []
        for m, mask in enumerate(loss_mask):
            mask = None if mask is None else mask.reshape(-1).bool()
            losses = (load_balancing_loss(r[m].logits, r[m].experts, mask) for r in layers)
            per_member.append(sum(losses, start=x.new_zeros(())))
        return torch.stack(per_member)


def _each_member(arg, n: int) -> list:
    """One entry per member: a list as given, a tensor (or None) for every member."""
    if isinstance(arg, (list, tuple)):
        if len(arg) != n:
            raise ValueError(f"{len(arg)} batches for a population of {n}")
        return list(arg)
    return [arg] * n


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    flat = [t.reshape(-1) for t in tensors]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


@contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode for the block, then the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
        common = 2 * ln + attn + d * cfg.router_outputs(layer)  # norms, attention, router
        total += common + ffn * max(e, 1)
        active += common + ffn * (cfg.top_k if e else 1)
    return {"total": total, "active": active}
