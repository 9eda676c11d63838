"""Post-hoc calibration: a monotone map from a model's score to a probability, fitted on validation only.

A score that ranks well can still be a poor probability (a model that calls every film 0.98 and
every fracture 0.99 has AUROC 1.0 and a Brier score near 0.3), and a clinician reads the
probability. Two maps, both fitted with scikit-learn on the **validation** films only and applied
unchanged to test and to ``physis predict``:

* ``platt`` (Platt 1999): p = 1 / (1 + exp(−(a · logit(score) + b))), a logistic regression on the
  score's logit with Platt's smoothed targets (N₊ + 1)/(N₊ + 2) and 1/(N₋ + 2), which keep the slope
  finite when validation separates the classes perfectly. Strictly increasing: no ranking and no
  AUROC changes (up to floating-point saturation at probabilities within 1e-16 of 0 or 1).
* ``isotonic`` (Zadrozny & Elkan 2002): the non-decreasing step function that fits validation best,
  linear between its knots and clipped to the end knots outside the validation range
  (``out_of_bounds="clip"``). No two films swap order, but films that land on one step become
  ties: AUROC then moves by half the share of positive-negative pairs newly tied, concordant ones
  down and discordant ones up (the model card shows test AUROC before and after).

A map that would erase or invert the ranking is not used: when validation shows no positive
association between score and label (Platt slope ≤ 0, or an isotonic fit that is one constant),
or validation has one class, the raw scores are kept and the calibrator says why. The fitted map
is stored as data (:meth:`Calibrator.to_dict`: Platt's a and b, isotonic's knots), not as a
pickled scikit-learn object, so ``physis predict`` applies it from JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from physis.io import write_json

METHODS = {"platt": "Platt scaling", "isotonic": "isotonic regression", "none": "none (raw scores)"}
#: Scores are clipped this far inside (0, 1) before the logit (a float32 sigmoid never gets closer to 1).
EPS = 1e-12
NO_ASSOCIATION = "validation shows no positive association between score and label"


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map: ``method`` with its ``params`` (platt: a, b; isotonic: knots x, y; none:
    the identity), how many validation films fitted it, and why the identity was used instead (``note``)."""

    method: str
    params: dict = field(default_factory=dict)
    n: int = 0
    n_positive: int = 0
    note: str = ""

    def __call__(self, score: ArrayLike) -> np.ndarray:
        """The calibrated probability of each score."""
        s = np.asarray(score, dtype=float)
        if self.method == "platt":
            return expit(self.params["a"] * logit(np.clip(s, EPS, 1 - EPS)) + self.params["b"])
        if self.method == "isotonic":
            return np.interp(s, self.params["x"], self.params["y"])  # = IsotonicRegression.predict, clipped
        return s

    def describe(self) -> str:
        """One line for tables, figures and ``physis predict``."""
        if self.method == "none":
            return f"raw scores, not calibrated: {self.note}" if self.note else "raw scores, not calibrated"
        return f"{METHODS[self.method]} fitted on {self.n} validation films ({self.n_positive} positive)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        return cls(**{key: data[key] for key in ("method", "params", "n", "n_positive", "note")})


def fit(y_true: ArrayLike, score: ArrayLike, method: str) -> Calibrator:
    """Fit ``method`` (platt, isotonic or none) to one split's labels and raw scores."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")
    y, s = np.asarray(y_true, dtype=int), np.asarray(score, dtype=float)
    n, positives = len(y), int(y.sum())
    if method == "none":
        return Calibrator("none", n=n, n_positive=positives, note="calibration is off (evaluate.calibration: none)")
    if positives in (0, n):
        return Calibrator("none", n=n, n_positive=positives,
                          note=f"{METHODS[method]} needs both classes on validation ({n} films, {positives} positive)")
    params = _platt(y, s) if method == "platt" else _isotonic(y, s)
    if (params["a"] <= 0) if method == "platt" else (len(set(params["y"])) < 2):
        return Calibrator("none", n=n, n_positive=positives, note=f"{NO_ASSOCIATION}: {METHODS[method]} would "
                          "erase the ranking, so the raw scores are kept")
    return Calibrator(method, params, n, positives)


def _platt(y: np.ndarray, s: np.ndarray) -> dict:
    """Platt's sigmoid on the logit: an unpenalised logistic regression on soft targets, written as two
    weighted copies of every film (a positive copy weighted t, a negative one weighted 1 − t)."""
    x = logit(np.clip(s, EPS, 1 - EPS))
    positives, negatives = y.sum(), len(y) - y.sum()
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    regression = LogisticRegression(C=np.inf).fit(
        np.r_[x, x][:, None], np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[target, 1 - target])
    return {"a": float(regression.coef_[0, 0]), "b": float(regression.intercept_[0])}


def _isotonic(y: np.ndarray, s: np.ndarray) -> dict:
    regression = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    return {"x": regression.X_thresholds_.tolist(), "y": regression.y_thresholds_.tolist()}


def fit_on_validation(scores: pd.DataFrame, method: str) -> Calibrator:
    """The calibrator of a scores table, fitted on its validation films only (test films are never read)."""
    val = scores[scores["split"] == "val"]
    return fit(val["y_true"], val["score"], method)


def calibrate(scores: pd.DataFrame, calibrator: Calibrator) -> pd.DataFrame:
    """``scores`` with ``score`` the calibrated probability and ``score_raw`` the model's own output."""
    return scores.assign(score_raw=scores["score"], score=calibrator(scores["score"]))


def save(calibrator: Calibrator, threshold: dict, path: str | Path) -> None:
    """Write ``calibration.json`` into a model folder: the calibrator's fields and the operating threshold
    (value, rule, note) chosen on the calibrated validation scores, both for ``physis predict``."""
    write_json({**calibrator.to_dict(), "fitted_on": "val", "threshold": threshold}, path)


def load(model_dir: str | Path) -> tuple[Calibrator, dict] | None:
    """The calibrator and operating threshold the evaluate stage saved in a model folder
    (``calibration.json``), or None when the model has not been evaluated yet."""
    path = Path(model_dir) / "calibration.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Calibrator.from_dict(data), data["threshold"]
