import json
import os
import shutil
import socket

import pytest
import torch
from conftest import killed, one_line_error

from uncurl import layout
from uncurl.config import get_profile
from uncurl.model.checkpoint import find_checkpoint, load_model, load_train_state
from uncurl.train import get_batch, load_metrics, lr_at, main, train, train_all

SMOKE = get_profile("smoke")


def configs(smoke_data, n_expert=4, **train_over):
    model = SMOKE.model_config(n_expert=n_expert, vocab_size=320)
    return model, SMOKE.train_config(**train_over)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, smoke_data):
    model, cfg = configs(smoke_data, max_steps=12, ckpt_interval=100)
    full = train(tmp_path / "full", model, cfg, smoke_data, progress=False)
    train(tmp_path / "cut", model, cfg, smoke_data, stop_after=6, progress=False)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["finished"] is False
    resumed = train(tmp_path / "cut", model, cfg, smoke_data, progress=False)
    a, b = load_metrics(tmp_path / "full"), load_metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == list(range(1, 13))  # no duplicated or missing steps
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6
    assert abs(full["val_loss"] - resumed["val_loss"]) < 1e-6
    for p, q in zip(
        load_model(tmp_path / "full").parameters(),
        load_model(tmp_path / "cut").parameters(),
        strict=True,
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path, smoke_data):
    model, cfg = configs(smoke_data, max_steps=4)
    runs = [train(tmp_path / str(i), model, cfg, smoke_data, progress=False) for i in range(2)]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]
    _, other = configs(smoke_data, max_steps=4, seed=1)
    assert (
        train(tmp_path / "s1", model, other, smoke_data, progress=False)["val_loss"]
        != runs[0]["val_loss"]
    )


def test_training_lowers_loss_and_writes_a_loadable_checkpoint(tmp_path, smoke_data):
    model, cfg = configs(smoke_data)
    summary = train(tmp_path / "run", model, cfg, smoke_data, progress=False)
    metrics = load_metrics(tmp_path / "run")
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"] - 0.5
    assert metrics[-1]["tokens"] == cfg.max_steps * cfg.batch_size * model.block_size
    assert summary["finished"] and summary["environment"]["packages"]["torch"] == torch.__version__
    loaded = load_model(tmp_path / "run")
    assert loaded.cfg == model and [m.n_expert for m in loaded.moe_blocks] == [4]
    # the checkpoint carries its tokenizer
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "checkpoint")) == 320


def test_resuming_with_other_settings_is_refused(tmp_path, smoke_data):
    model, cfg = configs(smoke_data, max_steps=4)
    train(tmp_path / "run", model, cfg, smoke_data, stop_after=2, progress=False)
    _, other = configs(smoke_data, max_steps=4, lr=1e-4)
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "run", model, other, smoke_data, progress=False)


def test_vocabulary_mismatch_is_a_clear_error(tmp_path, smoke_data):
    model = SMOKE.model_config(n_expert=1, vocab_size=999)
    with pytest.raises(ValueError, match="vocab_size 999"):
        train(tmp_path / "run", model, SMOKE.train_config(), smoke_data, progress=False)


def test_batches_depend_only_on_seed_and_step():
    import numpy as np

    tokens = np.arange(1000, dtype=np.uint16)
    x1, y1 = get_batch(tokens, 7, 4, 16, seed=0)
    x2, _ = get_batch(tokens, 7, 4, 16, seed=0)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert not torch.equal(x1, get_batch(tokens, 8, 4, 16, seed=0)[0])


def test_lr_schedule_warms_up_then_decays_linearly():
    cfg = SMOKE.train_config(lr=1.0, lr_warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.25 and lr_at(3, cfg) == 1.0
    assert lr_at(9, cfg) == pytest.approx(0.55) and lr_at(14, cfg) == pytest.approx(0.1)


def test_train_all_in_two_processes_matches_one_process(tmp_path, smoke_data):
    from dataclasses import asdict

    model, cfg = configs(smoke_data, max_steps=4)
    job = {"model": model.to_dict(), "train": asdict(cfg), "data": smoke_data}
    parallel = train_all([dict(job, out=tmp_path / f"p{i}") for i in range(2)], procs=2)
    single = train(tmp_path / "single", model, cfg, smoke_data, progress=False)
    assert [s["val_loss"] for s in parallel] == [single["val_loss"]] * 2


def smoke_command(smoke_data, out, *extra) -> list[str]:
    return [
        *["--profile", "smoke", "--n-expert", "4", "--out", str(out), "--data", str(smoke_data)],
        *extra,
    ]


def refused(capsys, argv: list[str]) -> str:
    return one_line_error(capsys, main, argv, "python -m uncurl.train")


@pytest.mark.parametrize(
    "argv, problem, fix",
    [
        (
            ["--profile", "nope"],
            "unknown profile 'nope'",
            "choose one of full, paper, small, smoke",
        ),
        (["--set", "lrr=0.1"], "unknown --set key 'lrr'", "did you mean 'lr'?"),
        (["--set", "colour=red"], "unknown --set key 'colour'", "train keys: "),
        (["--set", "lr=fast"], "train key 'lr' must be float", "got 'fast'"),
        (["--set", "lr=-0.001"], "lr must be positive", "got -0.001"),
        (["--n-expert", "0"], "n_expert must be at least 1", "1 is the dense model"),
        (["--set", "top_k=5"], "top_k=5 must be between 1 and the number of experts (4)", "lower"),
        (["--data", "nowhere"], "nowhere", "python -m uncurl.data prepare"),
    ],
    ids=["profile", "key", "unknown-key", "type", "lr", "n_expert", "top_k", "data"],
)
def test_bad_settings_get_one_line_and_write_nothing(
    capsys, tmp_path, smoke_data, argv, problem, fix
):
    """The smoke command with one thing wrong (a later --profile / --n-expert wins)."""
    err = refused(capsys, smoke_command(smoke_data, tmp_path / "run") + argv)
    assert problem in err and fix in err
    assert list(tmp_path.iterdir()) == []


def test_an_out_holding_something_else_is_refused_and_left_alone(capsys, tmp_path, smoke_data):
    other = tmp_path / "e2"
    model, cfg = configs(smoke_data, n_expert=2)
    train(other, model, cfg, smoke_data, stop_after=2, progress=False)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("not a run")
    (tmp_path / "file").write_text("a file")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, problem, fix in [
        (other, "holds a run with other settings (n_expert 2 there, 4 asked)", "new --out"),
        (notes, "is not a training run's folder (it holds todo.txt)", "new or empty folder"),
        (tmp_path / "file", "is a file", "give a folder"),
    ]:
        err = refused(capsys, smoke_command(smoke_data, out))
        assert problem in err and fix in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_second_command_on_a_run_in_use_is_refused_with_its_holder(capsys, tmp_path, smoke_data):
    with layout.locked(tmp_path / "run"):
        err = refused(capsys, smoke_command(smoke_data, tmp_path / "run"))
    assert f"is in use by pid {os.getpid()} on {socket.gethostname()} since " in err
    assert "pytest" in err and "wait for it to finish, or stop it" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def _weights(run) -> bytes:
    return (run / "checkpoint" / "model.safetensors").read_bytes()


def _without_clocks(summary: dict) -> dict:
    env = {k: v for k, v in summary["environment"].items() if k != "load_avg_1m"}
    return {**summary, "wall_time_s": None, "environment": env}


def _metrics_without_clocks(run) -> list[dict]:
    return [{**m, "elapsed": None} for m in load_metrics(run)]


def test_killed_at_any_moment_and_rerun_it_ends_as_an_uninterrupted_run(tmp_path, smoke_data):
    """`python -m uncurl.train` SIGKILLed at five moments in turn, rerun after each: the weights,
    metrics and summary (but clocks) are those of a run that was never interrupted."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(smoke_command(smoke_data, full))
    command = ["-m", "uncurl.train", *smoke_command(smoke_data, cut)]
    killed("torch.nn.utils.clip_grad_norm_", 7, command)  # in step 7, before any checkpoint
    assert [m["step"] for m in load_metrics(cut)] == list(range(1, 7))
    killed("torch.save", 1, command)  # writing the checkpoint of step 10: weights, not state
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        find_checkpoint(cut)
    killed("os.replace", 1, command, match=".checkpoint.old", after=True)  # between its renames
    with pytest.raises(FileNotFoundError, match="a save there was interrupted"):
        find_checkpoint(cut)  # readers never guess, and never move anything
    killed("os.replace", 1, command, match="summary.json")  # the summary, written but not renamed
    assert load_train_state(cut)["step"] == 20 and not (cut / "summary.json").exists()
    main(smoke_command(smoke_data, cut))
    assert _weights(cut) == _weights(full)
    assert _metrics_without_clocks(cut) == _metrics_without_clocks(full)
    summaries = [_without_clocks(layout.read_json(run / "summary.json")) for run in (full, cut)]
    assert summaries[0] == {**summaries[1], "name": "full"}
    assert sorted(p.name for p in cut.iterdir()) == [
        ".lock",
        "checkpoint",
        "metrics.jsonl",
        "summary.json",
    ]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, smoke_data):
    model, cfg = configs(smoke_data, max_steps=12, ckpt_interval=5)
    train(tmp_path / "run", model, cfg, smoke_data, stop_after=7, progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 8, "lo')  # a kill in mid-line
    assert [m["step"] for m in load_metrics(tmp_path / "run")] == list(range(1, 8))
    train(tmp_path / "run", model, cfg, smoke_data, progress=False)
    assert [m["step"] for m in load_metrics(tmp_path / "run")] == list(range(1, 13))


def test_a_finished_run_whose_checkpoint_was_deleted_is_trained_again_the_same(
    tmp_path, smoke_data
):
    model, cfg = configs(smoke_data, max_steps=6)
    train(tmp_path / "run", model, cfg, smoke_data, progress=False)
    weights = _weights(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint")
    assert train(tmp_path / "run", model, cfg, smoke_data, progress=False)["finished"]
    assert _weights(tmp_path / "run") == weights
