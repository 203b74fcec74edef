"""Expert reduction: each step checked against its method's definition on tiny models."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import SpectralClustering

from uncurl.config import ModelConfig, ReduceConfig
from uncurl.model import GPT
from uncurl.model.checkpoint import load_model, save_checkpoint
from uncurl.model.population import stack
from uncurl.reduce import (
    align_plan,
    apply_plan,
    collect_stats,
    make_plan,
    match_neurons,
    merge_group,
    neuron_scores,
    reduce_model,
    router_warmup,
)
from uncurl.reduce.align import matching_objective
from uncurl.reduce.apply import expert_params
from uncurl.reduce.plan import make_group
from uncurl.reduce.stats import LayerStats
from uncurl.tasks import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n_expert=8, top_k=1, seed=0, **kw) -> GPT:
    """A 4-layer model (MoE layers 0 and 2), dropless, with decisive routing."""
    torch.manual_seed(seed)
    kw = {"eval_capacity_factor": None, "router_init_std": 0.5, **kw}
    cfg = ModelConfig(
        vocab_size=64,
        block_size=16,
        n_layer=4,
        n_head=2,
        n_embd=16,
        d_ff=32,
        n_expert=n_expert,
        top_k=top_k,
        **kw,
    )
    return GPT(cfg).eval()


def task(n_docs=12, seed=0, batch_size=4):
    """Random documents of varied length, so that batches carry padding."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 64, size=rng.integers(5, 40)) for _ in range(n_docs)]
    return make_batches(docs, block_size=16, batch_size=batch_size, seed=seed)


def layer_io(model, batches):
    """Per MoE layer: (inputs, outputs, logits, experts, gates) of the real tokens, all batches."""
    parts = [[] for _ in model.moe_blocks]
    with torch.no_grad():
        for b in batches:
            mask = b.mask.reshape(-1)
            routing = model(b.idx, return_routing=True, dropless=True).routing
            for part, r in zip(parts, routing, strict=True):
                part.append([t[mask] for t in (r.inputs, r.outputs, r.logits, r.experts, r.gates)])
    return [[torch.cat(t) for t in zip(*part, strict=True)] for part in parts]


def partition(groups) -> set:
    return {frozenset(g) for g in groups}


def groups_of(plan, layer=0):
    return [g["members"] for g in plan["layers"][layer]["groups"]]


# statistics


def test_routing_carries_each_layers_input_and_gated_expert_output():
    model, b = tiny(top_k=2), task()[0]
    with torch.no_grad():
        routing = model(b.idx, return_routing=True, dropless=True).routing
        assert len(routing) == 2
        for moe, r in zip(model.moe_blocks, routing, strict=True):
            assert r.inputs.shape == r.outputs.shape == (b.idx.numel(), 16)
            expected = sum(
                r.gates[:, [j]]
                * torch.stack(
                    [moe.expert(int(e), x) for e, x in zip(r.experts[:, j], r.inputs, strict=True)]
                )
                for j in range(2)
            )
            torch.testing.assert_close(r.outputs, expected)


@pytest.mark.parametrize("training", [True, False])
def test_statistics_leave_the_model_in_the_mode_they_found(training):
    model = tiny().train(training)
    collect_stats(model, task())
    assert all(m.training == training for m in model.modules())


def test_streamed_statistics_equal_direct_ones_over_real_tokens_only():
    model, batches = tiny(top_k=2), task()
    stats = collect_stats(model, batches)
    for st, (x, _, logits, experts, _) in zip(stats, layer_io(model, batches), strict=True):
        n_real = int(sum(b.mask.sum() for b in batches))
        assert st.n_tokens == len(x) == n_real < sum(b.mask.numel() for b in batches)
        assert st.counts.tolist() == torch.bincount(experts.flatten(), minlength=8).tolist()
        assert st.top1.tolist() == torch.bincount(experts[:, 0], minlength=8).tolist()
        h = logits.double()
        cos = (h.t() @ h) / torch.outer(h.norm(dim=0), h.norm(dim=0))
        np.testing.assert_allclose(st.similarity(), ((1 + cos) / 2).numpy(), atol=1e-10)
        assert st.similarity().min() >= 0 and st.similarity().max() <= 1 + 1e-12


def test_statistics_are_dropless_even_when_the_model_drops_at_evaluation():
    model = tiny(eval_capacity_factor=0.5, min_capacity=1)
    stats = collect_stats(model, task())
    assert all(st.counts.sum() == st.n_tokens for st in stats)  # every token counted (top-1)
    assert model.moe_blocks[0].cfg.eval_capacity_factor == 0.5  # restored afterwards


def test_reap_score_is_mean_gate_times_output_norm_over_routed_tokens():
    # top-1, dropless: the layer's output for a token is gate * E(x), so its norm is the summand
    model, batches = tiny(n_expert=6), task()
    stats = collect_stats(model, batches, needs=("reap",))
    plan = make_plan(stats, "reap", 3)
    for st, layer, (_, y, _, experts, _) in zip(
        stats, plan["layers"], layer_io(model, batches), strict=True
    ):
        norms = y.norm(dim=-1).double()
        expected = [
            norms[experts[:, 0] == e].mean().item() if st.counts[e] else 0.0 for e in range(6)
        ]
        np.testing.assert_allclose(st.reap_score(), expected, rtol=1e-5)
        kept = [g["members"][0] for g in layer["groups"]]
        assert kept == sorted(np.argsort(-np.array(expected), kind="stable")[:3].tolist())


@pytest.mark.parametrize("top_k", [1, 2])
def test_naee_picks_the_subset_whose_pruned_layer_output_is_closest(top_k):
    model, batches = tiny(n_expert=5, top_k=top_k), task()
    d = 2
    stats = collect_stats(model, batches, needs=("naee",), subset_size=d)
    io = layer_io(model, batches)
    for subset_i, subset in enumerate(itertools.combinations(range(5), d)):
        plan = _plan_of([[[e] for e in subset]] * 2, stats)
        pruned = apply_plan(model, plan, router="keep")
        for li, (x, y, *_) in enumerate(io):
            with torch.no_grad():
                y_pruned = pruned.moe_blocks[li](x)[0]
            error = ((y - y_pruned) ** 2).sum().item()
            np.testing.assert_allclose(stats[li].subset_error[subset_i], error, rtol=1e-4)
    plan = make_plan(stats, "naee", d)
    for st, layer in zip(stats, plan["layers"], strict=True):
        best = tuple(st.subsets[np.argmin(st.subset_error)])
        assert tuple(g["members"][0] for g in layer["groups"]) == best


def _plan_of(groups_per_layer, stats, method="test") -> dict:
    return {
        "method": method,
        "seed": 0,
        "target_n_expert": [len(g) for g in groups_per_layer],
        "layers": [
            {
                "layer": st.layer,
                "source_n_expert": st.n_expert,
                "groups": [make_group(m, st.counts) for m in groups],
            }
            for st, groups in zip(stats, groups_per_layer, strict=True)
        ],
    }


# planning


def crafted(counts, gram=None, top_k=1, layer=0, **kw) -> LayerStats:
    counts = np.asarray(counts)
    z = len(counts)
    gram = np.eye(z) if gram is None else gram
    return LayerStats(layer, top_k, counts, counts, gram, n_tokens=int(counts.sum()), **kw)


def test_greedy_keeps_exactly_the_top_d_by_count():
    st = crafted([5, 9, 0, 9, 3, 7])
    plan = make_plan([st], "greedy", 3)
    assert groups_of(plan) == [[1], [3], [5]]
    assert plan["target_n_expert"] == [3]
    assert all(g["weights"] == [1.0] for g in plan["layers"][0]["groups"])
    assert groups_of(make_plan([st], "greedy", 4)) == [[0], [1], [3], [5]]  # tie 5 vs 3: count


def test_freq_merge_joins_each_expert_to_its_most_similar_centre():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(200, 6))
    st = crafted([10, 1, 8, 2, 0, 7], gram=h.T @ h)
    plan = make_plan([st], "freq-merge", 3)
    centres = [0, 2, 5]
    sim = st.similarity()
    expected = {c: {c} for c in centres}
    for e in (1, 3, 4):
        expected[centres[int(np.argmax(sim[e, centres]))]].add(e)
    assert partition(groups_of(plan)) == {frozenset(g) for g in expected.values()}
    assert {g["anchor"] for g in plan["layers"][0]["groups"]} == set(centres)


def test_mcsmoe_chooses_dominant_experts_globally_and_averages_d_per_layer():
    # layer 0 concentrated on two experts, layer 1 spread, layer 2 in between
    layers = [
        crafted([50, 40, 5, 3, 2, 0], layer=0),
        crafted([17, 17, 17, 17, 16, 16], layer=2),
        crafted([30, 30, 20, 10, 5, 5], layer=4),
    ]
    plan = make_plan(layers, "mcsmoe", 3)
    assert np.mean(plan["target_n_expert"]) == 3
    # the globally most frequent 9 (layer, expert) pairs
    assert plan["target_n_expert"] == [2, 4, 3]
    for layer in plan["layers"]:
        assert sorted(m for g in layer["groups"] for m in g["members"]) == list(range(6))


def test_mcsmoe_keeps_top_k_experts_in_every_layer():
    layers = [
        crafted([100, 0, 0, 0], top_k=2, layer=0),
        crafted([30, 30, 20, 20], top_k=2, layer=2),
    ]
    plan = make_plan(layers, "mcsmoe", 2)
    assert min(plan["target_n_expert"]) >= 2 and np.mean(plan["target_n_expert"]) == 2


def test_random_is_seeded_and_reduces_to_d():
    stats = [crafted(np.ones(16, int), layer=i) for i in (0, 2)]
    a, b, c = (make_plan(stats, "random", 5, ReduceConfig(seed=s)) for s in (0, 0, 1))
    assert a == b and a != c
    assert a["target_n_expert"] == [5, 5]


def test_hcsmoe_is_average_linkage_of_mean_outputs_cut_at_d():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(10, 3)) * rng.uniform(0.2, 3, size=(10, 1))
    st = crafted(np.ones(10, int), output_sum=points * 10)  # mean output = points
    for d in range(1, 10):
        plan = make_plan([st], "hcsmoe", d)
        assert partition(groups_of(plan)) == _average_linkage(points, d)


def _average_linkage(points, d) -> set:
    """Textbook agglomerative clustering: merge the pair of clusters with the smallest mean
    pairwise Euclidean distance until d remain (HC-SMoE's metric)."""
    dist = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > d:
        pairs = itertools.combinations(range(len(clusters)), 2)
        a, b = min(pairs, key=lambda p: dist[np.ix_(clusters[p[0]], clusters[p[1]])].mean())
        clusters[a] += clusters.pop(b)
    return partition(clusters)


def planted(n_expert=8, groups=((0, 3, 5), (1, 6), (2, 7), (4,)), noise=1e-4, top_k=1):
    """Experts planted as groups of near-copies (each member a neuron-permuted copy of its
    group's expert plus noise) whose router rows are near-copies of orthogonal directions."""
    model = tiny(n_expert=n_expert, top_k=top_k)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for moe in model.moe_blocks:
            directions = torch.linalg.qr(torch.randn(16, 16, generator=g))[0].t() * 3
            for gi, members in enumerate(groups):
                shapes = {"w_fc": (16, 32), "b_fc": (32,), "w_proj": (32, 16), "b_proj": (16,)}
                base = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
                for e in members:
                    perm = torch.randperm(32, generator=g)
                    moe.w_fc[e] = base["w_fc"][:, perm] + noise * torch.randn(16, 32, generator=g)
                    moe.w_proj[e] = base["w_proj"][perm] + noise * torch.randn(32, 16, generator=g)
                    moe.b_fc[e] = base["b_fc"][perm]
                    moe.b_proj[e] = base["b_proj"]
                    moe.router.weight[e] = directions[gi] + noise * torch.randn(16, generator=g)
    return model, [list(m) for m in groups]


@pytest.mark.parametrize("top_k", [1, 2])
def test_uncurl_recovers_planted_groups_and_gives_exactly_d_experts(top_k):
    model, groups = planted(top_k=top_k)
    batches = task(n_docs=20)
    reduced, record = reduce_model(model, batches, "uncurl", 4)
    assert record["plan"]["target_n_expert"] == [4, 4]
    for layer in record["plan"]["layers"]:
        assert partition(g["members"] for g in layer["groups"]) == partition(groups)
        assert np.array(layer["embedding"]).shape == (8, 4)
    assert reduced.cfg.n_expert == 4 and [m.n_expert for m in reduced.moe_blocks] == [4, 4]
    # each merged expert computes what its group's members compute (they are near-copies)
    x = torch.randn(10, 16)
    with torch.no_grad():
        for old, new, layer in zip(
            model.moe_blocks, reduced.moe_blocks, record["plan"]["layers"], strict=True
        ):
            for i, group in enumerate(layer["groups"]):
                for m in group["members"]:
                    torch.testing.assert_close(
                        new.expert(i, x), old.expert(m, x), atol=2e-2, rtol=0
                    )


def test_greedy_first_prunes_the_first_layer_and_clusters_the_others():
    model, groups = planted(groups=((0, 1, 2), (3, 4), (5,), (6, 7)), noise=0.3)
    stats = collect_stats(model, task(n_docs=20))
    plan = make_plan(stats, "greedy-first", 4)
    first, second = plan["layers"]
    assert first["router"] == "keep" and all(len(g["members"]) == 1 for g in first["groups"])
    assert groups_of(plan) == groups_of(make_plan(stats, "greedy", 4))
    assert partition(g["members"] for g in second["groups"]) == partition(
        g["members"] for g in make_plan(stats, "uncurl", 4)["layers"][1]["groups"]
    )
    reduced = apply_plan(model, plan, router="reinit")
    kept = [g["anchor"] for g in first["groups"]]
    torch.testing.assert_close(
        reduced.moe_blocks[0].router.weight, model.moe_blocks[0].router.weight[kept]
    )


def test_kmeans_settings_reach_the_clustering():
    model, _ = planted(groups=((0, 1, 2), (3, 4), (5,), (6, 7)), noise=0.3)
    stats = collect_stats(model, task(n_docs=20))
    plan = make_plan(stats, "uncurl", 3, ReduceConfig(kmeans_n_init=1, kmeans_max_iter=1))
    assert plan["kmeans"] == {"n_init": 1, "max_iter": 1}
    with pytest.raises(ValueError, match="max_iter"):
        make_plan(stats, "uncurl", 3, ReduceConfig(kmeans_max_iter=0))


def test_uncurl_clusters_as_sklearn_spectral_clustering_with_precomputed_affinity():
    model, _ = planted(groups=((0, 1, 2), (3, 4), (5,), (6, 7)), noise=0.3)
    stats = collect_stats(model, task(n_docs=20))
    for d in (2, 3, 5):
        plan = make_plan(stats, "uncurl", d, ReduceConfig(seed=3))
        for st, layer in zip(stats, plan["layers"], strict=True):
            labels = SpectralClustering(d, affinity="precomputed", random_state=3).fit_predict(
                st.similarity()
            )
            expected = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
            assert partition(g["members"] for g in layer["groups"]) == partition(expected)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_uncurl_gives_exactly_d_groups_even_when_experts_coincide():
    st = crafted(np.arange(1, 9), gram=np.ones((8, 8)))  # all logit columns identical
    for d in range(1, 8):
        plan = make_plan([st], "uncurl", d)
        assert plan["target_n_expert"] == [d]
        assert sorted(m for g in plan["layers"][0]["groups"] for m in g["members"]) == list(
            range(8)
        )


def test_frequency_weights_sum_to_one_uniform_when_unused_anchor_most_selected():
    groups = make_group([4, 1, 7], counts=np.array([0, 2, 0, 0, 6, 0, 0, 0]))
    assert groups["members"] == [1, 4, 7] and groups["anchor"] == 4
    np.testing.assert_allclose(groups["weights"], [0.25, 0.75, 0.0])
    unused = make_group([2, 5], counts=np.zeros(8))
    assert unused["weights"] == [0.5, 0.5] and unused["anchor"] == 2
    model, batches = tiny(n_expert=6, top_k=2), task()
    for method in ("uncurl", "freq-merge", "mcsmoe", "hcsmoe", "greedy"):
        _, record = reduce_model(model, batches, method, 3)
        for layer in record["plan"]["layers"]:
            for g in layer["groups"]:
                assert sum(g["weights"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("method", "d", "error"),
    [
        ("uncurl", 8, "choose D < 8"),
        ("greedy", 9, "choose D < 8"),
        ("uncurl", 0, "too small"),
        ("kmeans", 4, "unknown method"),
    ],
)
def test_bad_requests_are_named(method, d, error):
    with pytest.raises(ValueError, match=error):
        reduce_model(tiny(), task(), method, d)


def test_d_below_top_k_and_missing_statistics_are_refused():
    with pytest.raises(ValueError, match="top_k=2"):
        reduce_model(tiny(top_k=2), task(), "greedy", 1)
    with pytest.raises(ValueError, match="needs statistics"):
        make_plan(collect_stats(tiny(), task()), "reap", 4)
    with pytest.raises(ValueError, match="at most 16 experts"):
        collect_stats(tiny(n_expert=17), task(), needs=("naee",), subset_size=8)
    with pytest.raises(ValueError, match="dense"):
        reduce_model(tiny(n_expert=1), task(), "greedy", 1)


# alignment and merging


@pytest.mark.parametrize("solver", ["hungarian", "greedy"])
def test_weight_matching_recovers_a_known_permutation_exactly(solver):
    g = torch.Generator().manual_seed(0)
    w_fc, w_proj = torch.randn(16, 64, generator=g), torch.randn(64, 16, generator=g)
    perm = torch.randperm(64, generator=g)
    member_fc, member_proj = w_fc[:, perm], w_proj[perm]  # member neuron j = anchor neuron perm[j]
    found = match_neurons(neuron_scores(w_fc, w_proj, member_fc, member_proj), solver)
    assert torch.equal(member_fc[:, found], w_fc) and torch.equal(member_proj[found], w_proj)


def test_greedy_matching_is_a_permutation_near_the_hungarian_optimum():
    g = torch.Generator().manual_seed(0)
    shapes = ((64, 256), (256, 64), (64, 256), (256, 64))
    scores = neuron_scores(*(torch.randn(s, generator=g) for s in shapes))  # unrelated experts
    best = matching_objective(scores, match_neurons(scores, "hungarian"))
    greedy = match_neurons(scores, "greedy")
    gain = best - np.trace(scores.numpy())  # of the optimum over the identity
    assert sorted(greedy) == list(range(256))
    assert best - 0.05 * gain <= matching_objective(scores, greedy) <= best


def test_merging_permuted_copies_of_one_expert_returns_that_expert():
    model = tiny(n_expert=4)
    moe = model.moe_blocks[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for e in (1, 2):
            perm = torch.randperm(32, generator=g)
            moe.w_fc[e], moe.b_fc[e] = moe.w_fc[0][:, perm], moe.b_fc[0][perm]
            moe.w_proj[e], moe.b_proj[e] = moe.w_proj[0][perm], moe.b_proj[0]
    group = make_group([0, 1, 2], counts=[5, 3, 2, 9])
    plan = {"layers": [{"groups": [group]}, {"groups": []}]}
    merged = merge_group(moe, align_plan(model, plan)["layers"][0]["groups"][0])
    for name, value in expert_params(moe, 0).items():
        torch.testing.assert_close(merged[name], value)
    x = torch.randn(7, 16)
    for e in (0, 1, 2):  # the same function as every member
        torch.testing.assert_close(_ffn(merged, x), moe.expert(e, x))
    unaligned = merge_group(moe, group)  # what merging without weight matching would give
    assert not torch.allclose(_ffn(unaligned, x), moe.expert(0, x), atol=1e-3)


def _ffn(p, x):
    return torch.nn.functional.gelu(x @ p["w_fc"] + p["b_fc"]) @ p["w_proj"] + p["b_proj"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_d_equal_z_with_singletons_is_the_identity(top_k):
    model, b = tiny(top_k=top_k, eval_capacity_factor=1.0), task()[0]
    stats = collect_stats(model, [b])
    same = apply_plan(model, _plan_of([[[e] for e in range(8)]] * 2, stats), router="keep")
    with torch.no_grad():
        assert torch.equal(same(b.idx).logits, model(b.idx).logits)


def test_router_keep_merge_reinit():
    model, b = tiny(n_expert=4), task()[0]
    stats = collect_stats(model, [b])
    stats[0].counts, stats[1].counts = np.array([1, 5, 5, 9]), np.array([1, 2, 9, 4])
    plan = _plan_of([[[0, 3], [1], [2]], [[0], [1, 2, 3]]], stats)
    assert [g["anchor"] for layer in plan["layers"] for g in layer["groups"]] == [3, 1, 2, 0, 2]
    rows = [m.router.weight for m in model.moe_blocks]
    keep = apply_plan(model, plan, "keep")
    merge = apply_plan(model, plan, "merge")
    reinit, again = (
        apply_plan(model, plan, "reinit", seed=1),
        apply_plan(model, plan, "reinit", seed=1),
    )
    for li, layer in enumerate(plan["layers"]):
        for i, g in enumerate(layer["groups"]):
            torch.testing.assert_close(keep.moe_blocks[li].router.weight[i], rows[li][g["anchor"]])
            mixed = sum(w * rows[li][m] for w, m in zip(g["weights"], g["members"], strict=True))
            torch.testing.assert_close(merge.moe_blocks[li].router.weight[i], mixed)
    fresh = [m.router.weight for m in reinit.moe_blocks]
    assert all(
        torch.equal(f, m.router.weight) for f, m in zip(fresh, again.moe_blocks, strict=True)
    )
    assert fresh[0].shape == (3, 16) and fresh[1].shape == (2, 16)
    assert not torch.allclose(fresh[0], keep.moe_blocks[0].router.weight)


def test_reduced_model_holds_its_experts_and_round_trips_with_per_layer_counts(tmp_path):
    model, batches = tiny(n_expert=6), task()
    stats = [crafted([50, 40, 5, 3, 2, 0], layer=0), crafted([10] * 6, layer=2)]
    for real, fake in zip(collect_stats(model, batches), stats, strict=True):
        fake.gram = real.gram
    plan = make_plan(stats, "mcsmoe", 3)
    reduced = apply_plan(model, plan, router="merge")
    assert reduced.cfg.n_expert == tuple(plan["target_n_expert"]) == (2, 4)
    assert [m.w_fc.shape[0] for m in reduced.moe_blocks] == [2, 4]
    save_checkpoint(tmp_path / "r", reduced)
    again = load_model(tmp_path / "r")
    with torch.no_grad():
        torch.testing.assert_close(again(batches[0].idx).logits, reduced(batches[0].idx).logits)


def test_router_warmup_trains_the_routers_only():
    model, batches = tiny(n_expert=4), task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = router_warmup(model, batches, steps=5, lr=1e-2)
    assert len(losses) == 5 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != k.endswith("router.weight"), k
    assert all(p.requires_grad for p in model.parameters())


# HC-SMoE's own merge: tied experts


def tied(top_k=1, d=3, **kw):
    """A source model, its task batches, and its hcsmoe-tied reduction to d experts."""
    model, batches = tiny(top_k=top_k, **kw), task()
    reduced, record = reduce_model(model, batches, "hcsmoe-tied", d)
    return model, batches, reduced, record


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_token_routed_to_expert_e_lands_on_the_merged_expert_of_es_cluster(top_k):
    model, batches, reduced, record = tied(top_k)
    for moe, planned, (x, _, _, experts, gates) in zip(
        reduced.moe_blocks, record["plan"]["layers"], layer_io(model, batches), strict=True
    ):
        cluster = {m: i for i, g in enumerate(planned["groups"]) for m in g["members"]}
        assert moe.ties == tuple(cluster[e] for e in range(8))
        assert moe.router.weight.shape == (8, 16) and moe.w_fc.shape[0] == 3
        with torch.no_grad():
            d = moe.route(x, dropless=True)
        # the original decisions among the 8 experts, gates included
        torch.testing.assert_close(d.routing.experts, experts, rtol=0, atol=0)
        torch.testing.assert_close(d.routing.gates, gates)
        for m, tokens in enumerate(d.token.split(d.sizes.tolist())):
            landed = sorted(tokens.tolist())
            chose = [(n, j) for n in range(len(x)) for j in range(top_k)]
            assert landed == sorted(n for n, j in chose if cluster[int(experts[n, j])] == m)


@pytest.mark.parametrize("top_k", [1, 2])
def test_tied_experts_are_the_source_with_each_member_replaced_by_its_merge(top_k):
    """Capacity and drops too: a tied layer routes per original expert, as its source did."""
    model, batches, reduced, _ = tied(top_k, eval_capacity_factor=1.0, min_capacity=1)
    replaced = GPT(model.cfg).eval()
    replaced.load_state_dict(model.state_dict())
    with torch.no_grad():
        for moe, small in zip(replaced.moe_blocks, reduced.moe_blocks, strict=True):
            for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
                getattr(moe, name).copy_(getattr(small, name)[list(small.ties)])
        b = batches[0]
        want = replaced(b.idx, return_routing=True)
        got = reduced(b.idx, return_routing=True)
    assert any(r.dropped.any() for r in want.routing)
    for w, g in zip(want.routing, got.routing, strict=True):
        assert torch.equal(w.experts, g.experts) and torch.equal(w.dropped, g.dropped)
    torch.testing.assert_close(got.logits, want.logits)


def test_hcsmoe_tied_merges_frequency_weighted_means_of_unaligned_members():
    model, batches, reduced, record = tied(top_k=2)
    _, aligned = reduce_model(model, batches, "hcsmoe", 3)
    stats = collect_stats(model, batches)
    for li, planned in enumerate(record["plan"]["layers"]):
        assert planned["align"] is False and planned["router"] == "tie"
        assert groups_of(record["plan"], li) == groups_of(aligned["plan"], li)  # HC-SMoE's
        for i, g in enumerate(planned["groups"]):
            assert g["perms"] == [None] * len(g["members"])
            top1 = stats[li].top1[g["members"]]  # first choices: HC-SMoE's frequency
            np.testing.assert_allclose(g["weights"], top1 / top1.sum())
            for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
                source = getattr(model.moe_blocks[li], name)[g["members"]]
                mean = torch.einsum("m,m...->...", torch.tensor(g["weights"]), source)
                torch.testing.assert_close(getattr(reduced.moe_blocks[li], name)[i], mean)
    assert any(p is not None for g in aligned["plan"]["layers"][0]["groups"] for p in g["perms"])


def test_a_tied_checkpoint_reloads_scores_and_warms_up_its_kept_router(tmp_path):
    model, batches, reduced, record = tied(top_k=2)
    assert record["router"] == "tie" and record["router_warmup"]["steps"] == 0
    assert torch.equal(reduced.moe_blocks[0].router.weight, model.moe_blocks[0].router.weight)
    save_checkpoint(tmp_path / "r", reduced)
    again = load_model(tmp_path / "r")
    assert again.cfg.tied_experts == reduced.cfg.tied_experts
    b = batches[0]
    with torch.no_grad():
        loss = again(b.idx, b.targets, loss_mask=b.mask).loss
        assert torch.isfinite(loss)
        assert torch.equal(loss, reduced(b.idx, b.targets, loss_mask=b.mask).loss)
    rows = again.moe_blocks[0].router.weight.clone()
    router_warmup(again, batches, steps=2, lr=1e-2)  # as fine-tuning does: trained, not reset
    assert again.moe_blocks[0].router.weight.shape == rows.shape
    assert not torch.equal(again.moe_blocks[0].router.weight, rows)


def test_tied_models_train_as_a_population_member_by_member():
    _, batches, reduced, _ = tied(top_k=2)
    other = GPT(reduced.cfg).eval()
    other.load_state_dict(reduced.state_dict())
    with torch.no_grad():
        other.moe_blocks[0].router.weight.mul_(2)
        pop = stack([reduced, other])
        a, b = batches[0], batches[1]
        losses = pop([a.idx, b.idx], [a.targets, b.targets]).loss
        alone = [m(x.idx, x.targets).loss for m, x in ((reduced, a), (other, b))]
    assert torch.equal(losses, torch.stack(alone))


@pytest.mark.parametrize(
    ("method", "router", "error"),
    [
        ("hcsmoe-tied", "reinit", "choose method hcsmoe"),
        ("greedy", "tie", "prunes experts"),
        ("hcsmoe", "typo", "unknown router"),
    ],
)
def test_tied_experts_only_for_plans_that_cover_every_expert(method, router, error):
    with pytest.raises(ValueError, match=error):
        reduce_model(tiny(), task(), method, 3, ReduceConfig(router=router))


def test_router_tie_ties_any_merging_plan_and_refuses_a_pruned_one():
    model, batches = tiny(), task()
    reduced, _ = reduce_model(model, batches, "uncurl", 3, ReduceConfig(router="tie"))
    assert [len(t) for t in reduced.cfg.tied_experts] == [8, 8]
    stats = collect_stats(model, batches)
    with pytest.raises(ValueError, match=r"leave out experts \[2, 3"):
        apply_plan(model, _plan_of([[[0], [1]]] * 2, stats), router="tie")
    with pytest.raises(ValueError, match="tied experts"):
        reduce_model(reduced, batches, "greedy", 2)


def test_tied_experts_must_reach_every_expert_of_their_layer():
    with pytest.raises(ValueError, match="one map per MoE layer"):
        tiny(n_expert=2, tied_experts=[[0, 1, 1]])
    with pytest.raises(ValueError, match="each of its 2 experts"):
        tiny(n_expert=2, tied_experts=[[0, 0, 0], [0, 1]])
