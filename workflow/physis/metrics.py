"""Binary classification metrics, the operating threshold, and their patient-bootstrap CIs.

AUROC, average precision, Cohen's κ and the Brier score come from scikit-learn; sensitivity,
specificity, PPV, NPV, accuracy and F1 are ratios of the confusion matrix (tested against
scikit-learn's functions); the expected calibration error and the net benefit of decision-curve
analysis, which scikit-learn lacks, are written here. All accept bootstrap weights (``sample_weight``),
so the point estimate and each bootstrap replicate go through the same code.

A metric that is undefined on a sample (AUROC without positives, PPV without predicted positives
…) is NaN with a reason, never an exception: a split with one class yields a table whose other
metrics are still filled and whose ``note`` column says what is missing and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from physis.stats import percentile_interval

#: metric name -> label used in tables and figures (order = report order).
METRICS: dict[str, str] = {
    "accuracy": "Accuracy",
    "kappa": "Cohen's κ",
    "auroc": "AUROC",
    "average_precision": "Average precision",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "brier": "Brier score",
    "ece": "ECE",
}

#: what a metric needs from a sample (weighted counts) to be defined.
_NEEDS = {
    "auroc": ("positives", "negatives"), "average_precision": ("positives", "negatives"),
    "kappa": ("positives", "negatives"), "sensitivity": ("positives",), "f1": ("positives",),
    "specificity": ("negatives",), "ppv": ("predicted positives",), "npv": ("predicted negatives",),
}

ROW_COLUMNS = ["metric", "value", "ci_low", "ci_high", "n", "n_patients", "n_positive", "replicates",
               "skipped", "note"]


class MetricError(ValueError):
    """A metric that cannot be computed on a split; the message names the split and the reason."""


def _counts(y: np.ndarray, pred: np.ndarray, weight: np.ndarray | None) -> dict[str, float]:
    """The weighted 2×2 confusion matrix (a bincount: sklearn's validation overhead would dominate
    the bootstrap, which calls this once per replicate and table row)."""
    tn, fp, fn, tp = np.bincount(2 * y + pred, weights=weight, minlength=4)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "positives": tp + fn, "negatives": tn + fp,
            "predicted positives": tp + fp, "predicted negatives": tn + fn}


def undefined_reason(name: str, counts: dict[str, float]) -> str | None:
    """Why ``name`` is undefined for a sample with these confusion counts (None: it is defined)."""
    missing = [need for need in _NEEDS.get(name, ()) if counts[need] == 0]
    return f"no {' and no '.join(missing)}" if missing else None


def calibration_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` edges of the equal-width calibration bins on [0, 1]: k / bins.

    Divided rather than ``np.linspace``-stepped, so each edge is the float nearest k/bins and a score
    written 0.3 lies exactly on the edge of bin 3 of 10 (linspace gives 0.30000000000000004).
    """
    return np.arange(bins + 1) / bins


def calibration_bins(score: ArrayLike, bins: int) -> np.ndarray:
    """Bin index of each score: [k/bins, (k+1)/bins), the last bin closed (1.0 is in it).

    The one binning of the ECE and the reliability diagram, left-closed like ``np.histogram``, which
    draws the diagram's score histogram. (scikit-learn's ``calibration_curve`` closes its bins on the
    right instead; ``floor(score · bins)`` misplaces some edges, e.g. 1/49 · 49 < 1.)
    """
    index = np.searchsorted(calibration_edges(bins), np.asarray(score, dtype=float), side="right") - 1
    return np.clip(index, 0, bins - 1)


def reliability(y_true: ArrayLike, score: ArrayLike, bins: int = 10,
                sample_weight: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per calibration bin: total weight (films), mean score and observed share of positives (NaN if empty)."""
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(score, dtype=float)
    w = np.ones_like(s) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    index = calibration_bins(s, bins)
    total = np.bincount(index, weights=w, minlength=bins)
    with np.errstate(invalid="ignore"):
        predicted = np.bincount(index, weights=w * s, minlength=bins) / total
        observed = np.bincount(index, weights=w * y, minlength=bins) / total
    return total, predicted, observed


def expected_calibration_error(y_true: ArrayLike, score: ArrayLike, bins: int = 10,
                               sample_weight: ArrayLike | None = None) -> float:
    """ECE over :func:`calibration_bins`: Σ_b (n_b / n) · |observed_b − mean score_b|."""
    total, predicted, observed = reliability(y_true, score, bins, sample_weight)
    filled = total > 0
    return float(np.sum(total[filled] * np.abs(observed[filled] - predicted[filled])) / total.sum())


def compute(y_true: ArrayLike, score: ArrayLike, y_pred: ArrayLike, names: Sequence[str] = tuple(METRICS),
            sample_weight: ArrayLike | None = None, ece_bins: int = 10) -> dict[str, float]:
    """The requested metrics of one (weighted) sample; NaN where a metric is undefined."""
    y, s, p = np.asarray(y_true, dtype=int), np.asarray(score, dtype=float), np.asarray(y_pred, dtype=int)
    if len(y) == 0:
        return dict.fromkeys(names, np.nan)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=float)
    c = _counts(y, p, w)
    n = c["positives"] + c["negatives"]
    ratio = {
        "accuracy": lambda: (c["tp"] + c["tn"]) / n,
        "sensitivity": lambda: c["tp"] / c["positives"],
        "specificity": lambda: c["tn"] / c["negatives"],
        "ppv": lambda: c["tp"] / c["predicted positives"],
        "npv": lambda: c["tn"] / c["predicted negatives"],
        "f1": lambda: 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]),
        "auroc": lambda: skm.roc_auc_score(y, s, sample_weight=w),
        "average_precision": lambda: skm.average_precision_score(y, s, sample_weight=w),
        "kappa": lambda: skm.cohen_kappa_score(y, p, sample_weight=w),
        "brier": lambda: skm.brier_score_loss(y, s, sample_weight=w, pos_label=1),
        "ece": lambda: expected_calibration_error(y, s, ece_bins, w),
    }
    return {name: float(ratio[name]()) if undefined_reason(name, c) is None else np.nan for name in names}


def max_youden_j(y_true: ArrayLike, score: ArrayLike) -> float:
    """The largest sensitivity + specificity − 1 over all thresholds; 0 when none beats chance
    (the threshold above every score, calling nothing positive, has J = 0)."""
    fpr, tpr, _ = skm.roc_curve(y_true, score, drop_intermediate=False)
    return float(np.max(tpr - fpr))


def choose_threshold(y_true: ArrayLike, score: ArrayLike, rule: str = "youden",
                     target_sensitivity: float = 0.9, split: str = "val") -> float:
    """Operating threshold (a film is positive when score ≥ threshold) chosen on one split.

    ``youden``: maximises sensitivity + specificity − 1 on the ROC curve. ``sensitivity``: the
    highest threshold whose sensitivity reaches ``target_sensitivity`` (the most specific
    operating point that still meets the target).
    """
    y = np.asarray(y_true, dtype=int)
    if y.min(initial=1) == y.max(initial=0):
        only = "positive" if len(y) and y[0] == 1 else "negative"
        raise MetricError(f"{split} split has only {only} films (n={len(y)}): cannot choose a threshold")
    fpr, tpr, thresholds = skm.roc_curve(y, score, drop_intermediate=False)
    if rule == "youden":
        best = int(np.argmax(tpr - fpr))
    elif rule == "sensitivity":
        best = int(np.argmax(tpr >= target_sensitivity))
    else:
        raise MetricError(f"unknown threshold rule {rule!r} (youden or sensitivity)")
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf ("call nothing positive")


def score_rows(frame: pd.DataFrame, weights: np.ndarray, names: Sequence[str] = tuple(METRICS),
               level: float = 0.95, max_skipped: float = 0.1, ece_bins: int = 10) -> pd.DataFrame:
    """Point estimate and bootstrap CI of each metric on ``frame`` (y_true, score, y_pred, patient_id).

    ``weights`` are the bootstrap multiplicities (:func:`physis.stats.cluster_weights`) over the
    rows of ``frame``. One row per metric, columns :data:`ROW_COLUMNS`.
    """
    y, s, p = frame["y_true"].to_numpy(int), frame["score"].to_numpy(float), frame["y_pred"].to_numpy(int)
    point = compute(y, s, p, names, ece_bins=ece_bins)
    counts = _counts(y, p, None) if len(frame) else None
    replicates = np.full((len(weights), len(names)), np.nan)
    for b, w in enumerate(weights):
        keep = w > 0
        replicates[b] = list(compute(y[keep], s[keep], p[keep], names, w[keep], ece_bins).values())
    rows = []
    for j, name in enumerate(names):
        reason = "no films" if counts is None else undefined_reason(name, counts)
        interval = percentile_interval(replicates[:, j], level, max_skipped)
        note = f"undefined: {reason}" if reason else interval.note
        rows.append({"metric": name, "value": point[name], "ci_low": interval.low, "ci_high": interval.high,
                     "n": len(frame), "n_patients": frame["patient_id"].nunique(), "n_positive": int(y.sum()),
                     "replicates": interval.replicates, "skipped": interval.skipped, "note": note})
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


@dataclass(frozen=True)
class Curve:
    """A ROC or precision-recall curve with a pointwise bootstrap band on a fixed grid.

    ROC: ``x`` = false-positive rate, ``y`` = sensitivity. PR: ``x`` = recall, ``y`` = precision
    (interpolated: the best precision at recall ≥ x, as in average-precision plots).
    """

    kind: str  # "roc" or "pr"
    x: np.ndarray
    y: np.ndarray
    grid: np.ndarray
    low: np.ndarray  # NaN when the band is withheld (too few scorable replicates)
    high: np.ndarray


GRID = np.linspace(0, 1, 101)


def _on_grid(kind: str, y: np.ndarray, s: np.ndarray,
             w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The curve's points and its values on :data:`GRID`."""
    if kind == "roc":
        fpr, tpr, _ = skm.roc_curve(y, s, sample_weight=w)
        return fpr, tpr, np.interp(GRID, fpr, tpr)
    precision, recall, _ = skm.precision_recall_curve(y, s, sample_weight=w)
    recall, precision = recall[::-1], precision[::-1]  # recall ascending
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at recall >= r
    index = np.minimum(np.searchsorted(recall, GRID, side="left"), len(recall) - 1)
    return recall, envelope, envelope[index]


def curve(kind: str, y_true: ArrayLike, score: ArrayLike, weights: np.ndarray, level: float = 0.95,
          max_skipped: float = 0.1) -> Curve:
    """The ``kind`` ("roc"/"pr") curve of one split with a percentile band over bootstrap ``weights``."""
    y, s = np.asarray(y_true, dtype=int), np.asarray(score, dtype=float)
    x, y_curve, _ = _on_grid(kind, y, s, None)
    replicates = []
    for w in weights:
        keep = w > 0
        if 0 < (y[keep] * w[keep]).sum() < w[keep].sum():
            replicates.append(_on_grid(kind, y[keep], s[keep], w[keep])[2])
    low, high = _band(replicates, len(weights), len(GRID), level, max_skipped)
    return Curve(kind, x, y_curve, GRID, low, high)


def _band(replicates: list[np.ndarray], total: int, size: int, level: float,
          max_skipped: float) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band over the computable bootstrap replicates of a curve (``size`` points);
    NaN (withheld) when more than ``max_skipped`` of the ``total`` replicates were not computable."""
    if total == 0 or len(replicates) < (1 - max_skipped) * total:
        return np.full(size, np.nan), np.full(size, np.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.array(replicates), [tail, 100 - tail], axis=0)
    return low, high


#: Threshold probabilities of the decision curves: 1% to 99%.
DECISION_THRESHOLDS = np.arange(1, 100) / 100


def net_benefit(y_true: ArrayLike, probability: ArrayLike, thresholds: ArrayLike,
                sample_weight: ArrayLike | None = None) -> np.ndarray:
    """Net benefit of treating the films whose probability is ≥ p_t, at each threshold probability p_t
    (Vickers & Elkin 2006): TP/n − FP/n · p_t / (1 − p_t). The odds p_t / (1 − p_t) are the harm of a
    false positive relative to the benefit of a true positive that a reader choosing p_t accepts.
    "Treat all" is ``probability`` = 1 for every film; "treat none" is 0 at every threshold."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(probability, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    w = np.ones_like(y) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    called = p[None, :] >= t[:, None]
    n = w.sum()
    return (called @ (w * y)) / n - (called @ (w * (1 - y))) / n * t / (1 - t)


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of a model, with a pointwise bootstrap band, and of treating every film, per threshold."""

    thresholds: np.ndarray
    model: np.ndarray
    low: np.ndarray  # NaN when the band is withheld
    high: np.ndarray
    treat_all: np.ndarray


def decision_curve(y_true: ArrayLike, probability: ArrayLike, weights: np.ndarray, level: float = 0.95,
                   max_skipped: float = 0.1) -> DecisionCurve:
    """The decision curve of one split over :data:`DECISION_THRESHOLDS`, banded over bootstrap ``weights``."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probability, dtype=float)
    replicates = [net_benefit(y[w > 0], p[w > 0], DECISION_THRESHOLDS, w[w > 0]) for w in weights if w.any()]
    low, high = _band(replicates, len(weights), len(DECISION_THRESHOLDS), level, max_skipped)
    return DecisionCurve(DECISION_THRESHOLDS, net_benefit(y, p, DECISION_THRESHOLDS), low, high,
                         net_benefit(y, np.ones_like(p), DECISION_THRESHOLDS))
