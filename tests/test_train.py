import json

import pytest
import torch

from uncurl.config import get_profile
from uncurl.model.checkpoint import load_model
from uncurl.train import get_batch, load_metrics, lr_at, train, train_all

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


def test_command_line_errors_are_one_line_naming_the_problem(capsys, tmp_path):
    from uncurl.train import main

    for argv, message in [
        (["--profile", "nope", "--n-expert", "2"], "unknown profile 'nope'"),
        (["--profile", "smoke", "--n-expert", "2", "--set", "colour=red"], "['colour']"),
        (["--profile", "smoke", "--n-expert", "2", "--data", str(tmp_path)], "uncurl.data prepare"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(tmp_path / "run")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
