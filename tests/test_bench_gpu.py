"""`python -m uncurl.bench gpu`: without a GPU it refuses in one line and writes nothing; each of
its measurements runs at tiny shapes on a CPU (the GPU run itself needs a GPU machine)."""

import math
import os

import pytest
import torch

from uncurl.bench import gpu
from uncurl.bench.__main__ import main
from uncurl.config import get_profile
from uncurl.model.deepspeed_moe import init_deepspeed

SMOKE = get_profile("smoke")
CPU = torch.device("cpu")
TOKENS = 64


@pytest.fixture(scope="module")
def cfg():
    """DeepSpeed's layer and engine in this process (world size 1); its rendezvous settings are
    taken back afterwards, so that a command started later picks a port of its own."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.setenv(key, os.environ.get(key, ""))
            mp.delenv(key)
        init_deepspeed()
        yield SMOKE.model_config(vocab_size=320)


def test_without_a_gpu_it_refuses_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as refused:
        main(["gpu", "--json", str(tmp_path / "out.json")])
    message = str(refused.value.code)
    assert "needs a CUDA GPU" in message and "\n" not in message
    assert not (tmp_path / "out.json").exists()


def test_every_layer_is_timed_against_ours(cfg):
    rows = gpu.layer_rows(cfg, 4, TOKENS, CPU, repeats=2)
    names = [r["layer"] for r in rows]
    assert {gpu.OURS, gpu.PER_EXPERT, "DeepSpeed MoE", "HF Mixtral block"} <= set(names)
    assert next(r for r in rows if r["layer"] == gpu.OURS)["vs_ours"] == 1.0
    assert all(r["median_ms"] > 0 and r["n_expert"] == 4 and r["tokens"] == TOKENS for r in rows)


def test_the_grouped_product_check_compares_and_falls_back(cfg, monkeypatch):
    monkeypatch.setenv("UNCURL_KERNELS", "torch")  # so that teardown restores what was there,
    monkeypatch.delenv("UNCURL_KERNELS")  # whatever the check writes
    agreed = gpu.check_grouped_mm(cfg, 4, TOKENS, CPU)
    assert agreed["ok"] and agreed["max_relative_error"] < 1e-5
    assert "UNCURL_KERNELS" not in os.environ  # the per-expert pass put the setting back

    def fails(*_):
        raise RuntimeError("grouped_mm: strides\nmore detail")

    monkeypatch.setattr(gpu, "_forward_backward", fails)
    failed = gpu.check_grouped_mm(cfg, 4, TOKENS, CPU)
    assert failed == {"ok": False, "error": "grouped_mm: strides"}
    assert os.environ["UNCURL_KERNELS"] == "torch"  # the rest runs one product per expert


def test_forward_rows_time_each_expert_count(cfg):
    rows = gpu.forward_rows(cfg, (1, 4), 2, 16, CPU, repeats=2)
    assert [r["n_expert"] for r in rows] == [1, 4]
    assert all(r["median_ms"] > 0 and r["forward_peak_bytes"] is None for r in rows)  # CPU


def test_training_steps_run_under_deepspeed_and_report_throughput(cfg):
    row = gpu.train_row(SMOKE, 4, 2, CPU, batch_size=8)
    assert row["engine"] == "deepspeed" and row["world"] == 1 and len(row["seconds"]) == 2
    assert row["tokens_per_s"] > 0 and all(math.isfinite(v) for v in row["losses"])
    assert row["deepspeed"]["zero_optimization"] == {"stage": 2}


def test_the_tables_print(cfg, capsys):
    results = {
        "kernels": {"ok": True, "error": None},
        "layer": gpu.layer_rows(cfg, 4, TOKENS, CPU, repeats=1),
        "forward": gpu.forward_rows(cfg, (4,), 2, 16, CPU, repeats=1),
        "train": {"n_expert": 4, "step_s": 0.5, "tokens_per_s": 512.0},
    }
    gpu.print_tables(results)
    out = capsys.readouterr().out
    assert "grouped products: ok" in out and "x ours" in out and "tokens/s" in out
