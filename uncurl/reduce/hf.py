"""Transformers MoE causal LMs as `MoEAdapter`s: the same reductions as for our GPT, on
checkpoints written by `save_pretrained`, giving checkpoints `from_pretrained` loads as they are.

Every supported family (`FAMILIES`) has the pattern of transformers 5's MoE blocks: a router
module whose `weight` has one row per expert (plus, in some families, a bias or a score-correction
bias per expert) and whose output starts with the router logits, and an experts module holding
all experts stacked, `gate_up_proj` and `down_proj`, called as experts(x, top_k_index,
top_k_weights). The experts are gated (SwiGLU): expert e computes down(act(gate x) * up x). How
gate and up sit in `gate_up_proj` (halves or interleaved, transposed or not, with biases) is read
from the experts module's own flags, which transformers sets for its fused kernels. A family's
entry names what differs: the config key of the expert count, the router's attribute, and how
the router turns logits into gates (what NAEE needs to score a pruned layer). Shared experts are
not routed and stay as they are.

The reduced model has D experts in every MoE layer (a transformers config holds one count) and
routes each token to min(top_k, D) of them. Group-limited routing (DeepSeek-V3's n_group and
topk_group) is reset to a single group: a reduction dissolves the expert groups it relies on.
Tied experts (`hcsmoe-tied`, router "tie") are refused: a transformers config has no way to
point several router outputs at one expert.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from uncurl.reduce.adapter import LayerIO

DEFAULT_BLOCK_SIZE = 256  # task window length, when the model's context allows
TIES_REFUSED = (
    "tied experts (router 'tie', method hcsmoe-tied) need several router outputs sharing one "
    "expert, which a transformers MoE block cannot hold; use hcsmoe (its clusters, a new "
    "router) or another router handling"
)


@dataclass(frozen=True)
class Family:
    n_expert_key: str  # the config key of the expert count per MoE layer
    router: str = "gate"  # the MoE block's attribute holding the router
    gating: str = "softmax"  # "softmax": top-k of softmax(logits); "sigmoid": top-k of
    # sigmoid(logits) + score-correction bias, gates the sigmoid scores x routed_scaling_factor
    renormalise: bool | None = None  # top-k gates rescaled to sum to one; None: norm_topk_prob
    grouped: bool = False  # group-limited routing (n_group, topk_group)


FAMILIES = {
    "mixtral": Family("num_local_experts", renormalise=True),
    "minimax": Family("num_local_experts", renormalise=True),
    "qwen2_moe": Family("num_experts"),
    "qwen3_moe": Family("num_experts"),
    "qwen3_next": Family("num_experts"),
    "olmoe": Family("num_experts"),
    "flex_olmo": Family("num_experts"),
    # a softmax over the top-k logits is the renormalised top-k of the full softmax
    "granitemoe": Family("num_local_experts", router="router", renormalise=True),
    "gpt_oss": Family("num_local_experts", router="router", renormalise=True),
    "deepseek_v3": Family("n_routed_experts", gating="sigmoid", grouped=True),
    "glm4_moe": Family("n_routed_experts", gating="sigmoid", grouped=True),
}


def family_of(config) -> Family:
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"{config.model_type} checkpoints ({', '.join(config.architectures or [])}) are not "
            f"supported; supported transformers MoE families: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[config.model_type]


class HFLayer:
    """One MoE block of a transformers model."""

    activation = "swiglu"

    def __init__(self, block: nn.Module, index: int, family: Family, config):
        self.index, self.family = index, family
        self.experts_module, self.router_module = block.experts, getattr(block, family.router)
        ex = self.experts_module
        self._transposed = getattr(ex, "is_transposed", False)  # (E, H, 2I) and (E, I, H)
        self._concatenated = getattr(ex, "is_concatenated", True)  # [gate; up], else interleaved
        self._bias = getattr(ex, "has_bias", False)
        t = int(self._transposed)
        self.neuron_dims = {"gate": t, "up": t, "down": 1 - t}
        if self._bias:
            self.neuron_dims |= {"gate_bias": 0, "up_bias": 0, "down_bias": None}
        self.top_k, self.router_init_std = config.num_experts_per_tok, config.initializer_range
        renormalise = family.renormalise
        self.renormalise = config.norm_topk_prob if renormalise is None else renormalise
        self.scale = (
            getattr(config, "routed_scaling_factor", 1.0) if family.gating == "sigmoid" else 1.0
        )

    @property
    def n_expert(self) -> int:
        return self.experts_module.gate_up_proj.shape[0]

    def expert_params(self, e: int) -> dict:
        ex = self.experts_module
        gate, up = self._split(ex.gate_up_proj[e], self.neuron_dims["gate"])
        params = {"gate": gate, "up": up, "down": ex.down_proj[e]}
        if self._bias:
            gate_bias, up_bias = self._split(ex.gate_up_proj_bias[e], 0)
            params |= {
                "gate_bias": gate_bias,
                "up_bias": up_bias,
                "down_bias": ex.down_proj_bias[e],
            }
        return params

    def pack(self, stacked: dict) -> dict:
        """The experts module's tensors from stacked expert tensors (D, ...)."""
        axis = self.neuron_dims["gate"] + 1
        params = {
            "gate_up_proj": self._join(stacked["gate"], stacked["up"], axis),
            "down_proj": stacked["down"],
        }
        if self._bias:
            params["gate_up_proj_bias"] = self._join(stacked["gate_bias"], stacked["up_bias"], 1)
            params["down_proj_bias"] = stacked["down_bias"]
        return params

    def _split(self, t: torch.Tensor, axis: int) -> tuple:
        if self._concatenated:
            return t.chunk(2, dim=axis)
        return t.unflatten(axis, (-1, 2)).unbind(axis + 1)

    def _join(self, gate: torch.Tensor, up: torch.Tensor, axis: int) -> torch.Tensor:
        if self._concatenated:
            return torch.cat([gate, up], dim=axis)
        return torch.stack([gate, up], dim=axis + 1).flatten(axis, axis + 1)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The family's own experts module, every row routed to e with weight one (its forward
        called directly: statistics run this inside the module's own hook)."""
        chosen = torch.full((len(x), 1), e, dtype=torch.long, device=x.device)
        ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
        return self.experts_module.forward(x, chosen, ones)

    def router_params(self) -> dict:
        return dict(self.router_module.state_dict())

    def route(self, logits, experts):
        k = min(self.top_k, logits.shape[-1])
        if self.family.gating == "sigmoid":
            scores = logits.float().sigmoid()
            bias = getattr(self.router_module, "e_score_correction_bias", None)
            choice = scores if bias is None else scores + bias[experts]
            positions = choice.topk(k, dim=-1).indices
            gates = scores.gather(-1, positions)
        else:
            gates, positions = logits.float().softmax(-1).topk(k, dim=-1)
        if self.renormalise:
            gates = gates / gates.sum(-1, keepdim=True)
        return gates * self.scale, positions

    def watch(self, real: torch.Tensor, visit) -> list:
        """Hooks that call visit(LayerIO) on the tokens `real` (a mask over the batch's flattened
        tokens) once the layer has run: router logits from the router, the routing, input and
        output from the experts module (each token's choices ordered by gate: some routers
        return them unsorted)."""
        logits = []

        def on_router(module, args, output):
            logits.append(output[0] if isinstance(output, tuple) else output)

        def on_experts(module, args, kwargs, output):
            x, experts, gates = [*args, *kwargs.values()][:3]
            gates, order = gates.sort(dim=-1, descending=True, stable=True)
            chosen = experts.gather(-1, order)
            visit(LayerIO(*(t[real] for t in (x, output, logits.pop(), chosen, gates))))

        return [
            self.router_module.register_forward_hook(on_router),
            self.experts_module.register_forward_hook(on_experts, with_kwargs=True),
        ]


class HFAdapter:
    cap_top_k = True
    ties = False  # transformers' MoE blocks give each router output its own expert

    def __init__(self, model: PreTrainedModel):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"cannot reduce a {type(model).__name__}: expected an uncurl GPT or a "
                "transformers MoE causal LM"
            )
        self.model, self.family, config = model, family_of(model.config), model.config
        self.top_k, self.width = config.num_experts_per_tok, config.hidden_size
        names = {id(m): name for name, m in model.named_modules()}
        blocks = [
            (i, m)
            for i, layer in enumerate(model.base_model.layers)
            for m in layer.modules()
            if hasattr(getattr(m, "experts", None), "gate_up_proj")
            and hasattr(m, self.family.router)
        ]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layer with stacked experts")
        self.layers = [HFLayer(block, i, self.family, config) for i, block in blocks]
        self._prefixes = [names[id(block)] for _, block in blocks]

    def check_target(self, method: str, target_n_expert: int) -> None:
        if method == "mcsmoe":
            raise ValueError(
                "mcsmoe gives MoE layers different expert counts, which a transformers config "
                "cannot hold (one expert count for all layers); choose another method"
            )
        if self.family.grouped and target_n_expert < 2:
            raise ValueError(
                f"the {self.model.config.model_type} router sums the two best scores of its "
                "expert group, so it needs at least 2 experts; choose D >= 2"
            )

    def visit_layers(self, batch, visit, dropless: bool = True) -> None:
        """Transformers MoE layers drop no token: `dropless` holds anyway."""
        mask = batch.mask.to(self.model.device)
        hooks = [
            h
            for i, layer in enumerate(self.layers)
            for h in layer.watch(mask.reshape(-1), lambda io, i=i: visit(i, io))
        ]
        try:
            self.model.base_model(
                input_ids=batch.idx.to(mask.device), attention_mask=mask.long(), use_cache=False
            )
        finally:
            for h in hooks:
                h.remove()

    def reduced(self, experts: list[dict], routers: list[dict], ties: list) -> PreTrainedModel:
        if any(t is not None for t in ties):
            raise ValueError(TIES_REFUSED)
        counts = sorted({len(rows["weight"]) for rows in routers})
        if len(counts) > 1:
            raise ValueError(
                f"the plan gives MoE layers {counts} experts; a transformers config holds one count"
            )
        new = {}
        for prefix, layer, params, rows in zip(
            self._prefixes, self.layers, experts, routers, strict=True
        ):
            new |= {f"{prefix}.experts.{k}": v for k, v in layer.pack(params).items()}
            new |= {f"{prefix}.{self.family.router}.{k}": v for k, v in rows.items()}
        state = {k: new[k] if k in new else v.clone() for k, v in self.model.state_dict().items()}
        with torch.device("meta"):
            reduced = type(self.model)(self.reduced_config(counts[0]))
        reduced.load_state_dict(state, strict=True, assign=True)
        _copy_unsaved_buffers(self.model, reduced)
        if reduced.config.tie_word_embeddings:
            reduced.tie_weights()
        reduced.generation_config = copy.deepcopy(self.model.generation_config)
        return reduced.eval()

    def reduced_config(self, target_n_expert: int):
        config = copy.deepcopy(self.model.config)
        setattr(config, self.family.n_expert_key, target_n_expert)
        config.num_experts_per_tok = min(self.top_k, target_n_expert)
        if self.family.grouped:
            config.n_group = config.topk_group = 1
        return config

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.router_module.parameters()]

    def loss(self, batch) -> torch.Tensor:
        device = self.model.device
        out = self.model(
            input_ids=batch.idx.to(device),
            attention_mask=batch.mask.to(device).long(),
            output_router_logits=True,
            use_cache=False,
        )
        targets = batch.targets.to(device).flatten()
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets, ignore_index=-1)
        aux = getattr(out, "aux_loss", None)
        return loss if aux is None else loss + self.model.config.router_aux_loss_coef * aux


def _copy_unsaved_buffers(source: nn.Module, target: nn.Module) -> None:
    """Buffers outside the state dict (rotary frequencies), which a model built on the meta
    device lacks."""
    saved = set(source.state_dict())
    for name, buffer in source.named_buffers(remove_duplicate=False):
        if name not in saved:
            module, _, attr = name.rpartition(".")
            target.get_submodule(module).register_buffer(attr, buffer.clone(), persistent=False)


# ------------------------------------------------------------------------------- checkpoints


def source_config(path: Path):
    """The checkpoint's config, refused early if its family is not supported."""
    config = AutoConfig.from_pretrained(path)
    family_of(config)
    return config


def load_checkpoint(path: Path, device: str | None = None) -> PreTrainedModel:
    source_config(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None if it has none."""
    found = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(path) if found else None


def window(config, block_size: int | None) -> int:
    """Task window length: `block_size`, or the default, within the model's context."""
    context = config.max_position_embeddings
    if block_size is not None and block_size > context:
        raise ValueError(f"--block-size {block_size} exceeds the model's context of {context}")
    return block_size or min(DEFAULT_BLOCK_SIZE, context)


def write_checkpoint(folder: Path, model: PreTrainedModel, tokenizer=None) -> None:
    """Safetensors weights, config and generation config, and the tokenizer if there is one."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
