"""The paper's models on one GPU, in bfloat16: training steps, forward latency and memory, and one
MoE layer against DeepSpeed's and Mixtral's. One prepared run, a few minutes, one JSON file.

1. Kernels: our MoE layer's forward and backward with its products as one `torch._grouped_mm`
   call against one product per expert (`uncurl.model.kernels`); should they disagree or fail,
   the rest runs on one product per expert, and the JSON says so.
2. One MoE layer, forward+backward, at a training micro-batch (micro_batch_size x block_size
   tokens) and the backbone's widths: ours with each product path, DeepSpeed's, Mixtral's (its
   default grouped_mm experts, gated, 2/3 of d_ff wide), each as a ratio to ours.
3. Forward latency and peak memory of the backbone dense and with 8, 32, 64 experts at the paper's
   Fig. 2a batch (2 x 256 tokens), random weights (latency depends on shapes, not training).
4. Training: the 354M backbone with 8 experts for a few steps under DeepSpeed (the profile's
   recipe: bf16, ZeRO-2, micro-batches of 8), on this GPU alone (one process, so ep_size 1 and a
   smaller global batch), random tokens of GPT-2's vocabulary: step time, tokens/s, peak memory.

Without a GPU it refuses in one line; its pieces run at tiny shapes on a CPU (tests).
"""

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from uncurl.bench.moe import make_layers
from uncurl.config import ModelConfig, get_profile
from uncurl.device import describe
from uncurl.distributed import DeepSpeedEngine
from uncurl.model import GPT, MoE
from uncurl.model.deepspeed_moe import init_deepspeed
from uncurl.provenance import environment
from uncurl.timing import time_all

GPT2_VOCAB = 50257  # the paper's tokenizer
FORWARD_BATCH = (2, 256)  # the paper's Fig. 2a
LAYER_EXPERTS = (8, 64)
FORWARD_EXPERTS = (1, 8, 32, 64)
TRAIN_EXPERTS, TRAIN_BATCH = 8, 64  # 8 micro-batches of 8 per step on one GPU
OURS = "uncurl MoE"
PER_EXPERT = "uncurl MoE, one product per expert"


def add_arguments(p):
    p.add_argument("--profile", default="paper", help="backbone and training recipe")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    p.add_argument("--train-steps", type=int, default=4, help="training steps (the first warms up)")
    p.add_argument("--json", type=Path, default=Path("bench-gpu.json"), help="results file")


def run(args) -> dict:
    gpu = require_gpu()
    init_deepspeed("nccl")
    profile = get_profile(args.profile)
    cfg = profile.model_config(vocab_size=GPT2_VOCAB)
    tokens = profile.train_config().micro_batch(1) * cfg.block_size
    results = {"profile": args.profile, "device": describe(gpu, "bf16")}
    results["kernels"] = check_grouped_mm(cfg, LAYER_EXPERTS[-1], tokens, gpu)
    results["layer"] = [
        row for n in LAYER_EXPERTS for row in layer_rows(cfg, n, tokens, gpu, args.repeats)
    ]
    results["forward"] = forward_rows(cfg, FORWARD_EXPERTS, *FORWARD_BATCH, gpu, args.repeats)
    results["train"] = train_row(profile, TRAIN_EXPERTS, args.train_steps, gpu)
    results["environment"] = environment()
    print_tables(results)
    return results


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit(
            f"python -m uncurl.bench gpu needs a CUDA GPU; torch {torch.__version__} sees none here"
        )
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def products_per_expert(on: bool = True):
    """MoE products as one torch product per expert (`UNCURL_KERNELS=torch`) within the block."""
    before = os.environ.get("UNCURL_KERNELS")
    if on:
        os.environ["UNCURL_KERNELS"] = "torch"
    try:
        yield
    finally:
        os.environ.pop("UNCURL_KERNELS", None)
        if before is not None:
            os.environ["UNCURL_KERNELS"] = before


def check_grouped_mm(cfg: ModelConfig, n_expert: int, tokens: int, device) -> dict:
    """Our layer's output and gradients with grouped products against one product per expert;
    if they fail or disagree, every later measurement runs on one product per expert."""
    layer = _moe(cfg, n_expert, device)
    x = torch.randn(tokens, cfg.n_embd, device=device, dtype=_dtype(device))
    try:
        grouped = _forward_backward(layer, x)
        with products_per_expert():
            looped = _forward_backward(layer, x)
        # bfloat16 sums in another order: a few per cent of each tensor's largest entry
        worst = max(_relative_error(a, b) for a, b in zip(grouped, looped, strict=True))
        result = {"max_relative_error": worst, "ok": worst <= 0.05, "error": None}
    except RuntimeError as e:
        result = {"ok": False, "error": str(e).splitlines()[0]}
    if not result["ok"]:
        os.environ["UNCURL_KERNELS"] = "torch"
    return result


def layer_rows(cfg: ModelConfig, n_expert: int, tokens: int, device, repeats: int) -> list[dict]:
    """Forward+backward of each implementation of one MoE layer, and its ratio to ours."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = {name: la.to(device, dtype) for name, la in make_layers(cfg, n_expert, 8).items()}
    x = torch.randn(1, tokens, cfg.n_embd, device=device, dtype=dtype)
    steps = {name: _timed_step(la, x, device) for name, la in layers.items()}
    steps[PER_EXPERT] = _timed_step(layers[OURS], x, device, per_expert=True)
    times = time_all(steps, repeats=repeats)
    ours = times[OURS]["median_ms"]
    return [
        {
            "n_expert": n_expert,
            "tokens": tokens,
            "layer": name,
            **t,
            "vs_ours": t["median_ms"] / ours,
        }
        for name, t in times.items()
    ]


def forward_rows(cfg: ModelConfig, counts, batch: int, seq: int, device, repeats: int) -> list:
    """Forward latency and the peak memory a forward pass adds, per expert count."""
    rows = []
    for n_expert in counts:
        with torch.device(device):
            torch.manual_seed(0)
            model = GPT(replace(cfg, n_expert=n_expert)).to(_dtype(device)).eval()
        idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

        def forward(model=model, idx=idx):
            with torch.inference_mode():
                model(idx)
            synchronize(device)

        t = time_all({"forward": forward}, repeats=repeats)["forward"]
        rows.append(
            {"n_expert": n_expert, "batch": batch, "seq_len": seq, **t, **_memory(forward, device)}
        )
        del model
        _release(device)
    return rows


def train_row(profile, n_expert: int, steps: int, device, batch_size: int = TRAIN_BATCH) -> dict:
    """Training steps under DeepSpeed in this one process, random tokens."""
    vocab = GPT2_VOCAB if device.type == "cuda" else profile.model_config().vocab_size
    model_cfg = profile.model_config(n_expert=n_expert, vocab_size=vocab)
    cfg = profile.train_config(
        batch_size=batch_size, ep_size=1, max_steps=steps, device=device.type
    )
    torch.manual_seed(0)
    engine = DeepSpeedEngine(GPT(model_cfg).train(), cfg)
    gen = torch.Generator().manual_seed(0)
    seconds, losses = [], []
    _release(device)
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch_size, model_cfg.block_size + 1), generator=gen)
        t0 = time.perf_counter()
        losses.append(engine.step(x[:, :-1], x[:, 1:], lr=cfg.lr)["loss"])
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    timed = sorted(seconds[1:] or seconds)
    step_s = timed[len(timed) // 2]
    return {
        "n_expert": n_expert,
        "step_s": step_s,
        "tokens_per_s": batch_size * model_cfg.block_size / step_s,
        "seconds": seconds,
        "losses": losses,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        **engine.describe(),
    }


def print_tables(results: dict) -> None:
    k = results["kernels"]
    print(f"grouped products: {'ok' if k['ok'] else 'NOT USED'} {k.get('error') or ''}")
    for r in results["layer"]:
        print(
            f"  E={r['n_expert']:3d} {r['layer']:36s} {r['median_ms']:8.2f} ms"
            f"  {r['vs_ours']:.2f}x ours"
        )
    for r in results["forward"]:
        peak = r["forward_peak_bytes"]
        print(
            f"  forward E={r['n_expert']:3d} {r['median_ms']:8.2f} ms, "
            f"peak +{(peak or 0) / 2**20:.0f} MiB"
        )
    t = results["train"]
    print(f"  train E={t['n_expert']}: {t['step_s']:.2f} s/step, {t['tokens_per_s']:.0f} tokens/s")


def _moe(cfg: ModelConfig, n_expert: int, device) -> MoE:
    torch.manual_seed(0)
    return MoE(replace(cfg, n_expert=n_expert), n_expert).to(device, _dtype(device)).train()


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _forward_backward(layer: MoE, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y, _ = layer(x)
    y.float().square().sum().backward()
    return [y, x.grad, *(p.grad for p in layer.parameters())]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _timed_step(layer, x, device, per_expert: bool = False):
    def step():
        with products_per_expert(per_expert):
            layer.zero_grad(set_to_none=True)
            layer(x.detach().requires_grad_()).float().sum().backward()
        synchronize(device)

    return step


def _memory(forward, device) -> dict:
    """Bytes allocated before a forward pass (weights, inputs) and what the pass adds at its
    peak (GPUs only)."""
    if device.type != "cuda":
        return {"allocated_bytes": None, "forward_peak_bytes": None}
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward()
    peak = torch.cuda.max_memory_allocated(device) - before
    return {"allocated_bytes": before, "forward_peak_bytes": peak}


def _release(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
