"""`python -m uncurl.bench finetune`: the floor's FLOP count, and one short run at the smoke
profile against a baseline revision, its table and its record."""

import json

import pytest
import torch

from uncurl import tasks
from uncurl.bench.__main__ import main
from uncurl.bench.finetune import step_flops
from uncurl.config import ModelConfig
from uncurl.model import kernels


def test_step_flops_count_what_each_product_does():
    cfg = ModelConfig(
        vocab_size=10, block_size=4, n_layer=2, n_head=1, n_embd=2, d_ff=3, n_expert=4, top_k=1
    )
    targets = torch.tensor([[-1, -1, 5, 6]])
    batch = tasks.Batch(torch.zeros(1, 4, dtype=torch.long), targets, targets >= 0)
    per_token = (2 * 4 * 2 * 2 + 2 * 2 * 2 * 3) * 2 + 2 * 2 * 4  # projections, FFNs, one router
    attention = 2 * 2 * 2 * 2 * (1 + 2 + 3 + 4)  # two layers, two products, causal
    head = 2 * 2 * 10 * 2  # at the two targets
    assert step_flops(cfg, batch) == 3 * (4 * per_token + attention + head)


@pytest.mark.usefixtures("one_thread")
def test_command_prints_and_records_every_path(smoke_data, tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(
        [
            "finetune",
            "--profile",
            "smoke",
            "--task",
            "rotten_tomatoes",
            "--n-expert",
            "2",
            "--source-n-expert",
            "4",
            "--members",
            "2",
            "--rounds",
            "1",
            "--steps",
            "2",
            "--seeds",
            "2",
            "--solo-runs",
            "1",
            "--set",
            "max_steps=4",
            "eval_interval=2",
            "--data-dir",
            str(smoke_data),
            "--baseline",
            "HEAD",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    for row in ("floor:", "today's (baseline)", "solo", "population of 2", "population of 6"):
        assert row in printed
    assert "where the population's member-step goes" in printed
    record = json.loads(out.read_text())
    assert record["floor"]["floor_ms"] > 0
    shares = record["breakdown"]["shares"]
    assert sum(shares.values()) == pytest.approx(1)
    assert shares["expert and FFN products with GELU (kernel)"] > 0  # the kernels ran
    assert record["breakdown"]["profiled_ms"] > 0
    if kernels.backend() != "torch":  # GELU ran inside them, not as torch's operators
        assert not any(kind.startswith("GELU") for kind in shares)
    assert shares["AdamW"] > 0 and 0 <= shares["everything else"] < 1
    assert set(record["steps"]) == {"today's (baseline)", "solo", "population of 2"}
    assert "tokens per CPU s" in printed
    assert all(t["tokens_per_s"] > 0 for t in record["steps"].values())
    assert record["end_to_end"]["population of 6"]["runs"] == 6
