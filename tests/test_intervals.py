"""Intervals: the hierarchical bootstrap, its paired form, Holm's adjustment and the verdicts."""

import numpy as np
import pytest

from uncurl import intervals


def test_paired_differences_give_the_right_verdicts():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, (3, 400)).astype(float)
    same = intervals.paired(a, a.copy())
    assert same.mean == same.lo == same.hi == 0 and intervals.verdict(same.lo, same.hi) == "="
    shifted = np.clip(a + (rng.random(a.shape) < 0.3), 0, 1)  # right on 30% more examples
    up = intervals.paired(shifted, a)
    assert up.lo > 0 and up.p < 0.01 and intervals.verdict(up.lo, up.hi) == "+"
    assert intervals.verdict(up.lo, up.hi, higher_is_better=False) == "-"  # a loss that rose
    noise = intervals.paired(rng.permuted(a, axis=1), a)  # the same answers, shuffled
    assert intervals.verdict(noise.lo, noise.hi) == "=" and noise.p > 0.05
    with pytest.raises(ValueError, match="same"):
        intervals.paired(a, a[:, :10])


def test_the_interval_narrows_with_examples_and_widens_with_seed_spread():
    rng = np.random.default_rng(1)
    small, large = rng.random((3, 50)), rng.random((3, 5000))
    s, big = intervals.bootstrap(small), intervals.bootstrap(large)
    assert s.lo < s.mean < s.hi and big.hi - big.lo < (s.hi - s.lo) / 5
    # seeds that disagree (each its own offset) widen the interval: seeds are resampled
    spread = large + np.array([[-0.2], [0.0], [0.2]])
    wide = intervals.bootstrap(spread)
    assert wide.hi - wide.lo > 10 * (big.hi - big.lo)


def test_clusters_of_correlated_examples_are_resampled_whole():
    """Windows of one section share its offset; resampling windows as if independent would give
    a far narrower interval than resampling the sections."""
    rng = np.random.default_rng(2)
    sections = np.repeat(np.arange(20), 25)  # 20 sections of 25 windows
    values = rng.normal(size=20)[sections] + 0.1 * rng.normal(size=(2, 500))
    by_window = intervals.bootstrap(values)
    by_section = intervals.bootstrap(values, units=sections)
    assert by_section.mean == by_window.mean
    assert by_section.hi - by_section.lo > 3 * (by_window.hi - by_window.lo)


def test_holm_adjusts_as_the_step_down_procedure():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> running maximum
    np.testing.assert_allclose(intervals.holm(p), [0.03, 0.06, 0.06, 0.02])
    assert intervals.holm([0.9, 0.8]).max() == 1.0


def test_the_same_seed_gives_the_same_interval():
    values = np.random.default_rng(3).random((4, 100))
    assert intervals.bootstrap(values, seed=5) == intervals.bootstrap(values, seed=5)


def test_pretraining_seeds_are_resampled_before_the_seeds_of_each():
    """Seeds 0, 2, 4 from one pretrained model (every score 0), 1 and 3 from another (every
    score 1): a draw picks two pretraining seeds, so its mean is 0, 1/2 or 1 with chances 1/4,
    1/2, 1/4, where resampling the five seeds alike would give fifths."""
    values = np.repeat(np.array([[0.0], [1.0], [0.0], [1.0], [0.0]]), 10, axis=1)
    groups = [0, 1, 0, 1, 0]
    means = intervals.draws(values, n_boot=4000, groups=groups)
    share = {v: np.mean(np.isclose(means, v)) for v in (0.0, 0.5, 1.0)}
    assert sum(share.values()) == 1.0
    assert abs(share[0.5] - 0.5) < 0.04 and abs(share[0.0] - 0.25) < 0.04
    flat = intervals.draws(values, n_boot=400)
    assert not np.all(np.isin(np.round(flat, 6), [0.0, 0.5, 1.0]))
    # one pretraining seed for all: the two-level bootstrap, draw for draw
    np.testing.assert_array_equal(intervals.draws(values, groups=[7] * 5), intervals.draws(values))
    with pytest.raises(ValueError, match="2 pretraining seeds for 5"):
        intervals.draws(values, groups=[0, 1])
