"""The routed scaling law (Clark et al. 2022) and the fits of its form."""

import numpy as np
import pytest
from scipy import stats

from uncurl.report import paper
from uncurl.report.scaling import (
    CLARK_S_BASE,
    RoutedLaw,
    dense_equivalent_from_fit,
    fit_fixed_size,
    fit_line,
    fit_paper_exponent,
    paper_comparison,
)

LAW = CLARK_S_BASE


def test_saturation_starts_at_e_start_and_is_bounded_by_e_max():
    e = np.array([1, 2, 8, 64, 512, 1e6])
    s = LAW.saturate(e)
    assert s[0] == pytest.approx(LAW.e_start)
    assert np.all(np.diff(s) > 0)
    assert s[-1] < LAW.e_max and s[-1] == pytest.approx(LAW.e_max, rel=1e-3)


def test_effective_parameter_count_matches_published_values():
    # Effective Parameter Counts of the S-BASE law as tabulated in a secondary source that
    # quotes Clark et al.'s coefficients: 300M base with 8..128 experts, 1B base with 8 experts
    got = LAW.effective_params(300e6, [8, 16, 32, 64, 128]) / 1e6
    np.testing.assert_allclose(got, [554.00, 708.92, 907.58, 1148.86, 1419.23], rtol=1e-4)
    assert LAW.effective_params(1e9, 8) / 1e9 == pytest.approx(1.69, abs=0.005)


def test_a_dense_model_is_worth_exactly_itself():
    assert LAW.effective_params(354e6, 1) == pytest.approx(354e6)
    assert LAW.log_loss(354e6, 1) == pytest.approx(
        LAW.dense_exponent * np.log10(354e6) + LAW.b * np.log10(LAW.e_start) + LAW.d
    )


def test_the_two_readings_of_dense_equivalent_differ_by_the_dense_offset():
    n, e = 354e6, np.array([8, 64, 1024])
    reading = LAW.dense_equivalent(n, e)
    # a log N' + d = log L: solve directly
    np.testing.assert_allclose(LAW.a * np.log10(reading) + LAW.d, LAW.log_loss(n, e))
    assert np.all(LAW.effective_params(n, e) < reading)  # E_start offset favours the dense law


def test_routing_stops_helping_beyond_the_cutoff_size():
    cutoff = 10 ** (-LAW.b / LAW.c)
    assert 5e11 < cutoff < 2e12  # about 10^12 parameters for S-BASE
    assert LAW.effective_params(cutoff * 10, 64) < cutoff * 10


def test_paper_comparison_lists_paper_and_law():
    table = paper_comparison(paper.BACKBONE_PARAMS, [8, 16, 2048], paper.DENSE_EQUIVALENT)
    assert list(table["n_expert"]) == [8, 16, 2048]
    assert table["paper"].iloc[0] == paper.DENSE_EQUIVALENT[8]
    assert np.isnan(table["paper"].iloc[2])
    assert np.all(np.diff(table["dense_equivalent"]) > 0)


def test_fit_line_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 3, 12)
    y = 1.5 - 0.4 * x + rng.normal(0, 0.1, x.size)
    fit, ref = fit_line(x, y), stats.linregress(x, y)
    assert fit.slope == pytest.approx(ref.slope)
    assert fit.intercept == pytest.approx(ref.intercept)
    assert fit.slope_se == pytest.approx(ref.stderr)
    assert fit.r2 == pytest.approx(ref.rvalue**2)
    lo, hi = fit.slope_interval(0.95)
    t = stats.t.ppf(0.975, x.size - 2)
    assert (lo, hi) == pytest.approx((ref.slope - t * ref.stderr, ref.slope + t * ref.stderr))
    mean, band_lo, band_hi = fit.predict([0.0, 1.5])
    assert np.all(band_lo < mean) and np.all(mean < band_hi)


def test_two_points_give_an_exact_line_and_no_interval():
    fit = fit_line([0, 1], [1, 3])
    assert (fit.intercept, fit.slope, fit.dof) == pytest.approx((1, 2, 0))
    assert np.all(np.isnan(fit.slope_interval()))
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([1, 1], [1, 2])


def test_fixed_size_fit_recovers_what_one_size_identifies():
    n, e = 5e7, np.array([1, 4, 8, 16, 32, 64])
    fit = fit_fixed_size(e, 10 ** LAW.log_loss(n, e), LAW)
    assert fit.slope == pytest.approx(LAW.b + LAW.c * np.log10(n))  # beta
    assert fit.intercept == pytest.approx(LAW.a * np.log10(n) + LAW.d)  # alpha
    # with the law's own dense exponent, the fit gives back the law's effective parameter count
    ratios = dense_equivalent_from_fit(fit, e, LAW.dense_exponent, LAW)
    np.testing.assert_allclose(ratios["ratio"], LAW.effective_params(n, e) / n)
    assert ratios["ratio"].iloc[0] == pytest.approx(1.0)


def test_interval_of_the_dense_equivalent_contains_the_estimate():
    rng = np.random.default_rng(1)
    e = np.array([1, 4, 8, 16, 32, 64])
    loss = 4.0 * LAW.saturate(e) ** 0.01 * np.exp(rng.normal(0, 0.005, e.size))
    fit = fit_fixed_size(e, loss, LAW)
    ratios = dense_equivalent_from_fit(fit, e, LAW.dense_exponent, LAW, level=0.9)
    assert np.all(ratios["ratio_lo"] <= ratios["ratio"] + 1e-12)
    assert np.all(ratios["ratio"] <= ratios["ratio_hi"] + 1e-12)
    assert fit.slope > 0 and np.all(ratios["ratio"].iloc[1:] < 1)  # loss rises: worth less


def test_fit_paper_exponent_recovers_a_power_law():
    values = {e: 3e8 * e**0.45 for e in (8, 16, 64, 256)}
    k, se, fitted = fit_paper_exponent(3e8, values)
    assert k == pytest.approx(0.45) and se == pytest.approx(0, abs=1e-12)
    assert fitted[64] == pytest.approx(values[64])
    k_sat, *_ = fit_paper_exponent(3e8, values, RoutedLaw(-0.08, -0.1, 0.01, 1, 1.5, 300))
    assert k_sat > k  # saturation shrinks log Ê, so the same N' needs a larger k
