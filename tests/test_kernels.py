"""uncurl.model.kernels: the C kernels compute what their torch fallbacks compute, on awkward
shapes, and a kernel that cannot be built falls back with a warning instead of failing."""

import pytest
import torch

from uncurl.config import get_profile
from uncurl.model import MoE, kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # the grouped product's condition
KERNEL = kernels.backend()
needs_kernels = pytest.mark.skipif(
    KERNEL == "torch", reason="needs x86-64 with AVX2/FMA and a C compiler"
)
# rows per expert: empty experts, fewer rows than a register tile (6), and ragged remainders
SIZES = [5, 0, 13, 7, 1, 40, 300, 0]
# (K, N): a panel (16 columns) exactly, ragged columns, and K past one depth pass (256)
SHAPES = [(64, 256), (72, 40), (3, 5), (700, 17)]


@pytest.fixture
def torch_only(monkeypatch):
    """Run the torch fallbacks, then give the kernels back."""
    monkeypatch.setenv("UNCURL_KERNELS", "torch")
    _reset()
    yield
    monkeypatch.delenv("UNCURL_KERNELS")
    _reset()


def _reset():
    kernels._library.cache_clear()
    kernels._has_gemm.cache_clear()


def _both(fn, *args):
    """fn(*args) on the kernels and on the torch fallbacks."""
    out = fn(*args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNCURL_KERNELS", "torch")
        _reset()
        ref = fn(*args)
    _reset()
    return out, ref


@needs_kernels
@pytest.mark.parametrize("k,n", SHAPES)
def test_expert_mm_matches_one_product_per_expert(k, n):
    torch.manual_seed(0)
    a, b = torch.randn(sum(SIZES), k), torch.randn(len(SIZES), k, n)
    bias = torch.randn(len(SIZES), n)
    for args in [
        (a, b, SIZES, bias),
        (a, b, SIZES),
        (a.t().contiguous().t(), b.transpose(1, 2).contiguous().transpose(1, 2), SIZES),
    ]:
        out, ref = _both(kernels.expert_mm, *args)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("k,n", SHAPES)
def test_expert_outer_matches_and_sums_rows(k, n):
    torch.manual_seed(0)
    a, b = torch.randn(sum(SIZES), k), torch.randn(sum(SIZES), n)
    sums = {}

    def outer(a, b):
        sums[kernels.backend()] = torch.full((len(SIZES), n), float("nan"))
        return kernels.expert_outer(a, b, SIZES, sums[kernels.backend()])

    out, ref = _both(outer, a, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums[KERNEL], sums["torch"], rtol=1e-5, atol=1e-4)
    assert out[1].abs().sum() == 0 and sums[KERNEL][1].abs().sum() == 0  # no rows


@needs_kernels
@pytest.mark.parametrize("k,n", SHAPES)
def test_gelu_in_the_product_matches_torch_and_leaves_the_product_alone(k, n):
    torch.manual_seed(0)
    a, b, bias = torch.randn(sum(SIZES), k), torch.randn(len(SIZES), k, n), torch.randn(8, n)
    b /= k**0.5  # pre-activations of order 1, where GELU bends
    (pre, act), (ref_pre, ref_act) = _both(kernels.expert_mm_gelu, a, b, SIZES, bias)
    assert torch.equal(pre, kernels.expert_mm(a, b, SIZES, bias))
    torch.testing.assert_close(pre, ref_pre, rtol=1e-5, atol=1e-4)
    # both within 1.5e-7 of erf: against float64, the kernel's error is at most torch's
    exact = torch.nn.functional.gelu(pre.double())
    assert (act - exact).abs().max() <= max(2e-6, (ref_act - exact).abs().max())


@needs_kernels
@pytest.mark.parametrize("k,n", SHAPES)
def test_gelu_gradient_in_the_product_matches_torch(k, n):
    torch.manual_seed(0)
    g, w, pre = (
        torch.randn(sum(SIZES), k),
        torch.randn(len(SIZES), k, n),
        torch.randn(sum(SIZES), n),
    )
    out, ref = _both(kernels.expert_mm_gelu_grad, g, w, SIZES, pre)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="pre has shape"):
        kernels.expert_mm_gelu_grad(g, w, SIZES, pre[:, :-1])


@needs_kernels
def test_gelu_in_the_product_keeps_its_extremes():
    x = torch.tensor([[-float("inf"), -60.0, -9.0, -1e-30, 0.0, 1e-30, 9.0, 60.0, float("inf")]])
    pre, act = kernels.expert_mm_gelu(x.t().contiguous(), torch.ones(1, 1, 1), [x.shape[1]])
    expected = torch.nn.functional.gelu(pre)
    torch.testing.assert_close(act[1:-1], expected[1:-1], rtol=0, atol=1e-7)
    assert act[-1] == float("inf") and act[0].isnan() and expected[0].isnan()
    grad = kernels.expert_mm_gelu_grad(torch.ones(9, 1), torch.ones(1, 1, 1), [9], pre)
    assert grad[4] == 0.5 and grad[1] == 0 and grad[7] == 1  # GELU'(0), far left, far right


@needs_kernels
@pytest.mark.parametrize("k", [1, 2, 3])
def test_softmax_topk_matches_torch_and_its_gradient(k):
    torch.manual_seed(0)
    logits = torch.randn(300, 13, requires_grad=True)
    weights = torch.randn(300, k)
    gates, experts = kernels.SoftmaxTopK.apply(logits, k)
    ref_gates, ref_experts = logits.softmax(-1).topk(k, dim=-1)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(gates, ref_gates, rtol=0, atol=0)
    (grad,) = torch.autograd.grad((gates * weights).sum(), logits)
    (ref,) = torch.autograd.grad((ref_gates * weights).sum(), logits)
    torch.testing.assert_close(grad, ref)


def test_softmax_topk_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kernels.SoftmaxTopK.apply(x, 2)[0], (logits,))


@needs_kernels
def test_softmax_top1_ties_go_to_the_lower_expert():
    gates, experts = kernels.SoftmaxTopK.apply(torch.zeros(3, 16), 1)
    assert experts.flatten().tolist() == [0, 0, 0]
    torch.testing.assert_close(gates, torch.full((3, 1), 1 / 16))


@needs_kernels
@pytest.mark.parametrize("k,capacity", [(1, None), (1, 3), (2, 5), (3, 0)])
def test_sort_slots_matches_the_torch_sort(k, capacity):
    torch.manual_seed(k)
    experts = torch.stack([torch.randperm(8)[:k] for _ in range(100)])
    out, ref = _both(kernels.sort_slots, experts, 8, capacity)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and torch.equal(o, r)


@needs_kernels
def test_moe_layer_on_kernels_matches_torch():
    cfg = get_profile("smoke").model_config(n_expert=4)
    torch.manual_seed(0)
    moe = MoE(cfg, 4).train()
    for p in (moe.w_fc, moe.w_proj):
        torch.nn.init.normal_(p, 0, 0.02)
    x = torch.randn(2, cfg.block_size, cfg.n_embd)

    def step(x):
        moe.zero_grad(set_to_none=True)
        y, _ = moe(x)
        y.square().sum().backward()
        return y, *(p.grad for p in moe.parameters())

    for out, ref in zip(*_both(step, x), strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: kernels.expert_mm(a, b, [2, 3]),  # rows do not add up
        lambda a, b: kernels.expert_mm(a, b, [2, 2, 0]),  # one expert too many
        lambda a, b: kernels.expert_mm(a, b.transpose(1, 2), [2, 2]),  # inner dimensions differ
        lambda a, b: kernels.expert_mm(a, b, [2, 2], torch.zeros(2, 3)),  # bias of the wrong width
        lambda a, b: kernels.expert_outer(a, a[:3], [2, 2]),  # rows of a and b differ
    ],
)
def test_mismatched_shapes_are_refused_before_the_kernel_runs(call):
    a, b = torch.randn(4, 3), torch.randn(2, 3, 5)
    with pytest.raises(ValueError):
        call(a, b)


def test_a_kernel_that_cannot_be_built_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("UNCURL_CACHE", str(tmp_path))
    _reset()
    try:
        with pytest.warns(UserWarning, match="could not build kernels.c"):
            assert kernels.backend() == "torch"
        a, b = torch.randn(6, 3), torch.randn(2, 3, 4)
        out = kernels.expert_mm(a, b, [2, 4])
        torch.testing.assert_close(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))
    finally:
        monkeypatch.undo()
        _reset()


def _refuse(*args, **kwargs):
    raise AssertionError("the C library was reached")


def _every_path(x_rows=12):
    """Each entry of the kernels module once, and the MoE layer forward and backward: outputs
    beside references computed from plain torch ops."""
    torch.manual_seed(0)
    sizes = [3, 0, 9]
    a, b, bias = torch.randn(12, 5), torch.randn(3, 5, 4), torch.randn(3, 4)
    ref = torch.cat([a[:3] @ b[0] + bias[0], a[3:] @ b[2] + bias[2]])
    yield kernels.expert_mm(a, b, sizes, bias), ref
    g, sums = torch.randn(12, 4), torch.full((3, 4), float("nan"))
    outer = kernels.expert_outer(a, g, sizes, sums)
    yield outer, torch.stack([a[:3].t() @ g[:3], torch.zeros(5, 4), a[3:].t() @ g[3:]])
    yield sums, torch.stack([g[:3].sum(0), torch.zeros(4), g[3:].sum(0)])
    logits = torch.randn(x_rows, 6)
    gates, experts = kernels.SoftmaxTopK.apply(logits, 2)
    ref_gates, ref_experts = logits.softmax(-1).topk(2, dim=-1)
    yield gates, ref_gates
    yield experts, ref_experts
    kept, counts, sizes_kept, dropped = kernels.sort_slots(experts, 6, None)
    slots = experts.t().reshape(-1)
    yield kept, slots.argsort(stable=True)
    yield counts, torch.bincount(slots, minlength=6)
    yield dropped, torch.zeros(2 * x_rows, dtype=torch.bool)
    cfg = get_profile("smoke").model_config(n_expert=4, top_k=2)
    moe = MoE(cfg, 4)
    x = torch.randn(x_rows, cfg.n_embd, requires_grad=True)
    y, r = moe(x, dropless=True)
    per_token = [
        sum(r.gates[n, j] * moe.expert(int(r.experts[n, j]), x[n]) for j in range(2))
        for n in range(x_rows)
    ]
    yield y, torch.stack(per_token)
    (grad,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(torch.stack(per_token).square().sum(), x)
    yield grad, ref_grad


def test_torch_only_switch_keeps_every_computation_off_the_c_library(torch_only, monkeypatch):
    monkeypatch.setattr(kernels, "_build", _refuse)  # building or loading the library
    monkeypatch.setattr(kernels, "_gemm", _refuse)  # the grouped product's entry
    assert kernels.backend() == "torch"
    for out, ref in _every_path():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_without_the_switch_the_same_calls_reach_the_c_library(monkeypatch):
    """The control of the test above: there, the refusals would have been hit."""
    _reset()
    monkeypatch.setattr(kernels, "_gemm", _refuse)
    with pytest.raises(AssertionError, match="C library was reached"):
        list(_every_path())
    _reset()
    monkeypatch.setattr(kernels, "_build", _refuse)
    with pytest.raises(AssertionError, match="C library was reached"):
        kernels.backend()
    monkeypatch.undo()
    _reset()
    assert kernels.backend() in ("avx2 kernel", "avx512 kernel")


@needs_kernels
def test_grouped_product_leaves_several_threads_to_torch():
    a = torch.randn(4, 4)
    assert kernels._gemm_for(a)
    torch.set_num_threads(2)  # one_thread restores the count
    assert not kernels._gemm_for(a)


def _attention_reference(qkv, b, t, h):
    """torch's causal attention of the rows, in float64."""
    c = qkv.shape[1] // 3
    q, k, v = (
        x.view(b, t, h, c // h).transpose(1, 2) for x in qkv.double().view(b, t, 3 * c).split(c, 2)
    )
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b * t, c)


@needs_kernels
@pytest.mark.parametrize("b,t,h,d", [(2, 5, 2, 8), (3, 103, 4, 16), (1, 1, 1, 8), (2, 37, 1, 64)])
def test_causal_attention_matches_torch_and_its_gradient(b, t, h, d):
    torch.manual_seed(0)
    qkv = torch.randn(b * t, 3 * h * d, requires_grad=True)
    assert kernels.has_attention(qkv, h)
    grad = torch.randn(b * t, h * d)
    y = kernels.CausalAttention.apply(qkv, ((b, t),), h)
    (g,) = torch.autograd.grad(y, qkv, grad)
    ref = _attention_reference(qkv, b, t, h)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad.double())
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)  # g_ref: float64 math, cast back
    again = kernels.CausalAttention.apply(qkv[: t * (b - 1) or t], ((max(b - 1, 1), t),), h)
    assert torch.equal(again, y[: len(again)])  # a sequence's result does not depend on the others


@needs_kernels
def test_causal_attention_of_blocks_gives_each_block_its_bits_alone():
    """A population's members, each its own (B, T), in one call: each block's output and
    gradient are those of the block alone."""
    torch.manual_seed(0)
    shapes = ((2, 37), (1, 103), (3, 5))
    qkv = torch.randn(sum(b * t for b, t in shapes), 3 * 64, requires_grad=True)
    grad = torch.randn(len(qkv), 64)
    y = kernels.CausalAttention.apply(qkv, shapes, 4)
    (g,) = torch.autograd.grad(y, qkv, grad)
    rows = [b * t for b, t in shapes]
    for shape, part, y_m, g_m, grad_m in zip(
        shapes, qkv.split(rows), y.split(rows), g.split(rows), grad.split(rows), strict=True
    ):
        alone = kernels.CausalAttention.apply(part, (shape,), 4)
        assert torch.equal(alone, y_m)
        assert torch.equal(torch.autograd.grad(alone, part, grad_m)[0], g_m)


def test_attention_of_other_heads_is_left_to_torch():
    assert not kernels.has_attention(torch.randn(4, 3 * 12), 2)  # heads of 6 floats
    assert not kernels.has_attention(torch.randn(4, 3 * 16, dtype=torch.float64), 2)


@needs_kernels
@pytest.mark.skipif(KERNEL != "avx512 kernel", reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("k,n", SHAPES)
def test_avx512_tiles_give_the_avx2_tiles_bits(k, n):  # GELU's epilogues too
    torch.manual_seed(0)
    a, b, g = torch.randn(sum(SIZES), k), torch.randn(len(SIZES), k, n), torch.randn(sum(SIZES), n)
    lib = kernels._library()
    out = {}
    for wide in (1, 0):
        lib.uncurl_avx512(wide)
        out[wide] = (
            kernels.expert_mm(a, b, SIZES),
            kernels.expert_outer(a, g, SIZES),
            *kernels.expert_mm_gelu(a, b, SIZES),
            kernels.expert_mm_gelu_grad(a, b, SIZES, g),
        )
    lib.uncurl_avx512(1)
    assert all(torch.equal(x, y) for x, y in zip(out[0], out[1], strict=True))


@needs_kernels
@pytest.mark.skipif(KERNEL != "avx512 kernel", reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("b,t,h,d", [(2, 5, 2, 8), (3, 103, 4, 16), (1, 1, 1, 24), (2, 70, 1, 64)])
def test_avx512_attention_gives_the_avx2_bits(b, t, h, d):
    torch.manual_seed(0)
    qkv = torch.randn(b * t, 3 * h * d, requires_grad=True)
    grad = torch.randn(b * t, h * d)
    lib = kernels._library()
    out = {}
    for wide in (1, 0):
        lib.uncurl_avx512(wide)
        y = kernels.CausalAttention.apply(qkv, ((b, t),), h)
        out[wide] = (y, *torch.autograd.grad(y, qkv, grad))
    lib.uncurl_avx512(1)
    assert all(torch.equal(x, y) for x, y in zip(out[0], out[1], strict=True))


@pytest.mark.parametrize(
    ("device", "dtype", "widths", "chosen"),
    [
        ("cuda", torch.bfloat16, (64, 256), True),
        ("cuda", torch.float32, (64, 256), False),  # grouped_mm's GPU kernel is bf16 only
        ("cuda", torch.bfloat16, (64, 36), False),  # 72 bytes: not a 16-byte stride
        ("cpu", torch.bfloat16, (64, 256), False),  # CPUs keep the C kernels or torch.mm
        ("meta", torch.bfloat16, (64, 256), False),
    ],
)
def test_grouped_mm_is_chosen_for_bf16_gpu_products_with_aligned_widths(
    device, dtype, widths, chosen, monkeypatch
):
    monkeypatch.delenv("UNCURL_KERNELS", raising=False)
    assert kernels.uses_grouped_mm(device, dtype, widths) is chosen
    monkeypatch.setenv("UNCURL_KERNELS", "torch")
    assert not kernels.uses_grouped_mm(device, dtype, widths)


def test_the_grouped_mm_path_computes_the_per_expert_products(monkeypatch):
    """Chosen on a CPU for float32 at 16-byte strides (torch runs grouped_mm there too): the MoE
    layer's forward and backward, whose widths qualify, equal the per-token references."""
    calls = []

    def grouped_mm(*args, **kwargs):
        calls.append(args[0].shape)
        return torch_grouped_mm(*args, **kwargs)

    torch_grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    monkeypatch.setattr(
        kernels, "uses_grouped_mm", lambda _, __, widths: all(w % 4 == 0 for w in widths)
    )
    for out, ref in _every_path():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 6  # the layer's two products forward, four backward
