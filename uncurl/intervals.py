"""Intervals that respect the study's design, and control of multiple comparisons.

A model's score on a task is a (seeds, examples) matrix: every fine-tuning seed (its own
reduction, router warm-up and data order) scored on the same validation examples. Seeds are the
replication unit, and examples are a sample of the task; an interval covers both by a
hierarchical bootstrap: resample seeds, then, within each resampled seed, the validation units
(an example, or a cluster of correlated examples such as the windows of one section of a
document). A paired comparison resamples the same seeds and units for both models. Where the
seeds start from models of several pretraining seeds (`groups`: each fine-tuning seed's
pretraining seed), those come first: pretraining seeds with replacement, then the fine-tuning
seeds of each, then units. With few seeds a level is resampled from few values, which
understates its spread by a factor of about (n - 1) / n in variance.
"""

from typing import NamedTuple

import numpy as np

LEVEL = 0.95  # every interval of the study
N_BOOT = 2000
CHUNK = 100  # bootstrap resamples drawn at a time (bounds the memory of the index arrays)


class Interval(NamedTuple):
    mean: float
    lo: float
    hi: float
    p: float  # two-sided bootstrap p-value of mean = 0


def bootstrap(
    values: np.ndarray,
    units=None,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    groups=None,
) -> Interval:
    """Mean of a (seeds, examples) matrix and its percentile interval by the hierarchical
    bootstrap; `units` gives each example's cluster (default: each example its own), `groups`
    each seed's pretraining seed (default: one for all)."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    boots = draws(values, units, n_boot, seed, groups)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min(np.mean(boots <= 0), np.mean(boots >= 0)))
    return Interval(float(values.mean()), float(lo), float(hi), float(p))


def draws(
    values: np.ndarray, units=None, n_boot: int = N_BOOT, seed: int = 0, groups=None
) -> np.ndarray:
    """The hierarchical bootstrap's `n_boot` resampled means of a (seeds, examples) matrix, for
    statistics of several matrices at once (a threshold read off many comparisons)."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n_examples = values.shape[1]
    units = np.arange(n_examples) if units is None else np.unique(units, return_inverse=True)[1]
    sums = np.stack([np.bincount(units, row) for row in values])  # (seeds, units)
    counts = np.bincount(units).astype(float)
    if groups is not None and len(groups) != len(values):
        raise ValueError(f"{len(groups)} pretraining seeds for {len(values)} fine-tuning seeds")
    one = groups is None or len(set(groups)) == 1
    members = None if one else _members(groups)
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            _resampled_means(rng, sums, counts, min(CHUNK, n_boot - start), members)
            for start in range(0, n_boot, CHUNK)
        ]
    )


def _members(groups) -> np.ndarray:
    """(groups, largest group) seed indices of each group, padded with -1."""
    index = [np.flatnonzero(np.asarray(groups) == g) for g in dict.fromkeys(groups)]
    padded = np.full((len(index), max(map(len, index))), -1)
    for row, seeds in zip(padded, index, strict=True):
        row[: len(seeds)] = seeds
    return padded


def _resampled_means(rng, sums, counts, n: int, members=None) -> np.ndarray:
    """`n` bootstrap means: seeds with replacement (within pretraining seeds drawn with
    replacement, if `members` groups them), then units with replacement per seed."""
    n_seeds, n_units = sums.shape
    if members is None:
        s = rng.integers(0, n_seeds, (n, n_seeds))  # (n, S)
        weight = np.ones(s.shape)
    else:
        sizes = (members >= 0).sum(1)
        g = rng.integers(0, len(members), (n, len(members), 1))  # (n, G, 1)
        k = (rng.random((n, *members.shape)) * sizes[g]).astype(int)  # (n, G, K)
        s = members[g, k].reshape(n, -1)  # a group's seeds, then -1 beyond its size
        weight = (np.arange(members.shape[1]) < sizes[g]) / sizes[g]  # each group counts once
        weight, s = weight.reshape(n, -1), np.maximum(s, 0)
    u = rng.integers(0, n_units, (*s.shape, n_units))  # (n, S, U)
    per_seed = sums[s[..., None], u].sum(-1) / counts[u].sum(-1)
    return (per_seed * weight).sum(-1) / weight.sum(-1)


def paired(a: np.ndarray, b: np.ndarray, units=None, **kwargs) -> Interval:
    """a - b for two models scored on the same examples with paired seeds (seed i of each saw
    the same data order): the bootstrap of the differences."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape:
        raise ValueError(
            f"paired scores must have the same (seeds, examples) shape: {a.shape} vs {b.shape}"
        )
    return bootstrap(a - b, units, **kwargs)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment: the family-wise error rate of the calls stays at most the
    level whatever the dependence between the comparisons."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def verdict(lo: float, hi: float, higher_is_better: bool = True) -> str:
    """(+) when the interval of (reduced - reference) shows the reduced model better, (-) worse,
    (=) when it includes zero."""
    if lo <= 0 <= hi:
        return "="
    return "+" if (lo > 0) == higher_is_better else "-"
