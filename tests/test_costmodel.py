"""The All2All cost model: bytes from the capacity rule, a fit that recovers known constants."""

import math

import numpy as np
import pytest

from uncurl.bench import costmodel
from uncurl.config import ModelConfig


@pytest.mark.parametrize(
    "n_expert, tokens, top_k, capacity",
    [
        (4, 24, 1, 6),  # ceil(1.0 * 24 / 4)
        (4, 24, 2, 12),  # top-2 doubles the slots
        (64, 24, 1, 4),  # the minimum capacity binds
    ],
)
def test_buffer_bytes_follow_the_capacity_rule(n_expert, tokens, top_k, capacity):
    cfg = ModelConfig(n_embd=16, n_head=2, n_expert=n_expert, top_k=top_k)
    assert (
        costmodel.buffer_bytes(cfg, n_expert, tokens, dtype_bytes=2) == n_expert * capacity * 16 * 2
    )


def test_dropless_routing_has_no_fixed_byte_count():
    with pytest.raises(ValueError, match="dropless"):
        costmodel.buffer_bytes(ModelConfig(eval_capacity_factor=None), 4, 64)


def test_fit_recovers_alpha_and_bandwidth_from_exact_points():
    nbytes = np.array([1e4, 1e5, 1e6, 1e4, 1e5, 1e6])
    world = np.array([2, 2, 2, 4, 4, 4])
    seconds = costmodel.exchange_time(nbytes, world, alpha=50e-6, bandwidth=2e9)
    fit = costmodel.fit(nbytes, world, seconds)
    assert fit.alpha == pytest.approx(50e-6) and fit.bandwidth == pytest.approx(2e9)
    assert fit.r2 == pytest.approx(1.0) and max(map(abs, fit.residuals)) < 1e-12


def test_fit_needs_two_sizes_or_two_world_sizes():
    with pytest.raises(ValueError, match="at least two sizes"):
        costmodel.fit([1e4, 1e4], [2, 2], [1e-3, 1.1e-3])


def test_one_process_exchanges_nothing():
    assert costmodel.exchange_time(1e6, 1, alpha=1e-3, bandwidth=1e9)[0] == 0


def test_the_papers_buffer_does_not_grow_with_the_expert_count():
    rows = costmodel.paper_fig4_prediction()
    assert {r["buffer_bytes"] for r in rows} == {512 * 768 * 2}  # E * ceil(512 / E) = 512
    a100 = [r for r in rows if r["link"].startswith("A100")]
    assert len(a100) == len(costmodel.PAPER_FIG4_A2A_US)
    for r in a100:  # two exchanges: 2 * (alpha + half the buffer over 300 GB/s)
        want = 2 * (costmodel.GPU_ALPHA + 512 * 768 * 2 / 2 / 300e9) * 1e6
        assert math.isclose(r["model_us"], want)
        assert r["paper_over_model"] == pytest.approx(r["paper_us"] / want)
