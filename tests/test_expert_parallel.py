"""Expert parallelism across two real processes (gloo): the same outputs as one process, and the
cost model's byte count equal to the buffers actually handed to all_to_all."""

from dataclasses import fields
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from uncurl import timing
from uncurl.bench import costmodel
from uncurl.config import ModelConfig, get_profile
from uncurl.model import GPT, MoE, expert_parallel
from uncurl.model.expert_parallel import (
    ExpertParallelMoE,
    Phases,
    launch,
    scatter,
    shard_model,
)

TOKENS = 24  # per rank
CASES = {  # name: (top_k, evaluation capacity factor); 1.0 drops tokens, None is dropless
    "top-1, capacity 1.0": (1, 1.0),
    "top-2, capacity 1.0": (2, 1.0),
    "top-1, dropless": (1, None),
}


def make_moe(top_k, factor, n_expert=4) -> MoE:
    torch.manual_seed(0)  # every rank builds the same weights
    cfg = ModelConfig(n_embd=16, n_head=2, top_k=top_k, eval_capacity_factor=factor)
    moe = MoE(cfg, n_expert).eval()
    for p in moe.parameters():
        nn.init.normal_(p, 0.0, 0.5)  # non-zero biases too
    return moe


def compare(rank, world):
    """Each rank: its own tokens through the whole layer and through its expert-parallel part."""
    results = {}
    for name, (top_k, factor) in CASES.items():
        moe = make_moe(top_k, factor)
        x = torch.randn(world, TOKENS, 16, generator=torch.Generator().manual_seed(1))[rank]
        want, want_routing = moe(x)
        layer = ExpertParallelMoE(moe, rank, world)
        got, routing = layer(x)
        results[name] = {
            "diff": (got - want).abs().max().item(),
            "norm": want.norm().item(),
            "same_routing": torch.equal(routing.experts, want_routing.experts),
            "dropped": int(routing.dropped.sum()),
            "phases": layer.phases.as_dict(),
            "local_experts": layer.w_fc.shape[0],
            "counts": routing.counts.tolist(),
        }
    # dropless, rank 1's tokens all alike: its one full expert sets both ranks' buffer size
    moe = make_moe(1, None)
    x = torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(3))
    x = x[:1].expand(TOKENS, 16) if rank == 1 else x
    layer = ExpertParallelMoE(moe, rank, world)
    got, routing = layer(x)
    results["skewed dropless"] = {
        "diff": (got - moe(x)[0]).abs().max().item(),
        "counts": routing.counts.tolist(),
        "bytes_sent": layer.phases.bytes_sent,
    }
    model = GPT(get_profile("smoke").model_config(n_expert=4)).eval()  # seeded above
    idx = torch.randint(
        0, model.cfg.vocab_size, (world, 2, 16), generator=torch.Generator().manual_seed(2)
    )[rank]
    want = model(idx).logits
    layers = shard_model(model, rank, world)
    results["gpt"] = (model(idx).logits - want).abs().max().item()
    results["gpt_phases"] = [layer.phases.as_dict() for layer in layers]
    results["clocked"] = clocked_phases(rank, world)
    return results


# seconds a fake clock advances in each step of a layer's forward, so that a phase's total
# shows which steps it timed: the router's dispatch, the scatter into the capacity buffer, an
# exchange, the experts' product
DISPATCH_S, SCATTER_S, EXCHANGE_S, EXPERTS_S = 1.0, 2.0, 10.0, 100.0


def clocked_phases(rank, world):
    """Phases of one layer called twice, then reset, on a clock that advances only in the steps
    above (the combine advances it by nothing)."""
    clock = [0.0]

    def advancing(fn, seconds):
        def step(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)

        return step

    fake_time = SimpleNamespace(perf_counter=lambda: clock[0])
    layer = ExpertParallelMoE(make_moe(1, 1.0), rank, world)
    x = torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(rank))
    with (
        mock.patch.object(timing, "time", fake_time),
        mock.patch.object(
            expert_parallel, "dispatch", advancing(expert_parallel.dispatch, DISPATCH_S)
        ),
        mock.patch.object(expert_parallel, "scatter", advancing(scatter, SCATTER_S)),
        mock.patch.object(dist, "all_to_all_single", advancing(dist.all_to_all_single, EXCHANGE_S)),
        mock.patch.object(
            expert_parallel.GroupedMLP,
            "apply",
            advancing(expert_parallel.GroupedMLP.apply, EXPERTS_S),
        ),
    ):
        layer(x)
        once = layer.phases.as_dict()
        layer(x)
        twice = layer.phases.as_dict()
    layer.phases.reset()
    return {"once": once, "twice": twice, "reset": layer.phases.as_dict()}


@pytest.fixture(scope="module")
def two_ranks():
    return launch(compare, 2)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_single_process_outputs(two_ranks, case):
    for rank in two_ranks:
        r = rank[case]
        assert r["same_routing"] and r["local_experts"] == 2 and r["norm"] > 1
        assert r["diff"] < 1e-5
    if CASES[case][1] is not None:
        assert sum(rank[case]["dropped"] for rank in two_ranks) > 0, "capacity must bite"


def test_a_sharded_gpt_gives_the_single_process_logits(two_ranks):
    assert all(rank["gpt"] < 1e-5 for rank in two_ranks)


@pytest.mark.parametrize("case", ["top-1, capacity 1.0", "top-2, capacity 1.0"])
def test_cost_model_counts_the_bytes_sent(two_ranks, case):
    top_k, factor = CASES[case]
    cfg = make_moe(top_k, factor).cfg
    per_exchange = costmodel.buffer_bytes(cfg, 4, TOKENS, dtype_bytes=4)
    for rank in two_ranks:
        assert rank[case]["phases"]["bytes_sent"] == 2 * per_exchange


def test_each_phase_times_its_own_steps_and_calls_are_counted(two_ranks):
    for rank in two_ranks:
        once, twice, reset = (rank["clocked"][k] for k in ("once", "twice", "reset"))
        assert set(once) == {f.name for f in fields(Phases)}
        times = {p: once[p] for p in ("route", "first_a2a", "compute", "second_a2a", "combine")}
        assert times == {
            "route": DISPATCH_S + SCATTER_S,
            "first_a2a": EXCHANGE_S,
            "compute": EXPERTS_S,
            "second_a2a": EXCHANGE_S,
            "combine": 0.0,
        }
        assert once["calls"] == 1 and twice["calls"] == 2
        assert twice == {k: 2 * v for k, v in once.items()}  # bytes and seconds add up
        assert reset == Phases().as_dict() and all(v == 0 for v in reset.values())


def test_dropless_buffers_hold_the_fullest_expert_of_any_rank(two_ranks):
    """Without a capacity, both ranks size their buffers by the longest expert queue of either."""
    skewed = [rank["skewed dropless"] for rank in two_ranks]
    assert max(skewed[1]["counts"]) == TOKENS > max(skewed[0]["counts"])
    for r in skewed:
        assert r["bytes_sent"] == 2 * 4 * TOKENS * 16 * 4  # two (E, C, d) float32 buffers
        assert r["diff"] < 1e-5


def test_every_moe_layer_of_a_sharded_gpt_counts_its_call_and_bytes(two_ranks):
    cfg = get_profile("smoke").model_config(n_expert=4)
    per_exchange = costmodel.buffer_bytes(cfg, 4, tokens=2 * 16, dtype_bytes=4)
    for rank in two_ranks:
        assert len(rank["gpt_phases"]) == len(cfg.moe_layers)
        for phases in rank["gpt_phases"]:
            assert phases["calls"] == 1 and phases["bytes_sent"] == 2 * per_exchange


def test_scatter_places_each_slot_at_its_expert_and_queue_position():
    x = torch.arange(5.0).unsqueeze(1)  # token i holds value i
    token, sizes = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 0, 3])  # sorted by expert
    buffer, slot = scatter(x, token, sizes, capacity=3)
    assert buffer.squeeze(-1).tolist() == [[3, 0, 0], [0, 0, 0], [0, 4, 1]]
    assert slot.tolist() == [0, 6, 7, 8]


def test_experts_must_split_evenly():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        ExpertParallelMoE(make_moe(1, 1.0), 0, 3)
