"""Resampling and hypothesis tests for honest model evaluation.

* :func:`cluster_weights` — the patient-level bootstrap. Films of one patient are correlated
  (same anatomy, same fracture, several views and follow-ups), so a bootstrap that resamples
  films pretends to more information than there is and gives intervals that are too narrow.
  Each replicate draws *patients* with replacement; a film's weight is how often its patient was
  drawn. The weights feed scikit-learn's ``sample_weight``, so every metric is computed by the
  library, not re-implemented. (``scipy.stats.bootstrap`` resamples observations only.)
* :func:`percentile_interval` — percentile CI over the replicates, skipping replicates on which
  a metric is undefined (e.g. a resample without positives) and withholding the interval when
  too many were skipped.
* :func:`delong_test` — two correlated AUROCs on the same films, compared with the
  patient-clustered DeLong test of Obuchowski (1997): DeLong et al.'s (1988) placement values
  (fast midrank form of Sun & Xu, 2014) are summed per patient before their (co)variances are
  taken, so several films of one child count as one correlated unit. No maintained Python library
  provides either test.
* :func:`mcnemar_test` — paired accuracy of two models, compared with Obuchowski's (1998)
  patient-clustered McNemar test (chi-square on per-patient discordance).
* :func:`holm` — Holm's step-down family-wise correction (SciPy only offers FDR procedures).

Film-level DeLong and McNemar tests treat a child's films as independent and, between two
equally good models, declare a difference far more often than α (a quarter to a third of the
time at 40 patients × 4 films); the clustered forms keep α. With one film per patient they reduce to
DeLong's test exactly and to McNemar's uncorrected χ² times (K − 1)/K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats


def cluster_weights(clusters: ArrayLike, replicates: int, seed: int | np.random.SeedSequence) -> np.ndarray:
    """Bootstrap multiplicities, shape (replicates, n): clusters (patients) drawn with replacement.

    Row ``b`` says how many times each observation appears in replicate ``b``: every observation
    of a cluster gets the number of times that cluster was drawn. Passing the unique observation
    ids as ``clusters`` gives the ordinary (observation-level) bootstrap.
    """
    codes, uniques = pd.factorize(np.asarray(clusters))
    k = len(uniques)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(replicates, k))
    offsets = np.arange(replicates)[:, None] * k
    counts = np.bincount((draws + offsets).ravel(), minlength=replicates * k).reshape(replicates, k)
    return counts[:, codes]


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval; ``note`` says why it is missing when it is NaN."""

    low: float
    high: float
    replicates: int  # replicates that could be scored
    skipped: int  # replicates on which the statistic was undefined
    note: str = ""


def percentile_interval(estimates: ArrayLike, level: float = 0.95, max_skipped: float = 0.1) -> Interval:
    """Percentile interval of replicate estimates; NaN estimates count as skipped replicates.

    When more than ``max_skipped`` of the replicates were skipped, the interval is withheld (NaN)
    rather than reported from a biased subset of resamples.
    """
    values = np.asarray(estimates, dtype=float)
    ok = values[~np.isnan(values)]
    skipped = len(values) - len(ok)
    if len(values) == 0:
        return Interval(np.nan, np.nan, 0, 0, "no bootstrap replicates")
    if skipped / len(values) > max_skipped or len(ok) < 2:
        return Interval(np.nan, np.nan, len(ok), skipped,
                        f"CI withheld: metric undefined in {skipped} of {len(values)} resamples "
                        f"(> {max_skipped:.0%}; too few patients of one class)")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ok, [tail, 100 - tail])
    return Interval(float(low), float(high), len(ok), skipped)


@dataclass(frozen=True)
class DeLongResult:
    """Two correlated AUROCs, their covariance and the two-sided test of equality."""

    auc_a: float
    auc_b: float
    covariance: np.ndarray  # 2x2 covariance of (auc_a, auc_b)
    z: float
    p_value: float


def _centred_cluster_sums(values: np.ndarray, centre: np.ndarray, codes: np.ndarray, clusters: int) -> np.ndarray:
    """Per cluster and row, Σ (value − centre) over the cluster's columns, shape (rows, clusters)."""
    return np.vstack([np.bincount(codes, weights=row - c, minlength=clusters) for row, c in zip(values, centre)])


def delong_covariance(y_true: ArrayLike, scores: ArrayLike, clusters: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score vectors on the same films and their k×k patient-clustered covariance.

    Obuchowski (1997, Biometrics 53:567), for two correlated curves: with M positive and N
    negative films in I clusters (I₁₀ of them with a positive film, I₀₁ with a negative one), the
    placement value of a positive film is its AUROC against all negatives, V₁₀ (a negative's, V₀₁,
    against all positives); A_i = Σ_{positives of i} (V₁₀ − θ), B_i = Σ_{negatives of i} (V₀₁ − θ);

        cov(θ_r, θ_s) = I₁₀/(I₁₀−1) · Σ A_i^r A_i^s / M² + I₀₁/(I₀₁−1) · Σ B_i^r B_i^s / N²
                        + I/(I−1) · Σ (A_i^r B_i^s + B_i^r A_i^s) / (M N).

    With one film per cluster A_i B_i = 0 and I₁₀ = M, so this is DeLong et al.'s (1988)
    covariance exactly (their sample variances divide by M − 1 and N − 1). Placement values come
    from midranks (Sun & Xu 2014, IEEE Signal Process. Lett. 21:1389) instead of all M×N pairwise
    comparisons; ties count one half, as in the Mann–Whitney statistic. ``scores``: shape (k, films).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    codes, uniques = pd.factorize(np.asarray(clusters))
    i_pos, i_neg = len(np.unique(codes[y])), len(np.unique(codes[~y]))
    if i_pos < 2 or i_neg < 2:
        raise ValueError(f"DeLong needs positive films from at least two patients and negative films from at least "
                         f"two (got {i_pos} and {i_neg})")
    m, n, i_all = int(y.sum()), int((~y).sum()), len(uniques)
    positives, negatives = s[:, y], s[:, ~y]
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    rank_all = stats.rankdata(np.hstack([positives, negatives]), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v_pos = (rank_all[:, :m] - rank_pos) / n  # placement of each positive among the negatives
    v_neg = 1 - (rank_all[:, m:] - rank_neg) / m  # placement of each negative among the positives
    a = _centred_cluster_sums(v_pos, aucs, codes[y], i_all)
    b = _centred_cluster_sums(v_neg, aucs, codes[~y], i_all)
    cross = a @ b.T
    covariance = (i_pos / (i_pos - 1) * (a @ a.T) / m**2 + i_neg / (i_neg - 1) * (b @ b.T) / n**2
                  + i_all / (i_all - 1) * (cross + cross.T) / (m * n))
    return aucs, covariance


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, clusters: ArrayLike) -> DeLongResult:
    """Two-sided test that two models scored on the same films have equal AUROC, films clustered
    by ``clusters`` (patient ids; unique film ids give DeLong's original test)."""
    aucs, cov = delong_covariance(y_true, np.vstack([score_a, score_b]), clusters)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    difference = aucs[0] - aucs[1]
    if variance <= 0:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = float(difference / np.sqrt(variance))
        p = float(2 * stats.norm.sf(abs(z)))
    return DeLongResult(float(aucs[0]), float(aucs[1]), cov, z, p)


@dataclass(frozen=True)
class McNemarResult:
    """Paired correctness of two models: discordant film counts, the chi-square and its p-value."""

    only_a_correct: int
    only_b_correct: int
    chi2: float
    p_value: float


def mcnemar_test(correct_a: ArrayLike, correct_b: ArrayLike, clusters: ArrayLike) -> McNemarResult:
    """Obuchowski's (1998, Stat Med 17:1495) clustered McNemar test of equal film-level accuracy.

    With d_i = (films of patient i only A got right) − (only B got right) over K patients,

        χ² = (K − 1)/K · (Σ d_i)² / Σ d_i²    (1 df)

    — the accuracy difference over its ratio-estimator variance, K/(K−1) · Σ d_i² / films² (each
    model's per-patient counts centred at the pooled accuracy), in the closed form of Yang, Sun &
    Hardin (2010, Biometrical Journal). With one film per patient d_i is −1, 0 or 1 and
    χ² = (K − 1)/K · (b − c)²/(b + c): McNemar's uncorrected statistic times (K − 1)/K, the
    small-sample factor of the clustered variance, which the textbook McNemar does not have.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    codes, uniques = pd.factorize(np.asarray(clusters))
    k = len(uniques)
    d = np.bincount(codes, weights=a.astype(float) - b, minlength=k)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    squares = float(d @ d)
    if squares == 0:  # no patient leans either way: no evidence of a difference
        return McNemarResult(only_a, only_b, 0.0, 1.0)
    chi2 = (k - 1) / k * float(d.sum()) ** 2 / squares
    return McNemarResult(only_a, only_b, chi2, float(stats.chi2.sf(chi2, 1)))


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values (family-wise error control), in input order.

    NaN p-values are left NaN and do not count towards the family size.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    steps = (len(order) - np.arange(len(order))) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted
