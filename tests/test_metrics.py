"""Metrics against scikit-learn on random data, edge cases, thresholds and the patient bootstrap."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from physis import figures, metrics, stats


@pytest.fixture
def sample():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    pred = (score >= 0.5).astype(int)
    weight = rng.integers(0, 4, 300).astype(float)
    return y, score, pred, weight


def _by_definition(y, score, pred, w):
    """AUROC, average precision, Cohen's κ and Brier score from their definitions (weighted), not from
    the scikit-learn calls :func:`physis.metrics.compute` makes."""
    pos, neg = y == 1, y == 0
    greater = (score[pos][:, None] > score[neg][None, :]) + 0.5 * (score[pos][:, None] == score[neg][None, :])
    auroc = w[pos] @ greater @ w[neg] / (w[pos].sum() * w[neg].sum())
    ap, recall_before = 0.0, 0.0  # Σ (R_k − R_{k−1}) · P_k over the thresholds, highest first
    for t in np.unique(score)[::-1]:
        called = score >= t
        tp, fp = w[called & pos].sum(), w[called & neg].sum()
        recall = tp / w[pos].sum()
        if recall > recall_before:
            ap += (recall - recall_before) * tp / (tp + fp)
            recall_before = recall
    table = np.array([[w[(y == i) & (pred == j)].sum() for j in (0, 1)] for i in (0, 1)]) / w.sum()
    chance = table.sum(axis=1) @ table.sum(axis=0)
    kappa = (np.trace(table) - chance) / (1 - chance)
    return {"auroc": auroc, "average_precision": ap, "kappa": kappa,
            "brier": np.sum(w * (score - y) ** 2) / w.sum()}


@pytest.mark.parametrize("weighted", [False, True])
def test_metrics_agree_with_definitions_and_sklearn(sample, weighted):
    y, score, pred, weight = sample
    w = weight if weighted else None
    got = metrics.compute(y, score, pred, sample_weight=w)
    assert list(got) == list(metrics.METRICS)
    expected = {  # the confusion-matrix ratios are bincounts in physis: scikit-learn's functions check them
        "accuracy": skm.accuracy_score(y, pred, sample_weight=w),
        "sensitivity": skm.recall_score(y, pred, sample_weight=w),
        "specificity": skm.recall_score(y, pred, pos_label=0, sample_weight=w),
        "ppv": skm.precision_score(y, pred, sample_weight=w),
        "npv": skm.precision_score(y, pred, pos_label=0, sample_weight=w),
        "f1": skm.f1_score(y, pred, sample_weight=w),
        **_by_definition(y, score, pred, np.ones(len(y)) if w is None else w),
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
    # random scores never sit on a bin edge, where scikit-learn closes its bins on the other side
    y, score, _, _ = sample
    prob_true, prob_pred = calibration_curve(y, score, n_bins=10, strategy="uniform")
    counts = np.histogram(score, bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    reference = np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred))
    assert metrics.expected_calibration_error(y, score, 10) == pytest.approx(reference)
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert metrics.expected_calibration_error([0, 0], [0.95, 0.95]) == pytest.approx(0.95)


def test_calibration_bins_on_their_edges():
    scores = [0.0, 0.1, 0.29999, 0.3, 0.7, 0.99, 1.0]
    assert list(metrics.calibration_bins(scores, 10)) == [0, 1, 2, 3, 7, 9, 9]  # [k/10, (k+1)/10), 1.0 in the last
    assert metrics.calibration_bins([1 / 49], 49).item() == 1  # floor(1/49 · 49) would say 0
    # np.histogram (the diagram's score histogram) counts the same bins
    assert list(np.histogram(scores, metrics.calibration_edges(10))[0]) == list(np.bincount(
        metrics.calibration_bins(scores, 10), minlength=10))


# scores on the edges 0.0, 0.3 and 1.0. Bins: 0 = {0.0: y 0}; 3 = {0.3: 1, 0.3: 1, 0.39: 0}; 9 = {0.95: 0, 1.0: 1}.
EDGE_Y, EDGE_SCORES = np.array([0, 1, 1, 0, 0, 1]), np.array([0.0, 0.3, 0.3, 0.39, 0.95, 1.0])
# mean score / observed per bin: 0 / 0, 0.33 / 2/3, 0.975 / 1/2;
# ECE = (1·0 + 3·|2/3 − 0.33| + 2·|1/2 − 0.975|) / 6
EDGE_POINTS = [(0.0, 0.0), (0.33, 2 / 3), (0.975, 0.5)]
EDGE_ECE = (3 * (2 / 3 - 0.33) + 2 * 0.475) / 6


def test_ece_with_scores_on_bin_edges_by_hand():
    assert metrics.expected_calibration_error(EDGE_Y, EDGE_SCORES, 10) == pytest.approx(EDGE_ECE)
    films, predicted, observed = metrics.reliability(EDGE_Y, EDGE_SCORES, 10)
    assert list(films) == [1, 0, 0, 3, 0, 0, 0, 0, 0, 2]
    np.testing.assert_allclose(np.column_stack([predicted, observed])[films > 0], EDGE_POINTS)


def test_reliability_diagram_draws_the_ece_bins(monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, path: drawn.setdefault("fig", fig))
    figures.calibration_figure(EDGE_Y, EDGE_SCORES, 10, tmp_path / "c.png", "title", "note")
    top, bottom = drawn["fig"].axes
    model = next(line for line in top.get_lines() if line.get_label().startswith("model"))
    np.testing.assert_allclose(np.column_stack([model.get_xdata(), model.get_ydata()]), EDGE_POINTS)
    heights = [patch.get_height() for patch in bottom.patches]  # two stacked series of ten bins
    assert list(np.add(heights[:10], heights[10:])) == [1, 0, 0, 3, 0, 0, 0, 0, 0, 2]
    plt.close(drawn["fig"])


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
    # at 0.7: sensitivity 3/4, specificity 1
    assert metrics.max_youden_j(y, score) == pytest.approx(0.75)
    inverted = 1 - score  # every threshold does no better than chance: J ≤ 0, and J = 0 calling nothing positive
    assert metrics.max_youden_j(y, inverted) == 0.0
    assert metrics.choose_threshold(y, inverted, "youden") == 1.0


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


def test_bootstrap_counts_a_patient_drawn_twice_twice():
    # patients with 1–6 films and patient-level scores: a replicate's AUROC depends on how often each
    # patient was drawn, not only on which patients were
    rng = np.random.default_rng(5)
    films = rng.integers(1, 7, 30)
    label, level = rng.integers(0, 2, 30), rng.random(30)
    frame = pd.DataFrame({"patient_id": np.repeat(np.arange(30), films), "y_true": np.repeat(label, films),
                          "score": np.repeat(0.4 * label + 0.6 * level, films)})
    frame["score"] += rng.normal(0, 0.01, len(frame))
    frame["y_pred"] = (frame["score"] >= 0.5).astype(int)
    weights = stats.cluster_weights(frame["patient_id"], 300, 3)
    rows = metrics.score_rows(frame, weights, ["auroc", "accuracy"]).set_index("metric")

    def naive(keep_duplicates: bool) -> dict[str, np.ndarray]:
        """The percentile CI from replicates built as tables: each drawn film copied once per draw."""
        estimates = {"auroc": [], "accuracy": []}
        for w in weights:
            copies = w if keep_duplicates else np.minimum(w, 1)
            sample = frame.loc[np.repeat(frame.index, copies)]
            estimates["auroc"].append(skm.roc_auc_score(sample["y_true"], sample["score"]))
            estimates["accuracy"].append((sample["y_true"] == sample["y_pred"]).mean())
        return {name: np.percentile(values, [2.5, 97.5]) for name, values in estimates.items()}

    resampled, deduplicated = naive(True), naive(False)
    for name in ("auroc", "accuracy"):
        assert rows.loc[name, ["ci_low", "ci_high"]].to_numpy(float) == pytest.approx(resampled[name], abs=1e-12)
    # the data tell the two apart: a bootstrap that dropped the multiplicities would fail the check above
    assert np.abs(resampled["auroc"] - deduplicated["auroc"]).max() > 0.01


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


def test_net_benefit_against_a_hand_computed_case():
    """Five films, two fractures (Vickers & Elkin 2006: NB = TP/n − FP/n · p_t / (1 − p_t))."""
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    # p_t = 0.3: films 0.9, 0.4, 0.6 treated, TP 2, FP 1: 2/5 − 1/5 · 3/7; p_t = 0.5: 0.9, 0.6: 1/5 − 1/5 · 1
    assert metrics.net_benefit(y, p, [0.3, 0.5]) == pytest.approx([0.4 - 0.2 * 3 / 7, 0.0])
    assert metrics.net_benefit(y, np.ones(5), [0.3]) == pytest.approx([0.4 - 0.6 * 3 / 7])  # treat all
    # a patient drawn twice counts twice: weights 2, 1, 1, 1, 1 → n = 6; p_t = 0.5: TP 2, FP 1
    assert metrics.net_benefit(y, p, [0.5], [2, 1, 1, 1, 1]) == pytest.approx([2 / 6 - 1 / 6])
    curve = metrics.decision_curve(y, p, np.zeros((0, 5), dtype=int))
    assert curve.thresholds[[0, -1]] == pytest.approx([0.01, 0.99]) and np.isnan(curve.low).all()
    assert curve.treat_all[0] == pytest.approx(0.4 - 0.6 * 0.01 / 0.99)
    perfect = metrics.decision_curve(y, y.astype(float), np.zeros((0, 5), dtype=int))
    assert perfect.model == pytest.approx(np.full(99, 0.4))  # a perfect model: the prevalence at every threshold


def test_decision_curve_band_from_the_patient_bootstrap(sample):
    y, score, _, _ = sample
    weights = stats.cluster_weights(np.arange(len(y)) // 2, 200, 0)
    curve = metrics.decision_curve(y, score, weights)
    inside = (curve.low <= curve.model + 1e-12) & (curve.model <= curve.high + 1e-12)
    assert inside.mean() > 0.9 and (curve.high - curve.low > 0).all()
