"""What a reduction reads from a model and writes back, one interface for every architecture, so
that statistics, alignment and merging (`stats`, `align`, `apply`) are written once.

A model is seen as a `MoEAdapter` over its MoE layers, each a `MoELayer`. `adapt` wraps our GPT
(`GPTAdapter`, also for our GPT loaded as a transformers model, `UncurlForCausalLM`) or a
transformers MoE causal LM (`uncurl.reduce.hf.HFAdapter`).

An expert is a dict of tensors. `neuron_dims` names, per tensor, the dim that indexes the
expert's hidden (intermediate) neurons, the one a permutation acts on; None marks a tensor that is
not permuted (the output bias). Every matrix with a neuron dim enters the weight-matching score;
vectors only follow the permutation.
"""

from typing import NamedTuple, Protocol

import torch
from torch import nn

from uncurl.config import ModelConfig
from uncurl.device import model_device, to_device
from uncurl.model import GPT, MoE, UncurlForCausalLM


class LayerIO(NamedTuple):
    """One MoE layer on the N real (unpadded) tokens of a batch."""

    inputs: torch.Tensor  # (N, C) the layer's input
    outputs: torch.Tensor  # (N, C) the gate-weighted sum of the routed experts' outputs
    logits: torch.Tensor  # (N, Z) router logits before the softmax (or sigmoid)
    experts: torch.Tensor  # (N, k) chosen experts, largest gate first
    gates: torch.Tensor  # (N, k) the weight of each chosen expert's output


class MoELayer(Protocol):
    index: int | None  # the layer's position in the model's stack of layers
    n_expert: int
    activation: str  # "gelu": w_fc, w_proj (ours); "swiglu": gate, up, down (gated experts)
    neuron_dims: dict[str, int | None]
    router_init_std: float  # the standard deviation of a fresh router's weight

    def expert_params(self, e: int) -> dict[str, torch.Tensor | None]:
        """Expert e's tensors (views), named as in `neuron_dims`."""

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on every row of x (N, C), ungated."""

    def router_params(self) -> dict[str, torch.Tensor]:
        """The router's tensors, one row per expert: "weight" (Z, C), then any (Z,) biases."""

    def route(self, logits: torch.Tensor, experts: torch.Tensor) -> tuple:
        """(gates, positions) of the top-k choice among the last dim of `logits`, the logits of
        the experts `experts` only: how this layer routes once the others are pruned."""


class MoEAdapter(Protocol):
    model: nn.Module
    layers: list[MoELayer]
    top_k: int
    width: int  # C, the model's hidden size
    cap_top_k: bool  # reduced models route to min(top_k, D) experts; else D >= top_k is required
    ties: bool  # a reduced model can point several router outputs at one expert (router "tie")

    def check_target(self, method: str, target_n_expert: int) -> None:
        """Refuse a reduction this architecture cannot hold; the error names the fix."""

    def visit_layers(self, batch, visit, dropless: bool = True) -> None:
        """Run one batch (tasks.Batch) through the model, calling visit(i, LayerIO) for MoE
        layer i on the batch's real tokens (as the pass reaches it, where the model allows, so
        that one layer's tensors at a time are kept)."""

    def reduced(self, experts: list[dict], routers: list[dict], ties: list) -> nn.Module:
        """A new model holding, per MoE layer, the stacked `experts` tensors (D, ...) and router
        rows (D, ..., or Z where the layer's `ties` maps each row to its expert, else None),
        named as `expert_params` and `router_params` name them; everything else copied."""

    def router_parameters(self) -> list[nn.Parameter]:
        """What a router warm-up trains."""

    def loss(self, batch) -> torch.Tensor:
        """Language-modelling loss plus the weighted load-balancing loss, on one batch."""


def adapt(model) -> MoEAdapter:
    """The adapter of `model`: our GPT (as it is or as a transformers model), a transformers MoE
    causal LM, or an adapter already."""
    from uncurl.reduce.hf import HFAdapter  # here: hf builds on this module's LayerIO

    if isinstance(model, GPTAdapter | HFAdapter):
        return model
    return GPTAdapter(model) if isinstance(model, GPT | UncurlForCausalLM) else HFAdapter(model)


def expert_layer(layer) -> MoELayer:
    """`layer` as a MoELayer: one of our MoE modules is wrapped."""
    return GPTLayer(layer) if isinstance(layer, MoE) else layer


class GPTLayer:
    """One of our MoE layers: experts of two matrices, GELU between (w_fc (C, H), w_proj (H, C)),
    softmax gates that are not renormalised over the chosen experts."""

    activation = "gelu"
    neuron_dims = {"w_fc": 1, "b_fc": 0, "w_proj": 0, "b_proj": None}

    def __init__(self, moe: MoE, index: int | None = None):
        self.moe, self.index = moe, index

    @property
    def n_expert(self) -> int:
        return self.moe.n_expert

    @property
    def router_init_std(self) -> float:
        return self.moe.cfg.router_init_std

    def expert_params(self, e: int) -> dict:
        moe = self.moe
        return {
            "w_fc": moe.w_fc[e],
            "b_fc": None if moe.b_fc is None else moe.b_fc[e],
            "w_proj": moe.w_proj[e],
            "b_proj": None if moe.b_proj is None else moe.b_proj[e],
        }

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.moe.expert(e, x)

    def router_params(self) -> dict:
        return {"weight": self.moe.router.weight}

    def route(self, logits, experts):
        return logits.float().softmax(-1).topk(self.moe.cfg.top_k, dim=-1)


class GPTAdapter:
    """Our GPT; given as an `UncurlForCausalLM`, its GPT, and the reduced model wrapped alike."""

    cap_top_k = False
    ties = True

    def __init__(self, model: GPT | UncurlForCausalLM):
        self.wrapped = isinstance(model, UncurlForCausalLM)
        model = model.gpt if self.wrapped else model
        if not model.cfg.is_moe:
            raise ValueError(
                "the checkpoint is a dense model (n_expert=1); expert reduction needs an "
                "SMoE checkpoint (trained with --n-expert > 1, e.g. runs/small/e16)"
            )
        self.model, self.top_k, self.width = model, model.cfg.top_k, model.cfg.n_embd
        self.layers = [
            GPTLayer(moe, i) for i, moe in zip(model.cfg.moe_layers, model.moe_blocks, strict=True)
        ]

    def check_target(self, method: str, target_n_expert: int) -> None:
        """Per-layer expert counts and D >= top_k (plan.check_request) are all it needs, on a
        model whose router outputs are its experts."""
        if self.model.cfg.tied_experts:
            raise ValueError(
                "the checkpoint has tied experts (an hcsmoe-tied reduction), whose router "
                "outputs are not its experts; reduce the checkpoint it was reduced from"
            )

    def visit_layers(self, batch, visit, dropless: bool = True) -> None:
        batch = to_device(batch, model_device(self.model))
        mask = batch.mask.reshape(-1)
        routing = self.model(batch.idx, return_routing=True, dropless=dropless, head=False).routing
        for i, r in enumerate(routing):
            visit(
                i, LayerIO(*(t[mask] for t in (r.inputs, r.outputs, r.logits, r.experts, r.gates)))
            )

    def reduced(
        self, experts: list[dict], routers: list[dict], ties: list
    ) -> GPT | UncurlForCausalLM:
        counts = [len(params["w_fc"]) for params in experts]
        reduced = GPT(reduced_config(self.model.cfg, counts, ties)).eval()
        shared = {k: v for k, v in self.model.state_dict().items() if not _is_expert_param(k)}
        reduced.load_state_dict(shared, strict=False)
        with torch.no_grad():
            for moe, params, rows in zip(reduced.moe_blocks, experts, routers, strict=True):
                for name, value in params.items():
                    if value is not None:
                        getattr(moe, name).copy_(value)
                moe.router.weight.copy_(rows["weight"])
        return UncurlForCausalLM.wrapping(reduced) if self.wrapped else reduced

    def router_parameters(self) -> list[nn.Parameter]:
        return [moe.router.weight for moe in self.model.moe_blocks]

    def loss(self, batch) -> torch.Tensor:
        batch = to_device(batch, model_device(self.model))
        return self.model(batch.idx, batch.targets, loss_mask=batch.mask).loss


def reduced_config(cfg: ModelConfig, counts: list[int], ties=()) -> ModelConfig:
    """cfg with `counts` experts per MoE layer: one number when all layers agree (and exceed 1,
    since n_expert=1 would mean the dense backbone); with `ties`, per MoE layer the expert of
    each router output or None (untied: one output per expert), the model's tied experts."""
    n_expert = counts[0] if len(set(counts)) == 1 and counts[0] > 1 else list(counts)
    tied = []
    if any(t is not None for t in ties):
        tied = [list(range(c)) if t is None else t for c, t in zip(counts, ties, strict=True)]
    return ModelConfig.from_dict({**cfg.to_dict(), "n_expert": n_expert, "tied_experts": tied})


def _is_expert_param(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in GPTLayer.neuron_dims or key.endswith("mlp.router.weight")
