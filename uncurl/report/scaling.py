"""The unified scaling law for routed language models (Clark et al. 2022), and fits of its form.

    log10 L(N, E) = a log10 N + b log10 Ê + c log10 N log10 Ê + d
    1 / Ê = 1 / (E - 1 + (1 / E_start - 1 / E_max)^-1) + 1 / E_max

N is the dense backbone's parameter count, E the experts per MoE layer and Ê its saturating
transform (Ê = E_start at E = 1, Ê -> E_max as E grows). Clark et al., "Unified Scaling Laws for
Routed Language Models", ICML 2022, arXiv:2202.01169, eq. (2) of section 4; the coefficients
below are their S-BASE fit.

Two readings of "performance-equivalent dense size" N' of a routed model (N, E):
- `dense_equivalent`: a log N' + d = log L(N, E), the dense law without the routing terms
  (the reading that Sarkar et al.'s Fig. 2b describes);
- `effective_params`: L(N', 1) = L(N, E), Clark et al.'s Effective Parameter Count, which gives
  a dense model (E = 1) exactly its own size.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class RoutedLaw:
    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float

    def saturate(self, n_expert):
        """Ê: the saturating transform of the expert count."""
        e = np.asarray(n_expert, dtype=float)
        return 1 / (1 / (e - 1 + 1 / (1 / self.e_start - 1 / self.e_max)) + 1 / self.e_max)

    def log_loss(self, n_params, n_expert):
        """log10 of the predicted loss."""
        x, s = np.log10(n_params), np.log10(self.saturate(n_expert))
        return self.a * x + self.b * s + self.c * x * s + self.d

    def dense_equivalent(self, n_params, n_expert):
        """N' with a log N' + d = log L(N, E) (the dense law without the routing terms)."""
        return 10 ** ((self.log_loss(n_params, n_expert) - self.d) / self.a)

    def effective_params(self, n_params, n_expert):
        """Clark et al.'s Effective Parameter Count: N' with L(N', 1) = L(N, E)."""
        s = np.log10(self.e_start)
        return 10 ** (
            (self.log_loss(n_params, n_expert) - self.b * s - self.d) / (self.a + self.c * s)
        )

    @property
    def dense_exponent(self) -> float:
        """d log10 L / d log10 N of a dense model (E = 1, so Ê = E_start)."""
        return self.a + self.c * np.log10(self.e_start)


# Clark et al. 2022, S-BASE (Sinkhorn-BASE routing): a, b, c, d of eq. (2) with E_start, E_max.
# Quoted from their table of fitted coefficients; N_cutoff = 10^(-b/c), the size beyond which
# routing stops helping, is about 10^12 parameters with these values.
CLARK_S_BASE = RoutedLaw(a=-0.082, b=-0.108, c=0.009, d=1.104, e_start=1.847, e_max=314.478)


def law_table(law: RoutedLaw = CLARK_S_BASE) -> pd.DataFrame:
    """The law's coefficients as a one-row table (for the book)."""
    return pd.DataFrame(
        [
            {
                "a": law.a,
                "b": law.b,
                "c": law.c,
                "d": law.d,
                "E_start": law.e_start,
                "E_max": law.e_max,
            }
        ]
    )


def paper_comparison(
    n_params: float, expert_counts, paper_values: dict, law: RoutedLaw = CLARK_S_BASE
) -> pd.DataFrame:
    """N' of N+Xe by both readings of the law next to the values a paper reports."""
    e = np.asarray(list(expert_counts), dtype=float)
    return pd.DataFrame(
        {
            "n_expert": e.astype(int),
            "paper": [paper_values.get(int(x), np.nan) for x in e],
            "dense_equivalent": law.dense_equivalent(n_params, e),
            "effective_params": law.effective_params(n_params, e),
        }
    )


@dataclass(frozen=True)
class LineFit:
    """Ordinary least squares y = intercept + slope * x, with what is needed for intervals."""

    intercept: float
    slope: float
    cov: np.ndarray  # (2, 2) covariance of (intercept, slope)
    dof: int
    r2: float
    residual_sd: float
    x: np.ndarray
    y: np.ndarray

    @property
    def slope_se(self) -> float:
        return float(np.sqrt(self.cov[1, 1]))

    def slope_interval(self, level: float = 0.95) -> tuple[float, float]:
        t = stats.t.ppf(0.5 + level / 2, self.dof)
        return self.slope - t * self.slope_se, self.slope + t * self.slope_se

    def predict(self, x, level: float = 0.95):
        """Fitted line at x with a confidence band for the mean: (y, lo, hi)."""
        x = np.asarray(x, dtype=float)
        design = np.stack([np.ones_like(x), x], axis=-1)
        y = design @ np.array([self.intercept, self.slope])
        se = np.sqrt(np.einsum("...i,ij,...j->...", design, self.cov, design))
        t = stats.t.ppf(0.5 + level / 2, self.dof)
        return y, y - t * se, y + t * se


def fit_line(x, y) -> LineFit:
    """Least squares; with two points the line is exact and every interval is NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"a line needs at least two distinct x values, got {x.tolist()}")
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    dof = len(x) - 2
    sigma2 = resid @ resid / dof if dof else np.nan
    cov = sigma2 * np.linalg.inv(design.T @ design)
    r2 = 1 - resid @ resid / np.sum((y - y.mean()) ** 2) if np.ptp(y) > 0 else 1.0
    return LineFit(
        float(coef[0]), float(coef[1]), cov, dof, float(r2), float(np.sqrt(sigma2)), x, y
    )


def fit_paper_exponent(n_params: float, paper_values: dict, law: RoutedLaw | None = None):
    """Fit the law's form to reported N' at one backbone size N.

    At fixed N the law says log N' = log N + k log Ê with one free number
    k = (b + c log N) / a: a line through the origin in log Ê. With `law`, Ê uses its saturation;
    without, Ê = E. Returns (k, its standard error, the fitted N' per expert count).
    """
    e = np.array(sorted(paper_values), dtype=float)
    ratio = np.log10(np.array([paper_values[int(x)] for x in e]) / n_params)
    s = np.log10(law.saturate(e) if law else e)
    k = float(s @ ratio / (s @ s))
    resid = ratio - k * s
    se = float(np.sqrt(resid @ resid / (len(e) - 1) / (s @ s)))
    return (
        k,
        se,
        dict(zip(e.astype(int).tolist(), (n_params * 10 ** (k * s)).tolist(), strict=True)),
    )


def fit_fixed_size(n_expert, val_loss, law: RoutedLaw = CLARK_S_BASE) -> LineFit:
    """log10 L = alpha + beta log10 Ê over models that share one backbone (one N).

    This is all of the law that models of one size can identify: alpha = a log N + d and
    beta = b + c log N. E_start and E_max are taken from `law`, not fitted.
    """
    return fit_line(np.log10(law.saturate(n_expert)), np.log10(val_loss))


def dense_equivalent_from_fit(
    fit: LineFit,
    n_expert,
    dense_exponent: float,
    law: RoutedLaw = CLARK_S_BASE,
    level: float = 0.95,
) -> pd.DataFrame:
    """N'/N of each expert count implied by a fixed-size fit, with an interval.

    L(N', 1) = L(N, E) gives log10(N'/N) = beta (log10 Ê(E) - log10 Ê(1)) / dense_exponent.
    The dense exponent (how the loss falls with the dense size) cannot come from models of one
    size; it is borrowed. The interval covers the uncertainty of beta only.
    """
    e = np.asarray(n_expert, dtype=float)
    gain = np.log10(law.saturate(e)) - np.log10(law.saturate(1.0))
    lo, hi = fit.slope_interval(level)
    bounds = np.sort(np.stack([lo * gain, hi * gain]) / dense_exponent, axis=0)
    return pd.DataFrame(
        {
            "n_expert": e.astype(int),
            "ratio": 10 ** (fit.slope * gain / dense_exponent),
            "ratio_lo": 10 ** bounds[0],
            "ratio_hi": 10 ** bounds[1],
        }
    )
