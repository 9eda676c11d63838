"""Bootstrap, DeLong, McNemar and Holm against independent computations."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from physis import stats


def test_cluster_weights_resample_whole_patients():
    patients = np.array(["a", "a", "a", "b", "c", "c"])
    weights = stats.cluster_weights(patients, 500, seed=1)
    assert weights.shape == (500, 6)
    assert (weights.sum(axis=1) > 0).all()
    # films of one patient always share their multiplicity
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 4] == weights[:, 5]).all()
    # three patients drawn per replicate
    per_patient = weights[:, [0, 3, 4]]
    assert (per_patient.sum(axis=1) == 3).all()
    assert np.allclose(per_patient.mean(axis=0), 1, atol=0.15)
    assert (stats.cluster_weights(patients, 50, seed=1) == weights[:50]).all()  # seeded


def test_image_level_percentile_interval_matches_scipy_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(size=80)
    weights = stats.cluster_weights(np.arange(80), 4000, seed=2)
    means = weights @ x / weights.sum(axis=1)
    ours = stats.percentile_interval(means)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=3).confidence_interval
    assert ours.low == pytest.approx(ref.low, abs=0.03)
    assert ours.high == pytest.approx(ref.high, abs=0.03)


def test_percentile_interval_withholds_when_too_many_replicates_skipped():
    values = np.r_[np.full(80, np.nan), np.linspace(0, 1, 20)]
    interval = stats.percentile_interval(values, max_skipped=0.1)
    assert np.isnan(interval.low) and interval.skipped == 80
    assert "withheld" in interval.note and "80 of 100" in interval.note
    ok = stats.percentile_interval(np.r_[np.nan, np.linspace(0, 1, 99)], max_skipped=0.1)
    assert ok.skipped == 1 and 0 < ok.low < ok.high < 1 and ok.note == ""


def _brute_force_delong(y, scores):
    """DeLong et al. (1988) by definition: all m×n pairwise comparisons, ties one half."""
    y = np.asarray(y, bool)
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    cov = np.cov(np.array(v10)) / y.sum() + np.cov(np.array(v01)) / (~y).sum()
    return np.array(aucs), cov


def test_fast_delong_matches_definition_and_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    a = np.round(y * 0.8 + rng.normal(size=120), 1)  # rounding makes ties
    b = np.round(y * 0.4 + rng.normal(size=120) + 0.5 * a, 1)
    aucs, cov = stats.delong_covariance(y, np.vstack([a, b]))
    ref_aucs, ref_cov = _brute_force_delong(y, [a, b])
    assert aucs == pytest.approx(ref_aucs)
    assert aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    assert cov == pytest.approx(ref_cov)
    result = stats.delong_test(y, a, b)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    z = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(var)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(2 * sps.norm.sf(abs(z)))


def test_delong_single_auc_variance_matches_hanley_mcneil_order_of_magnitude():
    # the single-curve DeLong variance of a perfect separation is zero; of random scores ≈ (m+n+1)/(12mn)
    y = np.r_[np.ones(50), np.zeros(50)]
    _, cov = stats.delong_covariance(y, np.vstack([y, y]))
    assert np.allclose(cov, 0)
    rng = np.random.default_rng(5)
    variances = [stats.delong_covariance(y, rng.random((1, 100)))[1][0, 0] for _ in range(200)]
    assert np.mean(variances) == pytest.approx(101 / (12 * 50 * 50), rel=0.15)


def test_delong_identical_models_and_too_few_cases():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert stats.delong_test(y, s, s).p_value == 1.0
    with pytest.raises(ValueError, match="two positive"):
        stats.delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_mcnemar_exact():
    a = np.array([1] * 10 + [0] * 2 + [1] * 30, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30, bool)
    result = stats.mcnemar_test(a, b)
    assert (result.only_a_correct, result.only_b_correct) == (10, 2)
    assert result.p_value == pytest.approx(sps.binomtest(10, 12).pvalue)
    assert result.p_value == pytest.approx(2 * sps.binom.cdf(2, 12, 0.5))
    assert stats.mcnemar_test(a, a).p_value == 1.0


def test_holm_against_textbook_example():
    # Holm (1979) worked by hand: sorted p × (4, 3, 2, 1), running maximum, capped at 1
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])
    assert stats.holm([]).shape == (0,)
