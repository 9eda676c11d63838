"""Metrics against scikit-learn on random data, edge cases, thresholds and the patient bootstrap."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from physis import metrics, stats


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    pred = (score >= 0.5).astype(int)
    weight = rng.integers(0, 4, 300).astype(float)
    return y, score, pred, weight


@pytest.mark.parametrize("weighted", [False, True])
def test_metrics_agree_with_sklearn(sample, weighted):
    y, score, pred, weight = sample
    w = weight if weighted else None
    got = metrics.compute(y, score, pred, sample_weight=w)
    assert list(got) == list(metrics.METRICS)
    expected = {
        "accuracy": skm.accuracy_score(y, pred, sample_weight=w),
        "kappa": skm.cohen_kappa_score(y, pred, sample_weight=w),
        "auroc": skm.roc_auc_score(y, score, sample_weight=w),
        "average_precision": skm.average_precision_score(y, score, sample_weight=w),
        "sensitivity": skm.recall_score(y, pred, sample_weight=w),
        "specificity": skm.recall_score(y, pred, pos_label=0, sample_weight=w),
        "ppv": skm.precision_score(y, pred, sample_weight=w),
        "npv": skm.precision_score(y, pred, pos_label=0, sample_weight=w),
        "f1": skm.f1_score(y, pred, sample_weight=w),
        "brier": skm.brier_score_loss(y, score, sample_weight=w),
    }
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name


def test_weights_equal_repeated_rows(sample):
    y, score, pred, weight = sample
    reps = weight.astype(int)
    weighted = metrics.compute(y, score, pred, sample_weight=weight)
    repeated = metrics.compute(np.repeat(y, reps), np.repeat(score, reps), np.repeat(pred, reps))
    assert weighted == pytest.approx(repeated)


def test_ece_against_calibration_curve(sample):
    y, score, _, _ = sample
    prob_true, prob_pred = calibration_curve(y, score, n_bins=10, strategy="uniform")
    counts = np.histogram(score, bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    reference = np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred))
    assert metrics.expected_calibration_error(y, score, 10) == pytest.approx(reference)
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert metrics.expected_calibration_error([0, 0], [0.95, 0.95]) == pytest.approx(0.95)


def test_one_class_gives_reasons_not_nan_table():
    y = np.zeros(20, int)
    score = np.linspace(0, 0.9, 20)
    frame = pd.DataFrame({"y_true": y, "score": score, "y_pred": (score >= 0.5).astype(int),
                          "patient_id": np.arange(20) // 2})
    rows = metrics.score_rows(frame, stats.cluster_weights(frame["patient_id"], 50, 0)).set_index("metric")
    for name in ("auroc", "average_precision", "kappa", "sensitivity", "f1"):
        assert np.isnan(rows.loc[name, "value"])
        assert rows.loc[name, "note"] == "undefined: no positives"
    for name in ("accuracy", "specificity", "brier", "ece", "ppv", "npv"):
        assert not np.isnan(rows.loc[name, "value"]), name
        assert rows.loc[name, "note"] == "", name
    assert rows.loc["accuracy", "value"] == pytest.approx((score < 0.5).mean())
    assert rows.loc["ppv", "value"] == 0.0


def test_no_predicted_positives_reason():
    got = metrics.compute([0, 1, 1], [0.1, 0.2, 0.3], [0, 0, 0])
    assert np.isnan(got["ppv"]) and got["sensitivity"] == 0 and got["f1"] == 0
    assert metrics.undefined_reason("ppv", {"predicted positives": 0}) == "no predicted positives"


def test_threshold_youden_and_sensitivity_target():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    assert metrics.choose_threshold(y, score, "youden") == pytest.approx(0.7)
    # sensitivity ≥ 1.0 needs the 0.4 positive: the highest such threshold is 0.4
    assert metrics.choose_threshold(y, score, "sensitivity", 1.0) == pytest.approx(0.4)
    assert metrics.choose_threshold(y, score, "sensitivity", 0.75) == pytest.approx(0.7)
    j = [(score[y == 1] >= t).mean() - (score[y == 0] >= t).mean() for t in score]
    assert max(j) == pytest.approx(0.75)


def test_threshold_on_one_class_split_names_the_split():
    with pytest.raises(metrics.MetricError, match="val split has only negative films"):
        metrics.choose_threshold([0, 0, 0], [0.1, 0.5, 0.7], split="val")
    with pytest.raises(metrics.MetricError, match="unknown threshold rule"):
        metrics.choose_threshold([0, 1], [0.1, 0.5], rule="magic")


def _clustered(patients: int, films: int, seed: int) -> pd.DataFrame:
    """Films of one patient share label and most of the score: strongly correlated data."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, patients)
    patient_score = 0.35 * label + 0.65 * rng.random(patients)
    frame = pd.DataFrame({"patient_id": np.repeat(np.arange(patients), films),
                          "y_true": np.repeat(label, films)})
    frame["score"] = np.clip(np.repeat(patient_score, films) + rng.normal(0, 0.02, len(frame)), 0, 1)
    frame["y_pred"] = (frame["score"] >= 0.5).astype(int)
    return frame


def test_patient_bootstrap_is_wider_than_image_bootstrap_on_correlated_films():
    frame = _clustered(patients=40, films=6, seed=1)
    names = ["auroc", "accuracy", "sensitivity"]
    patient = metrics.score_rows(frame, stats.cluster_weights(frame["patient_id"], 300, 7), names)
    image = metrics.score_rows(frame, stats.cluster_weights(frame.index, 300, 7), names)
    width_patient = patient["ci_high"] - patient["ci_low"]
    width_image = image["ci_high"] - image["ci_low"]
    assert (width_patient > 1.5 * width_image).all()
    assert (patient["value"] == image["value"]).all()
    assert (patient["ci_low"] <= patient["value"]).all() and (patient["value"] <= patient["ci_high"]).all()


def test_bootstrap_is_seeded():
    frame = _clustered(30, 3, seed=2)
    first = metrics.score_rows(frame, stats.cluster_weights(frame["patient_id"], 200, 11))
    again = metrics.score_rows(frame, stats.cluster_weights(frame["patient_id"], 200, 11))
    pd.testing.assert_frame_equal(first, again)


def test_rare_positives_withhold_ci():
    frame = _clustered(40, 2, seed=3)
    frame["y_true"] = 0
    frame.loc[frame["patient_id"] == 0, "y_true"] = 1  # one positive patient
    rows = metrics.score_rows(frame, stats.cluster_weights(frame["patient_id"], 200, 5), ["auroc", "accuracy"])
    auroc = rows.set_index("metric").loc["auroc"]
    assert not np.isnan(auroc["value"]) and np.isnan(auroc["ci_low"])
    assert auroc["skipped"] > 0 and "CI withheld" in auroc["note"]
    assert not np.isnan(rows.set_index("metric").loc["accuracy", "ci_low"])


def test_no_bootstrap_replicates_means_no_ci_and_says_so():
    frame = _clustered(10, 2, seed=4)
    rows = metrics.score_rows(frame, np.zeros((0, len(frame)), dtype=int), ["auroc", "accuracy"])
    assert rows["value"].notna().all() and rows["ci_low"].isna().all()
    assert (rows["note"] == "no bootstrap replicates").all()
