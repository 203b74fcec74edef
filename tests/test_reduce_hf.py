"""Expert reduction of transformers MoE causal LMs: tiny random models of every supported family,
built from their configs (nothing from the Hub), reduced by the same code as our GPT."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reduce import _plan_of  # the plan of given groups, as in our tests
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from uncurl import data
from uncurl.config import ReduceConfig
from uncurl.reduce import (
    adapt,
    align_plan,
    apply_plan,
    collect_stats,
    hf,
    merge_group,
    reduce_model,
    router_warmup,
)
from uncurl.reduce.__main__ import main
from uncurl.reduce.apply import expert_params
from uncurl.reduce.plan import make_group
from uncurl.tasks import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")

DRAMA_TXT = Path(__file__).resolve().parent / "fixtures" / "corpus" / "drama"

Z, K = 8, 2  # experts per MoE layer, experts per token
COMMON = {
    "vocab_size": 320,  # the smoke tokenizer's
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "num_experts_per_tok": K,
    "initializer_range": 0.2,  # decisive routing at this width
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
WIDTHS = {"intermediate_size": 32, "moe_intermediate_size": 16}  # dense FFN, each expert
QWEN = {**WIDTHS, "num_experts": Z}
DEEPSEEK = {**WIDTHS, "n_routed_experts": Z, "n_shared_experts": 1, "n_group": 1, "topk_group": 1}
# each family's own keys, at tiny sizes; full-softmax gates where the family has the choice
TINY = {
    "mixtral": {"intermediate_size": 16, "num_local_experts": Z},
    "minimax": {
        "intermediate_size": 16,
        "num_local_experts": Z,
        "head_dim": 8,
        "layer_types": ["full_attention", "linear_attention"],
    },
    "qwen2_moe": {**QWEN, "shared_expert_intermediate_size": 16, "norm_topk_prob": False},
    "qwen3_moe": {
        **QWEN,
        "head_dim": 8,
        "norm_topk_prob": False,
        "tie_word_embeddings": True,
    },
    "qwen3_next": {
        **QWEN,
        "shared_expert_intermediate_size": 16,
        "head_dim": 8,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
    },
    "olmoe": {"intermediate_size": 16, "num_experts": Z, "norm_topk_prob": False},
    "flex_olmo": {"intermediate_size": 16, "num_experts": Z, "norm_topk_prob": False},
    "granitemoe": {"intermediate_size": 16, "num_local_experts": Z},
    "gpt_oss": {
        "intermediate_size": 16,
        "num_local_experts": Z,
        "head_dim": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 8,
    },
    "deepseek_v3": {
        **DEEPSEEK,
        "first_k_dense_replace": 0,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "head_dim": 4,
        "routed_scaling_factor": 1.5,
    },
    "glm4_moe": {
        **DEEPSEEK,
        "first_k_dense_replace": 1,  # layer 0 dense, MoE from layer 1
        "num_hidden_layers": 3,
        "head_dim": 8,
        "routed_scaling_factor": 1.5,
    },
}
FAMILIES = sorted(TINY)


def tiny(family: str, seed: int = 0, **kw):
    """A random model; router biases and score-correction biases drawn too (they start at 0)."""
    config = CONFIG_MAPPING[family](**{**COMMON, **TINY[family], **kw})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith((".router.bias", "e_score_correction_bias")):
                t.normal_(0.0, 0.1)
    return model


def task(n_docs=8, seed=0, batch_size=4):
    """Random documents of varied length, so that batches carry padding."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 320, size=rng.integers(5, 40)) for _ in range(n_docs)]
    return make_batches(docs, block_size=16, batch_size=batch_size, seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model(batch.idx, attention_mask=batch.mask.long()).logits[batch.mask]


def first_layer(model, batch):
    """The first MoE layer on the batch's real tokens."""
    seen = {}
    adapt(model).visit_layers(batch, lambda i, io: seen.setdefault(i, io))
    return seen[0]


def test_every_supported_family_is_tested():
    assert FAMILIES == sorted(hf.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_singleton_plan_keeps_the_model_exactly(family):
    model, batches = tiny(family), task()
    stats = collect_stats(model, batches)
    same = apply_plan(model, _plan_of([[[e] for e in range(Z)]] * len(stats), stats), "keep")
    assert torch.equal(logits(same, batches[0]), logits(model, batches[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_experts_the_router_never_selects_leaves_the_logits(family):
    """Renormalised or sigmoid gates do not depend on the other experts, so removing experts no
    token chose changes nothing; full-softmax gates (norm_topk_prob=False) would shrink."""
    renormalise = {"norm_topk_prob": True} if "norm_topk_prob" in TINY[family] else {}
    model = tiny(family, **renormalise)
    batches = make_batches([np.array([5, 9, 17, 33])], block_size=16, batch_size=1)
    stats = collect_stats(model, batches)  # 3 tokens choose at most 6 of the 8 experts
    used = [np.flatnonzero(st.counts).tolist() for st in stats]
    d = max(map(len, used))
    kept = [u + [e for e in range(Z) if e not in u][: d - len(u)] for u in used]
    pruned = apply_plan(model, _plan_of([[[e] for e in k] for k in kept], stats), "keep")
    torch.testing.assert_close(logits(pruned, batches[0]), logits(model, batches[0]))


def _make_copies(layer, base: int, copies: list[int]) -> None:
    """Experts `copies` of `layer` become neuron-permuted copies of expert `base`: gate and up
    rows, down columns (and their biases) permuted together."""
    g = torch.Generator().manual_seed(0)
    original = {k: v.clone() for k, v in layer.expert_params(base).items()}
    hidden = original["gate"].shape[layer.neuron_dims["gate"]]
    with torch.no_grad():
        for e in copies:
            perm = torch.randperm(hidden, generator=g)
            for name, target in layer.expert_params(e).items():
                dim = layer.neuron_dims[name]
                target.copy_(
                    original[name] if dim is None else original[name].index_select(dim, perm)
                )


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_permuted_copies_of_one_expert_gives_that_expert(family):
    model = tiny(family)
    layer = adapt(model).layers[0]
    _make_copies(layer, 0, [1, 2])
    x = torch.randn(7, COMMON["hidden_size"])
    for e in (1, 2):  # each copy computes what expert 0 computes
        torch.testing.assert_close(layer.expert(e, x), layer.expert(0, x))
    group = make_group([0, 1, 2], counts=[5, 3, 2, 0, 0, 0, 0, 0])
    plan = {"layers": [{"groups": [group]}] + [{"groups": []}] * (len(adapt(model).layers) - 1)}
    merged = merge_group(layer, align_plan(model, plan)["layers"][0]["groups"][0])
    for name, value in expert_params(layer, 0).items():
        torch.testing.assert_close(merged[name], value)
    unaligned = merge_group(layer, group)  # what merging without weight matching would give
    assert not torch.allclose(unaligned["down"], merged["down"], atol=1e-3)
    stats = collect_stats(model, task())
    groups = [[[0, 1, 2], *[[e] for e in range(3, Z)]]] * len(stats)
    reduced = adapt(apply_plan(model, _plan_of(groups, stats), "keep"))
    torch.testing.assert_close(reduced.layers[0].expert(0, x), layer.expert(0, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_naee_scores_a_pruned_layer_as_the_family_routes(family):
    """NAEE's output error of a subset, computed from dot products and the family's gating,
    equals the error of the pruned layer the reduced model really runs."""
    model, batches = tiny(family), task(n_docs=4)
    stats = collect_stats(model, batches, needs=("naee",), subset_size=3)
    original = [first_layer(model, b) for b in batches]
    for i in (0, 17, len(stats[0].subsets) - 1):
        subset = stats[0].subsets[i].tolist()
        pruned = apply_plan(model, _plan_of([[[e] for e in subset]] * len(stats), stats))
        error = sum(
            ((io.outputs - first_layer(pruned, b).outputs) ** 2).sum().item()
            for io, b in zip(original, batches, strict=True)
        )
        np.testing.assert_allclose(stats[0].subset_error[i], error, rtol=1e-4)


def test_statistics_read_the_router_logits_of_real_tokens():
    model, batches = tiny("mixtral"), task()
    stats = collect_stats(model, batches)
    seen = [[] for _ in stats]
    with torch.no_grad():
        for b in batches:
            out = model(b.idx, attention_mask=b.mask.long(), output_router_logits=True)
            for part, h in zip(seen, out.router_logits, strict=True):
                part.append(h[b.mask.reshape(-1)])
    for st, part in zip(stats, seen, strict=True):
        h = torch.cat(part).double()
        top = h.topk(K, dim=-1).indices
        assert st.n_tokens == len(h) == int(sum(b.mask.sum() for b in batches))
        assert st.counts.tolist() == torch.bincount(top.flatten(), minlength=Z).tolist()
        assert st.top1.tolist() == torch.bincount(top[:, 0], minlength=Z).tolist()
        np.testing.assert_allclose(st.gram, (h.t() @ h).numpy(), rtol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize(
    "method", ["uncurl", "greedy", "freq-merge", "random", "reap", "naee", "hcsmoe"]
)
def test_every_method_reduces_a_transformers_model(family, method):
    model, batches = tiny(family), task()
    reduced, record = reduce_model(model, batches, method, 4, ReduceConfig(router_warmup_steps=1))
    assert [layer.n_expert for layer in adapt(reduced).layers] == [4] * len(record["layers"])
    assert reduced.config.num_experts_per_tok == K
    assert torch.isfinite(logits(reduced, batches[0])).all()


def test_mcsmoe_and_too_few_experts_for_grouped_routing_are_refused():
    with pytest.raises(ValueError, match="one expert count for all layers"):
        reduce_model(tiny("mixtral"), task(), "mcsmoe", 4)
    with pytest.raises(ValueError, match="choose D >= 2"):
        reduce_model(tiny("deepseek_v3"), task(), "greedy", 1)
    with pytest.raises(ValueError, match="tied experts"):
        reduce_model(tiny("mixtral"), task(), "hcsmoe-tied", 4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_router_warmup_trains_the_routers_only(family):
    model, batches = tiny(family), task()
    names = {n for n, _ in model.named_parameters() if f".{hf.FAMILIES[family].router}." in n}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = router_warmup(model, batches, steps=3, lr=1e-2)
    assert len(losses) == 3 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != (k in names), k


# checkpoints on disk, through the command line


@pytest.fixture(scope="module")
def tokenizer(smoke_data):
    return data.load_tokenizer(smoke_data)


def save_source(path, family, tokenizer, **kw):
    model = tiny(family, **kw)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reduce(source, out, d, method="uncurl", *extra):
    main(
        [
            "--hf",
            str(source),
            "--method",
            method,
            "--target-n-expert",
            str(d),
            "--task-data",
            str(DRAMA_TXT),
            "--out",
            str(out),
            "--max-tokens",
            "512",
            "--block-size",
            "32",
            *extra,
        ]
    )


def weights_size(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reduced_checkpoint_loads_with_from_pretrained_generates_and_shrinks(
    tmp_path, tokenizer, family
):
    source = save_source(tmp_path / "source", family, tokenizer)
    sizes = [weights_size(source)]
    for d in (4, 1 if family not in ("deepseek_v3", "glm4_moe") else 2):
        out = tmp_path / f"d{d}"
        reduce(source, out, d, "uncurl", "--router-warmup-steps", "2")
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched weights
        assert [layer.n_expert for layer in adapt(model).layers] == [d] * len(adapt(model).layers)
        assert getattr(model.config, hf.FAMILIES[family].n_expert_key) == d
        assert model.config.num_experts_per_tok == min(K, d)
        ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
        assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
        record = json.loads((out / "reduction.json").read_text())
        assert record["block_size"] == 32 and len(record["router_warmup"]["losses"]) == 2
        sizes.append(weights_size(out))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3


@pytest.mark.parametrize(
    ("d", "extra", "message"),
    [
        (8, [], "choose D < 8"),
        (0, [], "too small"),
        (2, ["--block-size", "100"], "exceeds the model's context of 64"),
        (2, ["--method", "mcsmoe"], "one expert count for all layers"),
        (2, ["--method", "hcsmoe-tied"], "a transformers MoE block cannot hold"),
        (2, ["--router", "tie"], "a transformers MoE block cannot hold"),
    ],
)
def test_bad_requests_for_transformers_checkpoints_are_named(
    tmp_path, tokenizer, capsys, d, extra, message
):
    source = save_source(tmp_path / "source", "olmoe", tokenizer)
    with pytest.raises(SystemExit) as exit_:
        reduce(source, tmp_path / "out", d, "uncurl", *extra)
    assert exit_.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_is_named_with_the_supported_ones(tmp_path, capsys, tokenizer):
    dense = LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"})
    LlamaForCausalLM(dense).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    with pytest.raises(SystemExit):
        reduce(tmp_path / "llama", tmp_path / "out", 2)
    err = capsys.readouterr().err
    assert "llama checkpoints (LlamaForCausalLM) are not supported" in err
    assert all(family in err for family in hf.FAMILIES)


def test_transformers_options_are_refused_for_our_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["--checkpoint", str(tmp_path), "--method", "uncurl", "--target-n-expert", "2"]
            + ["--task-data", str(DRAMA_TXT), "--out", str(tmp_path / "out"), "--device", "cpu"]
        )
    assert "apply to --hf checkpoints only" in capsys.readouterr().err
