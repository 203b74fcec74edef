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
from uncurl.model.moe import MLP, MoE, Routing, load_balancing_loss


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # lm_loss + aux_loss_weight * aux_loss
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor  # summed over MoE layers, unweighted
    routing: tuple[Routing, ...] | None


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
        self.mlp = MoE(cfg, n_expert, init=False) if n_expert else MLP(cfg)

    def forward(self, x, dropless: bool = False):
        x = x + self.attn(self.ln_1(x))
        if isinstance(self.mlp, MLP):
            return x + self.mlp(self.ln_2(x)), None
        # an MoE layer, or a stand-in for one (uncurl.model.expert_parallel): returns (y, routing)
        y, routing = self.mlp(self.ln_2(x), dropless)
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
        self, idx, targets=None, return_routing=False, loss_mask=None, dropless: bool = False
    ):
        """Logits, losses and (on request) every MoE layer's routing; `dropless` lifts the
        experts' capacity, so that a token's result does not depend on its batch."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))  # (B, T, C)
        routing = []
        for block in self.h:
            x, r = block(x, dropless)
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
            lm_loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1
            )
            loss = lm_loss + self.cfg.aux_loss_weight * aux
        return Output(logits, loss, lm_loss, aux, tuple(routing) if return_routing else None)


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
        common = 2 * ln + attn + (d * e if e else 0)  # norms, attention, router
        total += common + ffn * max(e, 1)
        active += common + ffn * (cfg.top_k if e else 1)
    return {"total": total, "active": active}
