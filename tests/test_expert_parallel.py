"""Expert parallelism across two real processes (gloo): the same outputs as one process, and the
cost model's byte count equal to the buffers actually handed to all_to_all."""

import pytest
import torch
import torch.nn as nn

from uncurl.bench import costmodel
from uncurl.config import ModelConfig, get_profile
from uncurl.model import GPT, MoE
from uncurl.model.expert_parallel import ExpertParallelMoE, launch, scatter, shard_model

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
        }
    model = GPT(get_profile("smoke").model_config(n_expert=4)).eval()  # seeded above
    idx = torch.randint(
        0, model.cfg.vocab_size, (world, 2, 16), generator=torch.Generator().manual_seed(2)
    )[rank]
    want = model(idx).logits
    shard_model(model, rank, world)
    results["gpt"] = (model(idx).logits - want).abs().max().item()
    return results


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


def test_phases_are_timed(two_ranks):
    phases = two_ranks[0]["top-1, capacity 1.0"]["phases"]
    assert phases["calls"] == 1
    assert all(phases[p] > 0 for p in ("route", "first_a2a", "compute", "second_a2a"))


def test_scatter_places_each_slot_at_its_expert_and_queue_position():
    x = torch.arange(5.0).unsqueeze(1)  # token i holds value i
    token, sizes = torch.tensor([3, 0, 4, 1]), torch.tensor([1, 0, 3])  # sorted by expert
    buffer, slot = scatter(x, token, sizes, capacity=3)
    assert buffer.squeeze(-1).tolist() == [[3, 0, 0], [0, 0, 0], [0, 4, 1]]
    assert slot.tolist() == [0, 6, 7, 8]


def test_experts_must_split_evenly():
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        ExpertParallelMoE(make_moe(1, 1.0), 0, 3)
