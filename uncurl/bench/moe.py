"""Forward+backward time of one MoE layer against a dense floor, DeepSpeed's MoE and HF Mixtral's.

All four see the same tokens at the same shapes in one process:
- floor: a dense FFN doing the active FLOPs of top-k experts (width top_k * d_ff), torch's
  `nn.Linear`s;
- uncurl: `uncurl.model.MoE` (sorted dispatch; every expert's product in one call of
  `uncurl.model.kernels`, each expert once on its slice);
- deepspeed: `deepspeed.moe.layer.MoE` (GShard-style one-hot dispatch einsums), world size 1, gloo;
- mixtral: transformers' `MixtralSparseMoeBlock` with its default `grouped_mm` experts; they are
  gated (three matrices), so their width is 2/3 of d_ff to match FLOPs and parameters.

Two more rows split uncurl's time. Its experts alone, on a routing decided once beforehand (the
router, softmax, top-k and sort left out; the gather, experts and gated combine kept). And the
floor's FFN run as one expert through uncurl's grouped product, as uncurl's dense models run it:
where that kernel beats torch's BLAS on these shapes, it flatters uncurl's ratios by as much, and
the ratio of uncurl's layer to this row is its cost over a dense FFN on the same kernel.
"""

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from uncurl import cpu
from uncurl.config import get_profile
from uncurl.model import MLP, MoE
from uncurl.model.deepspeed_moe import deepspeed_moe, init_deepspeed
from uncurl.provenance import environment
from uncurl.timing import time_all

FLOOR = "floor (dense, same active FLOPs)"


def add_arguments(p):
    p.add_argument(
        "--profile", default="small", help="take d_model, d_ff, tokens from this profile"
    )
    p.add_argument("--n-expert", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    p.add_argument("--json", type=Path, help="also write the results here")


def make_layers(cfg, n_expert: int, align: int = 4) -> dict[str, nn.Module]:
    """The four layers; each returns its output tensor from `layer(x)`. Mixtral's width is a
    multiple of `align` elements (torch's grouped_mm needs 16-byte strides: 4 floats, 8 bf16)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    d, h, k = cfg.n_embd, cfg.hidden, cfg.top_k
    ds = deepspeed_moe(cfg, n_expert)
    # gated experts have three matrices: 2/3 of d_ff matches FLOPs and parameters
    mixtral_cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=align * round(2 * h / 3 / align),
        num_local_experts=n_expert,
        num_experts_per_tok=k,
    )
    mixtral_cfg._experts_implementation = "grouped_mm"  # what from_pretrained picks by default
    mixtral = MixtralSparseMoeBlock(mixtral_cfg)
    ours = MoE(replace(cfg, n_expert=n_expert), n_expert)
    first = lambda out: out[0]  # noqa: E731
    return {
        FLOOR: nn.Sequential(nn.Linear(d, k * h), nn.GELU(), nn.Linear(k * h, d)),
        "uncurl MoE": _Wrap(ours, first),
        "DeepSpeed MoE": _Wrap(ds, first),
        "HF Mixtral block": _Wrap(mixtral, lambda out: out[0] if isinstance(out, tuple) else out),
    }


def _step(layer, x):
    def step():
        layer.zero_grad(set_to_none=True)
        layer(x.requires_grad_()).sum().backward()

    return step


class _FixedRouting(nn.Module):
    """An MoE layer's experts on the routing its router chose for x, decided once."""

    def __init__(self, moe: MoE, x: torch.Tensor):
        super().__init__()
        self.moe = moe
        with torch.no_grad():
            self.d = moe.route(x.reshape(-1, x.shape[-1]))

    def forward(self, x):
        return self.moe.experts(x.reshape(-1, x.shape[-1]), self.d).view(x.shape)


def _dense_on_kernel(cfg, floor: nn.Sequential) -> MLP:
    """uncurl's dense FFN (one expert of its grouped product) with the floor's width and weights."""
    mlp = MLP(replace(cfg, n_embd=floor[0].in_features, d_ff=floor[0].out_features, bias=True))
    mlp.load_state_dict(
        {
            "c_fc.weight": floor[0].weight,
            "c_fc.bias": floor[0].bias,
            "c_proj.weight": floor[2].weight,
            "c_proj.bias": floor[2].bias,
        }
    )
    return mlp


class _Wrap(nn.Module):
    def __init__(self, layer, pick):
        super().__init__()
        self.layer, self.pick = layer, pick

    def forward(self, x):
        return self.pick(self.layer(x))


def run(args) -> dict:
    cpu.configure(args.threads)
    init_deepspeed()
    profile = get_profile(args.profile)
    cfg = profile.model_config(n_expert=max(args.n_expert), top_k=args.top_k)
    batch = profile.train_config().batch_size
    results = {
        "profile": args.profile,
        "tokens": batch * cfg.block_size,
        "n_embd": cfg.n_embd,
        "d_ff": cfg.hidden,
        "top_k": cfg.top_k,
        "rows": [],
        "environment": environment(),
    }
    print(
        f"one MoE layer, forward+backward, {batch} x {cfg.block_size} tokens, d_model "
        f"{cfg.n_embd}, d_ff {cfg.hidden}, top-{cfg.top_k}, capacity factor "
        f"{cfg.capacity_factor}, {args.threads} thread(s)"
    )
    for n_expert in args.n_expert:
        torch.manual_seed(0)
        x = torch.randn(batch, cfg.block_size, cfg.n_embd)
        layers = make_layers(cfg, n_expert)
        ours = layers["uncurl MoE"].layer.train()
        layers["uncurl experts, routing fixed"] = _FixedRouting(ours, x)
        layers["floor on uncurl's kernel"] = _dense_on_kernel(cfg, layers[FLOOR])
        steps = {name: _step(layer.train(), x) for name, layer in layers.items()}
        timings = time_all(steps, repeats=args.repeats)
        floor = timings[FLOOR]["median_ms"]
        for name, t in timings.items():
            row = {"n_expert": n_expert, "layer": name, **t, "vs_floor": t["median_ms"] / floor}
            results["rows"].append(row)
            print(
                f"  E={n_expert:3d}  {name:34s} {t['median_ms']:8.2f} ms "
                f"(IQR {t['q1_ms']:.2f}-{t['q3_ms']:.2f})  {row['vs_floor']:.2f}x floor"
            )
    return results
