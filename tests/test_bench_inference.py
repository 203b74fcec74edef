"""`python -m uncurl.bench inference`: model discovery (reduced checkpoints included), one short
run at the smoke profile with two processes, its tables and figures, and its argument errors."""

import json

import pytest
import torch
from matplotlib.figure import Figure

from uncurl.bench import costmodel, inference, inference_tables
from uncurl.bench.__main__ import main
from uncurl.bench.models import find_models
from uncurl.config import get_profile
from uncurl.model import GPT
from uncurl.model.checkpoint import save_checkpoint
from uncurl.report import inference as chapter

PROFILE = get_profile("smoke")
TRAINED = ["dense" if n == 1 else f"e{n}" for n in PROFILE.expert_counts]
SIZES = dict(
    batch_size=2,
    seq_len=16,
    repeats=2,
    warmup_runs=0,
    procs=[2],
    expert_counts=[4],
    exchange_kib=[4, 64],
    deepspeed=False,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained-looking e4 (no dense: it is randomly initialised) and a model reduced from it."""
    root = tmp_path_factory.mktemp("runs")
    folder = root / "smoke"
    torch.manual_seed(0)
    e4 = save_checkpoint(folder / "e4" / "checkpoint", GPT(PROFILE.model_config(n_expert=4)))
    (folder / "e4" / "summary.json").write_text(json.dumps({"val_loss": 5.0}))
    reduction = {
        "from": str(e4),
        "method": "greedy",
        "source_n_expert": [4],
        "target_n_expert": [2],
    }
    save_checkpoint(
        folder / "reduced" / "e4-greedy-d2-drama-s0",
        GPT(PROFILE.model_config(n_expert=2)),
        info={"reduction": reduction},
    )
    return root


@pytest.fixture(scope="module")
def result(runs):
    return inference.run_bench("smoke", runs, **SIZES)


def test_models_are_found_with_their_origin(runs):
    models = {m["name"]: m for m in find_models(runs, PROFILE)}
    assert list(models) == [*TRAINED, "reduced/e4-greedy-d2-drama-s0"]
    assert models["dense"]["kind"] == "random init" and models["dense"]["val_loss"] is None
    assert models["e4"]["kind"] == "trained" and models["e4"]["val_loss"] == 5.0
    reduced = models["reduced/e4-greedy-d2-drama-s0"]
    assert (reduced["kind"], reduced["source"], reduced["equivalent"], reduced["method"]) == (
        "reduced",
        "e4",
        "e2",
        "greedy",
    )


def test_whole_model_exchanges_the_bytes_the_cost_model_counts(result):
    fwd = {r["model"]: r for r in result["forward"]}
    assert set(fwd) == {*TRAINED, "reduced/e4-greedy-d2-drama-s0"}
    tokens = SIZES["batch_size"] * SIZES["seq_len"]
    cfg = PROFILE.model_config(n_expert=4)
    assert len(cfg.moe_layers) == 1 and fwd["dense"]["bytes_sent"] == 0
    assert fwd["e4"]["bytes_sent"] == 2 * costmodel.buffer_bytes(cfg, 4, tokens)
    assert fwd["reduced/e4-greedy-d2-drama-s0"]["bytes_sent"] == 2 * costmodel.buffer_bytes(
        cfg, 2, tokens
    )


def test_every_table_and_figure_is_made(result):
    tables = inference_tables.chapter_tables(result)
    assert set(tables) == set(inference_tables.TITLES)
    layer = tables["layer"]
    assert list(layer["P"]) == [2] and list(layer["experts"]) == [4]
    assert (layer[["first All2All (ms)", "expert computation (ms)"]] > 0).all().all()
    assert len(tables["exchanges"]) == 2 and tables["fit"]["points"].item() == 2
    single = tables["models"].set_index("model")
    assert single.loc["e4", "parameters (MB)"] > single.loc["dense", "parameters (MB)"]
    for plot in (
        chapter.plot_loss_vs_latency,
        chapter.plot_a2a_vs_compute,
        chapter.plot_latency_vs_procs,
        chapter.plot_cost_model,
    ):
        assert isinstance(plot(result), Figure)
    assert chapter.headline(result)["world"] == 2


def test_a_reduced_model_stands_beside_its_source_and_equivalent(result):
    table = inference_tables.reduced_table(result)
    assert list(table["role"]) == ["reduced", "came from", "from scratch"]
    assert list(table["model"]) == ["reduced/e4-greedy-d2-drama-s0", "e4", "e2"]
    latency = list(table["latency (ms)"])
    assert latency[0] > 0 and latency[1] > 0
    assert (latency[2] is None) == (2 not in PROFILE.expert_counts)


def test_without_reduced_models_the_table_says_so(tmp_path, result):
    empty = {**result, "models": [m for m in result["models"] if m["kind"] != "reduced"]}
    titles = [title for title, _ in inference_tables.printed_tables(empty)]
    assert titles[-1].startswith("No reduced models under")


def test_notebook_parameters_become_overrides():
    assert inference.notebook_overrides(batch_size=0, procs="", expert_counts="4 8") == {
        "batch_size": None,
        "procs": None,
        "expert_counts": [4, 8],
    }
    assert inference.settings(PROFILE, repeats=7)["repeats"] == 7
    assert inference.settings(PROFILE)["batch_size"] == PROFILE.bench_config().batch_size


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["--profile", "smoke", "--seq-len", "99"], "seq_len 99 exceeds the profile's block_size"),
        (["--profile", "nope"], "unknown profile 'nope'"),
    ],
)
def test_bad_arguments_end_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inference", *argv])
    text = str(exc.value.code) + capsys.readouterr().err
    assert message in text
