"""Where a model runs and in what precision, and how a batch is cut into micro-batches for it.

    device = resolve_device("auto")              # cuda if torch sees a GPU, else cpu
    precision = resolve_precision("auto", device)  # bf16 on a GPU that has it, else fp32
    with autocast(device, precision):
        out = model(x.to(device), y.to(device))

bf16 runs as torch's autocast (float32 weights, bfloat16 products) in one process, and as
DeepSpeed's bf16 mode (bfloat16 weights, float32 master weights) under DeepSpeed. CPUs here
have no bf16 hardware (a bf16 product ran at 0.3 GFLOP/s), so "auto" keeps them in float32.
"""

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first GPU if torch sees one, else the CPU (`uncurl.config.DEVICES`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no GPU here")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU that supports it, fp32 elsewhere."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def describe(device: torch.device, precision: str, **extra) -> dict:
    """What a result records about where it ran."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "precision": precision, **extra}


def micro_batches(x: torch.Tensor, y: torch.Tensor, size: int):
    """(x, y) cut into consecutive slices of `size` rows."""
    return zip(x.split(size), y.split(size), strict=True)


def to_device(batch, device: torch.device):
    """A NamedTuple of tensors (`tasks.Batch`) with every tensor on `device` (None stays None)."""
    return type(batch)(*(None if t is None else t.to(device) for t in batch))
