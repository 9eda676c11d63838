"""Bootstrap, DeLong, McNemar and Holm against independent computations."""

import math

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


def _brute_force_obuchowski(y, score_a, score_b, clusters):
    """Obuchowski (1997) written out as in the paper: pairwise placement values, summed cluster by
    cluster in a Python loop, then the S10, S01 and S11 sums of squares and cross-products; returns
    (AUROC a, AUROC b, variance of a − b)."""
    y, clusters = np.asarray(y, bool), np.asarray(clusters)
    names = list(dict.fromkeys(clusters))
    m_i = np.array([np.sum(y & (clusters == c)) for c in names])
    n_i = np.array([np.sum(~y & (clusters == c)) for c in names])
    big_m, big_n, i_all = m_i.sum(), n_i.sum(), len(names)
    i10, i01 = np.sum(m_i > 0), np.sum(n_i > 0)
    aucs, x_sums, y_sums = [], [], []
    for s in (np.asarray(score_a, float), np.asarray(score_b, float)):
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        aucs.append(psi.mean())
        x_sums.append(np.array([v10[clusters[y] == c].sum() for c in names]))
        y_sums.append(np.array([v01[clusters[~y] == c].sum() for c in names]))
    x_dev = [x_sums[r] - m_i * aucs[r] for r in (0, 1)]
    y_dev = [y_sums[r] - n_i * aucs[r] for r in (0, 1)]

    def covariance(r, t):
        s10 = i10 / ((i10 - 1) * big_m) * np.sum(x_dev[r] * x_dev[t])
        s01 = i01 / ((i01 - 1) * big_n) * np.sum(y_dev[r] * y_dev[t])
        s11 = i_all / (i_all - 1) * (np.sum(x_dev[r] * y_dev[t]) + np.sum(x_dev[t] * y_dev[r]))
        return s10 / big_m + s01 / big_n + s11 / (big_m * big_n)

    return aucs[0], aucs[1], covariance(0, 0) + covariance(1, 1) - 2 * covariance(0, 1)


def _two_models(rng, patients, films):
    """Two equally good models on clustered films: a patient's films share the fracture (shown on
    80% of them), an effect common to both models and an effect of each model of its own."""
    fracture = rng.random(patients) < 0.4
    y = (fracture[:, None] & (rng.random((patients, films)) < 0.8)).ravel().astype(int)
    shared = np.repeat(rng.normal(0, 1, patients), films)

    def score():
        return y + shared + np.repeat(rng.normal(0, 1, patients), films) + rng.normal(0, 0.3, y.size)

    return y, score(), score(), np.repeat(np.arange(patients), films)


def test_fast_delong_matches_definition_and_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    a = np.round(y * 0.8 + rng.normal(size=120), 1)  # rounding makes ties
    b = np.round(y * 0.4 + rng.normal(size=120) + 0.5 * a, 1)
    films = np.arange(120)
    aucs, cov = stats.delong_covariance(y, np.vstack([a, b]), films)
    ref_aucs, ref_cov = _brute_force_delong(y, [a, b])
    assert aucs == pytest.approx(ref_aucs)
    assert aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    result = stats.delong_test(y, a, b, films)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    z = (ref_aucs[0] - ref_aucs[1]) / np.sqrt(var)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(2 * sps.norm.sf(abs(z)))


def test_clustered_delong_with_one_film_per_patient_is_delong():
    # Obuchowski's I10/(I10−1) factor is DeLong's M/(M−1) (np.cov's ddof=1) when every positive film is
    # its own cluster, and the cross term vanishes: the two covariances are the same numbers.
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    a = np.round(y * 0.8 + rng.normal(size=120), 1)
    b = np.round(y * 0.4 + rng.normal(size=120) + 0.5 * a, 1)
    patients = rng.permutation([f"p{i}" for i in range(120)])
    _, cov = stats.delong_covariance(y, np.vstack([a, b]), patients)
    np.testing.assert_allclose(cov, _brute_force_delong(y, [a, b])[1], rtol=0, atol=1e-12)


def test_clustered_delong_matches_obuchowski_by_definition():
    rng = np.random.default_rng(8)
    patients = np.repeat(np.arange(30), rng.integers(1, 6, 30))  # 1–5 films, clusters of both classes
    y = (rng.random(len(patients)) < np.repeat(rng.random(30), np.bincount(patients))).astype(int)
    a = np.round(y + rng.normal(size=len(y)), 1)
    b = np.round(0.5 * y + rng.normal(size=len(y)) + 0.3 * a, 1)
    auc_a, auc_b, var = _brute_force_obuchowski(y, a, b, patients)
    result = stats.delong_test(y, a, b, patients)
    assert (result.auc_a, result.auc_b) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert result.z == pytest.approx((auc_a - auc_b) / np.sqrt(var), rel=1e-10)


def test_delong_single_auc_variance_matches_hanley_mcneil_order_of_magnitude():
    # the single-curve DeLong variance of a perfect separation is zero; of random scores ≈ (m+n+1)/(12mn)
    y = np.r_[np.ones(50), np.zeros(50)]
    films = np.arange(100)
    _, cov = stats.delong_covariance(y, np.vstack([y, y]), films)
    assert np.allclose(cov, 0)
    rng = np.random.default_rng(5)
    variances = [stats.delong_covariance(y, rng.random((1, 100)), films)[1][0, 0] for _ in range(200)]
    assert np.mean(variances) == pytest.approx(101 / (12 * 50 * 50), rel=0.15)


def _false_positive_rates(patients: int, films: int, simulations: int, seed: int) -> np.ndarray:
    """Share of simulations of two equally good models in which each test finds p < 0.05:
    clustered DeLong, clustered McNemar, and both with every film its own cluster."""
    rng = np.random.default_rng(seed)
    p = np.empty((simulations, 4))
    for k in range(simulations):
        y, a, b, pid = _two_models(rng, patients, films)
        correct_a, correct_b = (a >= 0.5) == y, (b >= 0.5) == y
        film = np.arange(len(y))
        p[k] = [stats.delong_test(y, a, b, pid).p_value, stats.mcnemar_test(correct_a, correct_b, pid).p_value,
                stats.delong_test(y, a, b, film).p_value, stats.mcnemar_test(correct_a, correct_b, film).p_value]
    return (p < 0.05).mean(axis=0)


def test_clustered_tests_keep_their_level_where_film_level_tests_do_not():
    clustered_delong, clustered_mcnemar, film_delong, film_mcnemar = _false_positive_rates(40, 4, 600, seed=11)
    assert 0.02 <= clustered_delong <= 0.08 and 0.02 <= clustered_mcnemar <= 0.08
    # the same simulations analysed film by film: the bug the clustering fixes
    assert film_delong > 0.15 and film_mcnemar > 0.12


def test_delong_identical_models_and_too_few_patients():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert stats.delong_test(y, s, s, np.arange(6)).p_value == 1.0
    with pytest.raises(ValueError, match="at least two patients"):
        stats.delong_test([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0, 1, 2])
    with pytest.raises(ValueError, match=r"got 1 and 3"):  # three positive films, but of one child
        stats.delong_test(y, s, s[::-1], [0, 1, 9, 9, 2, 9])


def test_mcnemar_with_one_film_per_patient_is_mcnemar_times_small_sample_factor():
    # 10 films only A got right, 2 only B, 30 both: McNemar's χ² = (10 − 2)² / 12 = 16/3; Obuchowski's
    # clustered variance carries K/(K−1), so with K = 42 single-film patients the statistic is 41/42 of it
    a = np.array([1] * 10 + [0] * 2 + [1] * 30, bool)
    b = np.array([0] * 10 + [1] * 2 + [1] * 30, bool)
    result = stats.mcnemar_test(a, b, np.arange(42))
    assert (result.only_a_correct, result.only_b_correct) == (10, 2)
    assert result.chi2 == pytest.approx(41 / 42 * 16 / 3, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(result.chi2 / 2)), rel=1e-12)  # χ²(1) tail
    assert stats.mcnemar_test(a, a, np.arange(42)).p_value == 1.0


def test_clustered_mcnemar_by_hand():
    # patient p: A right on 3 films B missed (d = 3); q: one each way (d = 0); r: B right on 1 film A
    # missed (d = −1); s: both right. Σd = 2, Σd² = 10, K = 4: χ² = 3/4 · 4/10 = 0.3
    a = np.array([1, 1, 1, 1, 0, 0, 1], bool)
    b = np.array([0, 0, 0, 0, 1, 1, 1], bool)
    patients = ["p", "p", "p", "q", "q", "r", "s"]
    result = stats.mcnemar_test(a, b, patients)
    assert (result.only_a_correct, result.only_b_correct, result.chi2) == (4, 2, pytest.approx(0.3))
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(0.15)))
    balanced = stats.mcnemar_test([1, 0, 1], [0, 1, 1], ["p", "p", "q"])  # every patient d = 0
    assert (balanced.chi2, balanced.p_value) == (0.0, 1.0)


def test_holm_against_textbook_example():
    # Holm (1979) worked by hand: sorted p × (4, 3, 2, 1), running maximum, capped at 1
    p = [0.01, 0.04, 0.03, 0.005]
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.02, 0.02])
    assert stats.holm([]).shape == (0,)
