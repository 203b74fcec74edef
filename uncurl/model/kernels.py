"""CPU kernels for MoE layers: every expert's product in one call (GELU and its gradient inside the
products that feed them), softmax top-k, the dispatch sort; and causal attention of small heads
(`CausalAttention`).

Tokens arrive sorted by expert, `sizes[e]` rows each. On x86-64 CPUs with AVX2 and FMA, float32
products on one torch thread (uncurl's training default) run through the C kernels in kernels.c,
compiled on first use into a cache folder ($UNCURL_CACHE, else ~/.cache/uncurl); elsewhere
(other dtypes, more threads, other CPUs, no C compiler) they run as one torch.mm per expert,
and top-k and the dispatch sort as torch ops. With 64 experts of about 60 rows each, torch.mm per
expert costs 1.3-1.6x one torch.mm over all rows (MKL packs each expert's operands and pays its
set-up each call); the grouped kernel costs 1.0-1.2x (`python -m uncurl.bench moe`).
Attention of heads of 8k floats runs on its own kernel (torch's flash kernel pays its block
set-up per 16-float head). Where the CPU has AVX-512, products and attention run on 16-float
registers, with the same bits. On a GPU, bfloat16 products whose widths keep 16-byte strides run as
one `torch._grouped_mm` call (`uses_grouped_mm`; `python -m uncurl.bench gpu` times it against
one product per expert); everything else runs on the torch ops. `UNCURL_KERNELS=torch` forces
one torch.mm per expert and the torch ops everywhere.
"""

import ctypes
import functools
import hashlib
import itertools
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-shared", "-fPIC")


def expert_mm(a: torch.Tensor, b: torch.Tensor, sizes: list[int], bias=None) -> torch.Tensor:
    """Rows of expert e times its matrix: a (M, K) and b (E, K, N) give out (M, N) with
    out[rows of e] = a[rows of e] @ b[e] (+ bias[e], bias being (E, N))."""
    return _expert_mm(a, b, sizes, bias)[0]


def expert_mm_gelu(a: torch.Tensor, b: torch.Tensor, sizes: list[int], bias=None):
    """`expert_mm` and its GELU: (pre, gelu(pre)). On the kernel path each block of rows goes
    through GELU as it leaves the product, while it is in cache (erf by Abramowitz and Stegun
    7.1.26, as torch's vectorised erf, |error| < 1.5e-7); elsewhere torch's GELU follows."""
    act = a.new_empty(len(a), b.shape[2])
    pre, fused = _expert_mm(a, b, sizes, bias, GELU, act)
    return pre, (act if fused else F.gelu(pre))


def expert_mm_gelu_grad(a: torch.Tensor, b: torch.Tensor, sizes: list[int], pre: torch.Tensor):
    """The gradient of GELU's input from its output's, `expert_mm(a, b, sizes)`, times GELU's
    derivative at `pre` (M, N), in the product's pass as `expert_mm_gelu`."""
    pre = pre.contiguous()
    if pre.shape != (len(a), b.shape[2]):
        raise ValueError(f"pre has shape {tuple(pre.shape)}, not {(len(a), b.shape[2])}")
    grad, fused = _expert_mm(a, b, sizes, None, GELU_GRAD, pre)
    return grad if fused else torch.ops.aten.gelu_backward(grad, pre)


GELU, GELU_GRAD = 1, 2  # kernels.c's epilogues


def _expert_mm(a, b, sizes, bias, epilogue=0, aux=None) -> tuple[torch.Tensor, bool]:
    """expert_mm's product, and whether the kernel applied `epilogue` (aux: rows as out's)."""
    _check(sizes, rows=len(a), experts=len(b), inner=(a.shape[1], b.shape[1]))
    if bias is not None and bias.shape != (len(b), b.shape[2]):
        raise ValueError(
            f"bias has shape {tuple(bias.shape)}, not (experts, N) = {(len(b), b.shape[2])}"
        )
    if uses_grouped_mm(a.device.type, a.dtype, (a.shape[1], b.shape[1], b.shape[2])):
        return _grouped_expert_mm(a, b, sizes, bias), False
    out = a.new_empty(len(a), b.shape[2])
    if _gemm_for(a, b, bias):
        bias = None if bias is None else bias.contiguous()  # the kernel reads its rows whole
        _gemm(
            sizes,
            False,
            0,
            b.shape[2],
            b.shape[1],
            a,
            (a.stride(0), a.stride(1)),
            b,
            (b.stride(1), b.stride(2), b.stride(0)),
            bias,
            out,
            out.stride(0),
            0,
            epilogue=epilogue,
            aux=aux,
        )
        return out, True
    if bias is None:
        for a_e, b_e, out_e in zip(a.split(sizes), b.unbind(), out.split(sizes), strict=True):
            torch.mm(a_e, b_e, out=out_e)
    else:
        for a_e, b_e, out_e, bias_e in zip(
            a.split(sizes), b.unbind(), out.split(sizes), bias.unbind(), strict=True
        ):
            torch.addmm(bias_e, a_e, b_e, out=out_e)
    return out, False


def expert_outer(a: torch.Tensor, b: torch.Tensor, sizes: list[int], b_sums=None) -> torch.Tensor:
    """Each expert's rows of a against its rows of b (a weight gradient): a (M, P) and b (M, Q)
    give out (E, P, Q) with out[e] = a[rows of e].T @ b[rows of e], zero for an expert with no
    rows. If given, b_sums (E, Q) receives each expert's sum of its rows of b (a bias gradient)."""
    _check(sizes, rows=len(a), experts=len(sizes), inner=(len(a), len(b)))
    if b_sums is not None and b_sums.shape != (len(sizes), b.shape[1]):
        raise ValueError(f"b_sums has shape {tuple(b_sums.shape)}, not {(len(sizes), b.shape[1])}")
    if uses_grouped_mm(a.device.type, a.dtype, (a.shape[1], b.shape[1])):
        if b_sums is not None:
            b_sums.copy_(_expert_sums(b, sizes))
        return torch._grouped_mm(a.t(), b, offs=_offsets(sizes, a.device))
    out = a.new_empty(len(sizes), a.shape[1], b.shape[1])
    if _gemm_for(a, b, b_sums) and (b_sums is None or b_sums.is_contiguous()):
        _gemm(
            sizes,
            True,
            a.shape[1],
            b.shape[1],
            0,
            a,
            (a.stride(1), a.stride(0)),
            b,
            (b.stride(0), b.stride(1), 0),
            None,
            out,
            out.stride(1),
            out.stride(0),
            b_sums,
        )
        return out
    for a_e, b_e, out_e in zip(
        a.t().split(sizes, dim=1), b.split(sizes), out.unbind(), strict=True
    ):
        torch.mm(a_e, b_e, out=out_e)  # (P, 0) @ (0, Q) writes zeros
    if b_sums is not None:
        torch.stack([b_e.sum(0) for b_e in b.split(sizes)], out=b_sums)
    return out


def uses_grouped_mm(device_type: str, dtype: torch.dtype, widths) -> bool:
    """Whether a grouped product runs as one `torch._grouped_mm` call: on a GPU, in bfloat16 (its
    only dtype there), every width a multiple of 8 (16-byte strides), not switched off."""
    return (
        device_type == "cuda"
        and dtype == torch.bfloat16
        and all(w % 8 == 0 for w in widths)
        and hasattr(torch, "_grouped_mm")
        and os.environ.get("UNCURL_KERNELS") != "torch"
    )


def _grouped_expert_mm(a, b, sizes, bias):
    """`expert_mm` as one grouped call; its bias is added per row (the call takes none)."""
    out = torch._grouped_mm(a, b, offs=_offsets(sizes, a.device))
    if bias is None:
        return out
    return out + bias.repeat_interleave(torch.tensor(sizes, device=a.device), dim=0)


def _offsets(sizes, device) -> torch.Tensor:
    """Where each expert's rows end, as the grouped call wants them."""
    return torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)


def _expert_sums(b, sizes) -> torch.Tensor:
    """(E, Q): each expert's sum of its rows of b."""
    expert = torch.repeat_interleave(
        torch.arange(len(sizes), device=b.device), torch.tensor(sizes, device=b.device)
    )
    return b.new_zeros(len(sizes), b.shape[1]).index_add_(0, expert, b)


class SoftmaxTopK(torch.autograd.Function):
    """The k largest softmax probabilities of each row of logits (N, E), largest first, and their
    columns: `gates, experts = SoftmaxTopK.apply(logits, k)`. Gradients reach every logit through
    the full softmax; the backward is written out because autograd's (a scatter into a dense
    zero tensor, then softmax's backward) makes two more passes over (N, E)."""

    @staticmethod
    def forward(ctx, logits, k):
        probs = logits.softmax(-1)
        lib = _library()
        if lib and probs.dtype == torch.float32 and probs.device.type == "cpu":
            probs = probs.contiguous()
            gates = probs.new_empty(len(probs), k)
            experts = torch.empty(len(probs), k, dtype=torch.long)
            lib.uncurl_topk(
                len(probs),
                probs.shape[1],
                k,
                probs.data_ptr(),
                gates.data_ptr(),
                experts.data_ptr(),
            )
        else:
            gates, experts = probs.topk(k, dim=-1)
        ctx.save_for_backward(probs, gates, experts)
        ctx.mark_non_differentiable(experts)
        return gates, experts

    @staticmethod
    def backward(ctx, grad_gates, _):
        probs, gates, experts = ctx.saved_tensors
        # d gate_j / d logit_m = gate_j * ([m == expert_j] - p_m)
        weighted = grad_gates * gates
        grad = probs * -weighted.sum(-1, keepdim=True)
        return grad.scatter_add_(1, experts, weighted), None


def sort_slots(experts: torch.Tensor, n_expert: int, capacity: int | None):
    """Dispatch of top-k choices experts (N, k): the slots s = j * N + n (token n's j-th choice)
    sorted by expert, stably, each expert keeping its first `capacity` (all if None). Returns kept
    slots (M,), tokens routed and kept per expert (E,) each, and a dropped flag per slot (k * N,).
    Slots are choice-major, so first choices win capacity before second choices, and earlier
    tokens before later ones, as in Switch/GShard."""
    n, k = experts.shape
    lib = _library()
    if lib and experts.device.type == "cpu":
        experts = experts.contiguous()
        kept, dropped = torch.empty(n * k, dtype=torch.long), torch.empty(n * k, dtype=torch.bool)
        counts, sizes = (torch.empty(n_expert, dtype=torch.long) for _ in range(2))
        m = lib.uncurl_dispatch(
            n,
            k,
            n_expert,
            experts.data_ptr(),
            -1 if capacity is None else capacity,
            kept.data_ptr(),
            counts.data_ptr(),
            sizes.data_ptr(),
            dropped.data_ptr(),
        )
        if m < 0:
            raise MemoryError("uncurl.model.kernels: no memory for dispatch")
        return kept[:m], counts, sizes, dropped
    slot_expert = experts.t().reshape(-1)  # (k*N,)
    order = slot_expert.argsort(stable=True)
    counts = torch.bincount(slot_expert, minlength=n_expert)
    starts = counts.cumsum(0) - counts
    # position of each sorted slot within its expert's queue
    rank = torch.arange(k * n, device=experts.device) - starts[slot_expert[order]]
    kept = order if capacity is None else order[rank < capacity]
    sizes = counts if capacity is None else counts.clamp(max=capacity)
    dropped = torch.ones(k * n, dtype=torch.bool, device=experts.device)
    dropped[kept] = False
    return kept, counts, sizes, dropped


class CausalAttention(torch.autograd.Function):
    """Causal self-attention of sequences on token rows: qkv (N, 3C) holds each token's queries,
    keys and values (H heads of D = C / H columns each), the output is (N, C), heads side by
    side. `CausalAttention.apply(qkv, shapes, H)`: the rows are blocks of B sequences of T
    tokens, one (B, T) in `shapes` each (a population's members, each on its own batch), every
    block read and written in place, so that no copy joins them; `has_attention` says the kernel
    serves them. One pass per head and sequence, deterministic."""

    @staticmethod
    def forward(ctx, qkv, shapes, h):
        qkv = qkv.contiguous()
        c = qkv.shape[1] // 3
        out = qkv.new_empty(len(qkv), c)
        stats = qkv.new_empty(2 * len(qkv) * h)  # each block's (2, B, H, T) softmax statistics
        d = c // h
        for (b, t), (rows, at) in zip(shapes, _blocks(shapes, h), strict=True):
            _status(
                _library().uncurl_attention_forward(
                    b, t, h, d, d**-0.5, _at(qkv, rows), _at(out, rows), _at(stats, at)
                )
            )
        ctx.save_for_backward(qkv, out, stats)
        ctx.shapes, ctx.h = shapes, h
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, stats = ctx.saved_tensors
        h = ctx.h
        d = out.shape[1] // h
        grad_out = grad_out.contiguous()
        grad = torch.empty_like(qkv)
        for (b, t), (rows, at) in zip(ctx.shapes, _blocks(ctx.shapes, h), strict=True):
            _status(
                _library().uncurl_attention_backward(
                    b,
                    t,
                    h,
                    d,
                    d**-0.5,
                    _at(qkv, rows),
                    _at(out, rows),
                    _at(grad_out, rows),
                    _at(stats, at),
                    _at(grad, rows),
                )
            )
        return grad, None, None


def _blocks(shapes, h: int) -> list[tuple[int, int]]:
    """Each (B, T) block's first row and the start of its statistics (2 B H T floats)."""
    rows = itertools.accumulate((b * t for b, t in shapes[:-1]), initial=0)
    return [(r, 2 * r * h) for r in rows]


def _at(x: torch.Tensor, row: int) -> int:
    """The address of row `row` of x (contiguous; a flat x counts floats)."""
    return x.data_ptr() + row * x.stride(0) * x.element_size()


def has_attention(qkv: torch.Tensor, n_head: int) -> bool:
    """Whether `CausalAttention` serves these rows: float32 on this CPU's kernels, one thread,
    heads a multiple of 8 floats wide."""
    head = qkv.shape[1] // 3 // n_head
    return _gemm_for(qkv) and head % 8 == 0


def _status(code: int) -> None:
    if code:
        raise MemoryError("uncurl.model.kernels: no memory for attention's scratch buffer")


def backend(device_type: str = "cpu") -> str:
    """Which path products take: float32 on a CPU, 'avx512 kernel', 'avx2 kernel' (the same
    bits; AVX-512 twice the floats per instruction) or 'torch'; bfloat16 on a GPU (training's
    precision there), 'grouped_mm' or 'torch'."""
    if device_type != "cpu":
        return "grouped_mm" if uses_grouped_mm(device_type, torch.bfloat16, ()) else "torch"
    if not _has_gemm():
        return "torch"
    return "avx512 kernel" if _library().uncurl_avx512(-1) else "avx2 kernel"


def _check(sizes, rows, experts, inner):
    """Shapes the kernel relies on (it would read past a tensor's end otherwise)."""
    if len(sizes) != experts or sum(sizes) != rows or min(sizes, default=0) < 0:
        raise ValueError(
            f"sizes ({len(sizes)} experts, {sum(sizes)} rows) do not match the "
            f"operands ({experts} experts, {rows} rows)"
        )
    if inner[0] != inner[1]:
        raise ValueError(f"inner dimensions differ: {inner[0]} and {inner[1]}")


def _gemm_for(*tensors) -> bool:
    # the kernel runs on one thread; with more, torch's threaded BLAS is the safer choice
    return (
        _has_gemm()
        and torch.get_num_threads() == 1
        and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)
    )


@functools.cache
def _has_gemm() -> bool:
    lib = _library()
    return bool(lib and lib.uncurl_gemm_supported())


def _gemm(
    sizes,
    k_grouped,
    M,
    N,
    K,
    a,
    a_strides,
    b,
    b_strides,
    bias,
    out,
    ldc,
    out_stride,
    b_sums=None,
    epilogue=0,
    aux=None,
):
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    status = _library().uncurl_grouped_gemm(
        len(sizes),
        (ctypes.c_int64 * len(sizes))(*sizes),
        k_grouped,
        M,
        N,
        K,
        ptr(a),
        *a_strides,
        ptr(b),
        *b_strides,
        ptr(bias),
        0 if bias is None else bias.stride(0),
        ptr(out),
        ldc,
        out_stride,
        ptr(b_sums),
        epilogue,
        ptr(aux),
    )
    if status:
        raise MemoryError(
            "uncurl.model.kernels: no memory for the grouped product's scratch buffer"
        )


@functools.cache
def _library():
    """The compiled kernels, or None where they cannot be built (after one warning)."""
    if os.environ.get("UNCURL_KERNELS") == "torch":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(
            f"uncurl.model.kernels: could not build {SOURCE.name} ({detail}); MoE layers "
            "run on torch ops alone. Install a C compiler (or set CC) to get the "
            "kernels, or set UNCURL_KERNELS=torch to silence this.",
            stacklevel=2,
        )
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.uncurl_grouped_gemm.argtypes = [
        i64,
        ptr,
        ctypes.c_int,
        i64,
        i64,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        ctypes.c_int,
        ptr,
    ]
    attention = [i64, i64, i64, i64, ctypes.c_float, ptr, ptr]
    lib.uncurl_attention_forward.argtypes = [*attention, ptr]
    lib.uncurl_attention_backward.argtypes = [*attention, ptr, ptr, ptr]
    lib.uncurl_avx512.argtypes = [ctypes.c_int]
    lib.uncurl_topk.argtypes = [i64, i64, i64, ptr, ptr, ptr]
    lib.uncurl_dispatch.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr]
    lib.uncurl_dispatch.restype = i64
    return lib


def _build() -> Path:
    """Compile the kernels once per source and flags; the library is renamed into place whole."""
    cache = Path(os.environ.get("UNCURL_CACHE", Path.home() / ".cache" / "uncurl"))
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    lib = cache / f"kernels-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / lib.name
            subprocess.run(
                [os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(built)],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(built, lib)
    return lib
