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
* :func:`delong_test` — DeLong et al. (1988) test for two correlated AUROCs on the same films,
  in the fast midrank form of Sun & Xu (2014). No maintained Python library provides it.
* :func:`mcnemar_test` — exact McNemar test (binomial on the discordant pairs, via SciPy).
* :func:`holm` — Holm's step-down family-wise correction (SciPy only offers FDR procedures).
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


def delong_covariance(y_true: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score vectors on the same cases and their k×k DeLong covariance.

    Fast algorithm of Sun & Xu (2014, IEEE Signal Process. Lett. 21:1389): the placement values
    of DeLong et al. (1988) are obtained from midranks instead of all m×n pairwise comparisons.
    ``scores`` has shape (k, n_cases); ties count one half, as in the Mann–Whitney statistic.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    m, n = int(y.sum()), int((~y).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least two positive and two negative cases (got {m} and {n})")
    positives, negatives = s[:, y], s[:, ~y]
    rank_pos = stats.rankdata(positives, axis=1)
    rank_neg = stats.rankdata(negatives, axis=1)
    rank_all = stats.rankdata(np.hstack([positives, negatives]), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v_pos = (rank_all[:, :m] - rank_pos) / n  # placement of each positive among the negatives
    v_neg = 1 - (rank_all[:, m:] - rank_neg) / m  # placement of each negative among the positives
    covariance = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return aucs, covariance


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike) -> DeLongResult:
    """DeLong's two-sided test that two models scored on the same films have equal AUROC."""
    aucs, cov = delong_covariance(y_true, np.vstack([score_a, score_b]))
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
    """Paired correctness of two models: discordant counts and the exact two-sided p-value."""

    only_a_correct: int
    only_b_correct: int
    p_value: float


def mcnemar_test(correct_a: ArrayLike, correct_b: ArrayLike) -> McNemarResult:
    """Exact McNemar test: under equal accuracy each discordant film favours A with probability ½."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(stats.binomtest(only_a, discordant, 0.5).pvalue)
    return McNemarResult(only_a, only_b, p)


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
