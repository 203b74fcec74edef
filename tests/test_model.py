import math

import pytest
import torch

from uncurl.config import ModelConfig
from uncurl.model import GPT, MLP, MoE, count_parameters, load_balancing_loss

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def moe_layer(n_expert=4, **kw) -> MoE:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "n_expert": n_expert, **kw})
    layer = MoE(cfg, n_expert)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    return layer


def test_one_expert_equals_dense_mlp():
    cfg = ModelConfig(**TINY, n_expert=1)
    torch.manual_seed(0)
    mlp = MLP(cfg)
    moe = MoE(ModelConfig(**TINY, capacity_factor=None), n_expert=1)
    with torch.no_grad():
        moe.router.weight.zero_()  # allocated uninitialised; any finite value routes alike
        moe.w_fc[0].copy_(mlp.c_fc.weight.t())
        moe.b_fc[0].copy_(mlp.c_fc.bias)
        moe.w_proj[0].copy_(mlp.c_proj.weight.t())
        moe.b_proj[0].copy_(mlp.c_proj.bias)
    x = torch.randn(3, 5, 16)
    y, routing = moe(x)
    assert torch.all(routing.gates == 1.0)  # softmax over one expert
    torch.testing.assert_close(y, mlp(x))


def test_aux_loss_closed_form_on_crafted_routing():
    # 4 tokens, 2 experts: top-1 goes to expert 0 three times, expert 1 once.
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    experts = logits.argmax(-1, keepdim=True)
    p = logits.softmax(-1)
    f = torch.tensor([0.75, 0.25])
    expected = 2 * (f * p.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, experts), expected)
    # perfectly balanced uniform routing gives exactly 1
    assert load_balancing_loss(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]])) == 1.0
    # masked tokens do not count
    mask = torch.tensor([True, True, False, False])
    expected_masked = 2 * (torch.tensor([1.0, 0.0]) * p[:2].mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(logits, experts, mask), expected_masked)


def test_capacity_drops_exactly_the_overflow_tokens():
    layer = moe_layer(n_expert=2, capacity_factor=1.0, min_capacity=1).train()
    with torch.no_grad():  # route everything to expert 0 except token 5
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.randn(8, 16)
    x[:, 0] = 1.0
    x[5, 0] = -1.0
    y, routing = layer(x)
    capacity = math.ceil(1.0 * 8 / 2)  # 4
    assert routing.counts.tolist() == [7, 1]
    # the first 4 tokens routed to expert 0 are kept, later ones dropped (output zero)
    expected_dropped = [False] * 4 + [True, False, True, True]
    assert routing.dropped[:, 0].tolist() == expected_dropped
    assert torch.all(y[routing.dropped[:, 0]] == 0)
    assert torch.all(y[~routing.dropped[:, 0]].abs().sum(-1) > 0)
    assert (~routing.dropped).sum() == capacity + 1


def test_dropless_keeps_every_token_and_matches_per_token_reference():
    layer = moe_layer(n_expert=4, top_k=2, capacity_factor=None).train()
    x = torch.randn(10, 16)
    y, routing = layer(x)
    assert not routing.dropped.any()
    ref = torch.zeros_like(x)
    for t in range(10):
        for j in range(2):
            e = routing.experts[t, j]
            h = torch.nn.functional.gelu(x[t] @ layer.w_fc[e] + layer.b_fc[e])
            ref[t] += routing.gates[t, j] * (h @ layer.w_proj[e] + layer.b_proj[e])
    torch.testing.assert_close(y, ref)


def test_first_choices_win_capacity_over_second_choices():
    layer = moe_layer(n_expert=2, top_k=2, capacity_factor=0.5, min_capacity=1)
    with torch.no_grad():  # tokens 0-3 prefer expert 1, tokens 4-7 prefer expert 0
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 1.0, -1.0
    x = torch.randn(8, 16)
    x[:, 0] = torch.tensor([-1.0] * 4 + [1.0] * 4)
    _, routing = layer(x)
    # capacity ceil(0.5 * 8 * 2 / 2) = 4 per expert: all 8 first choices fit, no second choice
    # does, although the earlier tokens' second choices come first in token order
    assert routing.experts[:, 0].tolist() == [1] * 4 + [0] * 4
    assert not routing.dropped[:, 0].any() and routing.dropped[:, 1].all()


def test_router_gets_gradient_from_lm_loss_at_top1():
    cfg = ModelConfig(**TINY, n_expert=4, aux_loss_weight=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 16))
    model(x, x).loss.backward()
    grad = model.h[0].mlp.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_routing_is_returned_per_moe_layer():
    cfg = ModelConfig(**{**TINY, "n_layer": 4}, n_expert=4)
    model = GPT(cfg)
    out = model(torch.randint(0, 64, (3, 8)), return_routing=True)
    assert cfg.moe_layers == (0, 2)
    assert len(out.routing) == 2
    r = out.routing[0]
    assert r.logits.shape == (24, 4) and r.experts.shape == (24, 1)
    assert r.counts.sum() == 24


def test_dense_backbone_has_no_moe():
    model = GPT(ModelConfig(**TINY, n_expert=1))
    assert not model.moe_blocks
    out = model(torch.randint(0, 64, (1, 4)), return_routing=True)
    assert out.routing == () and out.aux_loss == 0


def test_per_layer_expert_counts():
    cfg = ModelConfig(**{**TINY, "n_layer": 4}, n_expert=[3, 5])
    model = GPT(cfg)
    assert [m.n_expert for m in model.moe_blocks] == [3, 5]
    with pytest.raises(ValueError, match="one per MoE layer"):
        ModelConfig(**{**TINY, "n_layer": 4}, n_expert=[3, 5, 7])


@pytest.mark.parametrize("n_expert", [1, 4, [2, 3]])
def test_parameter_count_matches_modules(n_expert):
    cfg = ModelConfig(**{**TINY, "n_layer": 4}, n_expert=n_expert, top_k=2 if n_expert != 1 else 1)
    model = GPT(cfg)
    assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n_expert,billions", [(8, 1.05), (32, 3.4), (64, 6.7), (128, 13.0)])
def test_paper_model_sizes(n_expert, billions):
    cfg = ModelConfig(
        vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024, n_expert=n_expert
    )
    total = count_parameters(cfg)["total"]
    assert abs(total / 1e9 - billions) / billions < 0.03
    assert abs(count_parameters(cfg)["active"] / 1e6 - 354) / 354 < 0.03


def test_bad_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(**TINY, n_expert=2, top_k=3)
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(**{**TINY, "n_head": 3})
    with pytest.raises(ValueError, match="block_size"):
        GPT(ModelConfig(**TINY))(torch.zeros(1, 17, dtype=torch.long))


def test_grouped_mlp_backward_matches_numerical_gradients():
    from torch.autograd import gradcheck

    from uncurl.model import GroupedMLP

    torch.manual_seed(0)
    shapes = [(7, 3), (3, 3, 5), (3, 5), (3, 5, 3), (3, 3)]
    xs, w_fc, b_fc, w_proj, b_proj = (
        torch.randn(s, dtype=torch.double, requires_grad=True) for s in shapes
    )
    sizes = [2, 0, 5]  # an expert with no tokens must get zero gradient, not garbage
    assert gradcheck(
        lambda *t: GroupedMLP.apply(t[0], sizes, *t[1:]), (xs, w_fc, b_fc, w_proj, b_proj)
    )
    assert gradcheck(
        lambda x, a, c: GroupedMLP.apply(x, sizes, a, None, c, None), (xs, w_fc, w_proj)
    )
