"""`python -m uncurl.bench moe`: the layers it times compute what they claim, and the command
prints and records one row per layer and expert count."""

import json
import re
import subprocess
import sys

import pytest
import torch

from uncurl.bench.moe import FLOOR, _dense_on_kernel, _FixedRouting
from uncurl.config import get_profile
from uncurl.model import MoE

LAYERS = [
    FLOOR,
    "uncurl MoE",
    "DeepSpeed MoE",
    "HF Mixtral block",
    "uncurl experts, routing fixed",
    "floor on uncurl's kernel",
]


def test_fixed_routing_row_is_the_layer_without_its_router():
    cfg = get_profile("smoke").model_config(n_expert=4)
    torch.manual_seed(0)
    moe = MoE(cfg, 4).train()
    for p in (moe.w_fc, moe.w_proj):  # allocated uninitialised; GPT's constructor initialises them
        torch.nn.init.normal_(p, 0, 0.02)
    x = torch.randn(2, cfg.block_size, cfg.n_embd)
    fixed = _FixedRouting(moe, x)
    assert torch.equal(fixed(x), moe(x)[0])
    fixed(x).sum().backward()
    assert moe.router.weight.grad is None and moe.w_fc.grad.abs().sum() > 0


def test_floor_on_the_kernel_computes_the_floor():
    torch.manual_seed(0)
    floor = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    on_kernel = _dense_on_kernel(get_profile("smoke").model_config(n_expert=4), floor)
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, y_kernel = floor(x), on_kernel(x)
    torch.testing.assert_close(y_kernel, y)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_kernel,) = torch.autograd.grad(y_kernel.square().sum(), x)
    torch.testing.assert_close(g_kernel, g)


def test_command_prints_and_records_every_layer(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uncurl.bench",
            "moe",
            "--profile",
            "smoke",
            "--n-expert",
            "2",
            "4",
            "--repeats",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    smoke = get_profile("smoke")
    cfg = smoke.model_config()
    assert result["tokens"] == smoke.train_config().batch_size * cfg.block_size
    assert (result["n_embd"], result["d_ff"], result["top_k"]) == (cfg.n_embd, cfg.hidden, 1)
    rows = result["rows"]
    assert [(r["n_expert"], r["layer"]) for r in rows] == [(e, n) for e in (2, 4) for n in LAYERS]
    assert all(r["repeats"] == 2 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in rows)
    # each ratio is the row's median over the floor's median of the same expert count
    floor = {r["n_expert"]: r["median_ms"] for r in rows if r["layer"] == FLOOR}
    for r in rows:
        assert r["vs_floor"] == pytest.approx(r["median_ms"] / floor[r["n_expert"]], rel=1e-12)
    printed = re.findall(r"E=\s*(\d+)\s+(.+?)\s+[\d.]+ ms .* ([\d.]+)x floor", proc.stdout)
    assert printed == [(str(r["n_expert"]), r["layer"], f"{r['vs_floor']:.2f}") for r in rows]
