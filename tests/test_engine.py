"""Devices, precision and micro-batches: accumulation gives one batch's numbers; every tensor the
training step, the reduction statistics and scoring make lands on the model's device (checked on
a stand-in device, so that a forgotten `.to(device)` fails here, on a CPU, as it would on a GPU)."""

import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from uncurl import data, device, engine, evaluate, tasks
from uncurl.config import get_profile
from uncurl.distributed import deepspeed_config
from uncurl.engine import Engine
from uncurl.model import GPT, load_model
from uncurl.reduce import collect_stats, router_warmup
from uncurl.train import load_metrics, train

SMOKE = get_profile("smoke")
SAMPLES = Path(__file__).resolve().parent / "fixtures" / "tasks"
EXACT = {"capacity_factor": None, "eval_capacity_factor": None, "aux_loss_weight": 0.0}

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- accumulation


def run_metrics(tmp_path, smoke_data, name, n_expert, micro_batch_size, **model):
    model_cfg = SMOKE.model_config(n_expert=n_expert, vocab_size=320, **model)
    cfg = SMOKE.train_config(max_steps=4, micro_batch_size=micro_batch_size)
    train(tmp_path / name, model_cfg, cfg, smoke_data, progress=False)
    return load_metrics(tmp_path / name), load_model(tmp_path / name)


@pytest.mark.parametrize(
    ("n_expert", "model"), [(1, {}), (4, EXACT)], ids=["dense", "moe-dropless-no-aux"]
)
def test_two_half_micro_batches_give_the_numbers_of_one_batch(
    tmp_path, smoke_data, n_expert, model
):
    half = SMOKE.train_config().batch_size // 2
    whole, whole_model = run_metrics(tmp_path, smoke_data, "whole", n_expert, 0, **model)
    halves, halves_model = run_metrics(tmp_path, smoke_data, "halves", n_expert, half, **model)
    for a, b in zip(whole, halves, strict=True):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert whole[-1]["val_loss"] == pytest.approx(halves[-1]["val_loss"], rel=1e-6)
    for p, q in zip(whole_model.parameters(), halves_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_an_moe_layer_sees_one_micro_batch_at_a_time(tmp_path, smoke_data):
    """Capacity and load-balancing loss are a micro-batch's, so with them the numbers move."""
    half = SMOKE.train_config().batch_size // 2
    whole, _ = run_metrics(tmp_path, smoke_data, "whole", 4, 0)
    halves, _ = run_metrics(tmp_path, smoke_data, "halves", 4, half)
    gaps = [abs(a["aux_loss"] - b["aux_loss"]) for a, b in zip(whole, halves, strict=True)]
    assert 0 < max(gaps) < 0.1


def test_micro_batches_must_divide_each_process_share():
    cfg = SMOKE.train_config(micro_batch_size=2)
    assert (cfg.micro_batch(1), cfg.accumulation(1), cfg.accumulation(2)) == (2, 4, 2)
    assert SMOKE.train_config().accumulation(2) == 1  # 0: each process's whole share at once
    with pytest.raises(ValueError, match="must divide each process's share"):
        SMOKE.train_config(micro_batch_size=3)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        cfg.micro_batch(3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"zero_stage": 3}, "zero_stage must be 1 or 2"),
        ({"zero_stage": 0}, "mean of per-process norms"),
        ({"ep_size": 2}, "needs engine 'deepspeed'"),
        ({"engine": "fsdp"}, "unknown engine 'fsdp'"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"precision": "fp16"}, "unknown precision 'fp16'"),
    ],
)
def test_bad_engine_settings_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=message):
        SMOKE.train_config(**settings)


def test_the_command_takes_the_deepspeed_launchers_local_rank(capsys, tmp_path):
    from uncurl.train import main

    with pytest.raises(SystemExit):  # the launcher's argument parses; the bad profile stops it
        main(["--local_rank=1", "--profile", "nope", "--n-expert", "2", "--out", str(tmp_path)])
    assert "unknown profile 'nope'" in capsys.readouterr().err


def test_the_paper_recipe_becomes_deepspeed_config():
    cfg = get_profile("paper").train_config()
    assert (cfg.engine, cfg.ep_size, cfg.precision) == ("deepspeed", 2, "bf16")
    assert deepspeed_config(cfg, 32, "bf16") == {
        "train_batch_size": 512,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "steps_per_print": None,
    }


# ---------------------------------------------------------------------- device, precision


def test_auto_is_the_cpu_in_fp32_without_a_gpu_and_a_gpu_in_bf16_with_one():
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert device.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="sees no GPU"):
            device.resolve_device("cuda:1")
    assert device.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with (
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda: True),
    ):
        gpu = device.resolve_device("auto")
        assert gpu == torch.device("cuda") and device.resolve_precision("auto", gpu) == "bf16"
    assert device.resolve_precision("fp32", torch.device("cuda")) == "fp32"


def test_bf16_autocast_trains_float32_weights(smoke_data):
    torch.manual_seed(0)
    model = GPT(SMOKE.model_config(n_expert=4, vocab_size=320))
    step = Engine(model, SMOKE.train_config(device="cpu", precision="bf16"))
    x = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    out = step.step(x, x, lr=1e-3)
    assert step.precision == "bf16" and 4 < out["lm_loss"] < 7 and out["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert step.describe()["precision"] == "bf16"


# ------------------------------------------------------------------ a stand-in device

STANDIN = torch.device("meta")  # what the tensors report; their values live on the CPU


class OnDevice(torch.Tensor):
    """A CPU tensor that says it is on the stand-in device: ops on it run on its CPU values, and
    one that also takes a CPU tensor (other than a 0-d scalar, as CUDA allows) fails."""

    @staticmethod
    def __new__(cls, values):
        return torch.Tensor._make_wrapper_subclass(
            cls, values.shape, strides=values.stride(), dtype=values.dtype, device=STANDIN
        )

    def __init__(self, values):
        self.values = values

    def tolist(self):
        return self.values.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs)


class StandinDevice(TorchDispatchMode):
    """Makes tensors created with `device=<stand-in>` (and moved there) `OnDevice` ones."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs)


def _run(func, args, kwargs):
    kwargs = dict(kwargs or {})
    target = kwargs.get("device")
    places = set()

    def unwrap(t):
        if isinstance(t, OnDevice):
            places.add("device")
            return t.values
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            places.add(t.device.type)
        return t

    args, kwargs = tree_map(unwrap, (args, kwargs))
    if target is None and len(places) > 1:
        raise RuntimeError(f"{func}: a tensor on the CPU meets tensors on the device")
    onto_device = target is not None and torch.device(target) == STANDIN
    if onto_device:
        kwargs["device"] = torch.device("cpu")
    out = func(*args, **kwargs)
    if onto_device or (target is None and "device" in places):
        out = tree_map(lambda t: OnDevice(t) if type(t) is torch.Tensor else t, out)
    return out


@pytest.fixture
def standin(monkeypatch):
    """The stand-in device active, the kernels on their torch ops (as on a GPU)."""
    monkeypatch.setitem(os.environ, "UNCURL_KERNELS", "torch")
    with StandinDevice():
        yield STANDIN


@pytest.fixture(scope="module")
def task_data(smoke_data):
    tok, cfg = data.load_tokenizer(smoke_data), SMOKE.finetune_config()
    return {
        name: tasks.load_task(name, tok, SMOKE.model_config().block_size, cfg, smoke_data, SAMPLES)
        for name in ("drama", "rotten_tomatoes")
    }


def standin_model(n_expert=4):
    torch.manual_seed(0)
    return GPT(SMOKE.model_config(n_expert=n_expert, vocab_size=320)).to(STANDIN)


def test_the_standin_device_catches_a_tensor_left_on_the_cpu(standin):
    model = standin_model()
    with pytest.raises(RuntimeError, match="on the CPU meets tensors on the device"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_a_training_step_and_validation_stay_on_the_device(standin, monkeypatch):
    monkeypatch.setattr(engine, "resolve_device", lambda name: standin)
    torch.manual_seed(0)
    model = GPT(SMOKE.model_config(n_expert=4, vocab_size=320))
    step = Engine(model, SMOKE.train_config(micro_batch_size=4))
    x = torch.randint(0, 320, (8, 32))  # the loop's batches come from numpy, on the CPU
    out = step.step(x, x, lr=1e-3)
    assert step.accumulation == 2 and out["grad_norm"] > 0
    assert all(p.device == standin for p in model.parameters())
    assert 4 < step.evaluate([(x, x)]) < 7


def test_statistics_and_router_warmup_stay_on_the_device(standin, task_data):
    model = standin_model()
    batches = task_data["drama"].heldout[:2]  # windows of the task's text
    stats = collect_stats(model, batches, needs=("reap", "outputs", "naee"), subset_size=2)
    assert stats[0].counts.sum() > 0 and stats[0].subset_error.shape == (6,)
    assert len(router_warmup(model, batches, 2)) == 2


@pytest.mark.parametrize("task", ["drama", "rotten_tomatoes"])
def test_scoring_stays_on_the_device(standin, task_data, task):
    scores = evaluate.score(standin_model(), task_data[task])
    assert len(scores.per_example) == len(task_data[task].val) or task == "drama"
    assert all(v == v for v in scores.metrics.values())  # no NaN
