"""Post-hoc calibration: fitted on validation only, AUROC kept (Platt) or moved only by ties (isotonic), saved as
data that `physis predict` applies."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import logit
from sklearn.calibration import _sigmoid_calibration
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from test_evaluate import eval_config, synthetic_scores

from physis import calibration, evaluate, inference


def overconfident(patients: int = 120, seed: int = 0) -> pd.DataFrame:
    """The phantom's heatmap_cnn in miniature: ranks almost perfectly, but every score lies in 0.95-1."""
    scores = synthetic_scores(patients=patients, seed=seed, strength=4.0)
    return scores.assign(score=0.95 + 0.05 * scores["score"])


def auroc_change_by_ties(y, before, after) -> float:
    """What a non-decreasing map's new ties do to AUROC: ½ · (discordant − concordant positive-negative pairs
    that were distinct before and tied after) / (positives · negatives)."""
    pos, neg = y == 1, y == 0
    newly_tied = (after[pos][:, None] == after[neg][None, :]) & (before[pos][:, None] != before[neg][None, :])
    concordant = before[pos][:, None] > before[neg][None, :]
    return 0.5 * ((newly_tied & ~concordant).sum() - (newly_tied & concordant).sum()) / (pos.sum() * neg.sum())


@pytest.mark.parametrize("seed", range(4))
def test_platt_never_changes_auroc_and_isotonic_only_by_its_ties(seed):
    scores = overconfident(seed=seed) if seed % 2 else synthetic_scores(patients=80, seed=seed, strength=1.0)
    for method in ("platt", "isotonic"):
        calibrator = calibration.fit_on_validation(scores, method)
        assert calibrator.method == method
        for split in ("val", "test"):
            films = scores[scores["split"] == split]
            y, raw = films["y_true"].to_numpy(), films["score"].to_numpy()
            calibrated = calibrator(raw)
            order = np.argsort(raw, kind="stable")
            assert (np.diff(calibrated[order]) >= 0).all()  # no two films ever swap order
            before, after = roc_auc_score(y, raw), roc_auc_score(y, calibrated)
            if method == "platt":
                assert after == before  # strictly increasing: the very same ranking, ties included
                assert len(np.unique(calibrated)) == len(np.unique(raw))
            else:
                assert after - before == pytest.approx(auroc_change_by_ties(y, raw, calibrated), abs=1e-12)


def test_calibration_never_sees_test_labels_or_scores():
    scores = overconfident()
    test = scores["split"] == "test"
    rng = np.random.default_rng(1)
    scrambled = scores.assign(y_true=np.where(test, rng.permutation(scores["y_true"]), scores["y_true"]),
                              score=np.where(test, rng.random(len(scores)), scores["score"]))
    for method in ("platt", "isotonic"):
        assert calibration.fit_on_validation(scrambled, method) == calibration.fit_on_validation(scores, method)
    cfg = eval_config(bootstrap=0)  # no CIs needed here
    a, b = evaluate.evaluate_scores(scores, cfg, "toy"), evaluate.evaluate_scores(scrambled, cfg, "toy")
    assert a.calibrator == b.calibrator and a.threshold == b.threshold  # both chosen on validation alone


def test_calibration_repairs_an_overconfident_model_on_test():
    scores = overconfident()
    table = evaluate.evaluate_scores(scores, eval_config(bootstrap=0), "toy").table
    test = table.query("split == 'test' and group == 'overall'").set_index("metric")["value"]
    assert test["brier_raw"] > 0.3 and test["ece_raw"] > 0.3  # the phantom's heatmap_cnn: Brier 0.27, ECE 0.41
    assert test["brier"] < test["brier_raw"] / 3 and test["ece"] < test["ece_raw"] / 3
    assert test["auroc"] > 0.95


def test_platt_is_platts_algorithm_and_isotonic_is_scikit_learns():
    """The fitted maps against scikit-learn's own Platt fit (its private ``_sigmoid_calibration``, same smoothed
    targets, another optimiser) and its IsotonicRegression.predict, including scores outside the validation range."""
    val = overconfident().query("split == 'val'")
    y, s = val["y_true"].to_numpy(), val["score"].to_numpy()
    platt = calibration.fit(y, s, "platt")
    a, b = _sigmoid_calibration(logit(s), y)  # p = 1 / (1 + exp(a·f + b))
    assert (platt.params["a"], platt.params["b"]) == pytest.approx((-a, -b), rel=1e-3)
    grid = np.r_[0.0, 0.5, np.linspace(0.94, 1.0, 61)]
    isotonic = calibration.fit(y, s, "isotonic")
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    assert isotonic(grid) == pytest.approx(reference.predict(grid), abs=1e-12)
    assert brier_score_loss(y, platt(s)) < brier_score_loss(y, s)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_no_calibration_where_it_would_erase_the_ranking(method):
    y = np.array([0, 0, 1, 1, 0, 1])
    inverted = calibration.fit(y, np.array([0.9, 0.8, 0.2, 0.1, 0.7, 0.3]), method)
    assert inverted.method == "none" and inverted.note.startswith(calibration.NO_ASSOCIATION)
    one_class = calibration.fit(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), method)
    assert one_class.method == "none" and "needs both classes on validation (4 films, 0 positive)" in one_class.note
    assert (one_class([0.2, 0.97]) == [0.2, 0.97]).all()  # the identity
    assert "not calibrated" in one_class.describe()


def test_saved_calibrator_is_what_physis_predict_applies(tmp_path, monkeypatch):
    """Through inference.Predictor.calibration, which ``physis predict`` applies too (on a trained model:
    tests/test_predict_cli.py)."""
    scores = overconfident()
    evaluation = evaluate.evaluate_scores(scores, eval_config(bootstrap=0), "toy")
    calibration.save(evaluation.calibrator, {"value": evaluation.threshold.value, "rule": "youden", "note": ""},
                     tmp_path / "calibration.json")
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["method"] == "platt" and set(saved["params"]) == {"a", "b"} and saved["fitted_on"] == "val"
    monkeypatch.setattr(inference, "predict_file", lambda path, model_dir: 0.985)
    result = inference.predict_probability("film.png", tmp_path)
    expected = float(evaluation.calibrator([0.985])[0])
    assert result.probability == pytest.approx(expected) and result.raw == 0.985
    assert result.calibrated is True and result.calibration.startswith("Platt scaling fitted on 120")
    assert result.threshold["value"] == evaluation.threshold.value
    (tmp_path / "calibration.json").unlink()  # trained, not yet evaluated: the raw score, said to be uncalibrated
    result = inference.predict_probability("film.png", tmp_path)
    assert (result.probability, result.calibrated, result.threshold) == (0.985, False, None)
    assert "not calibrated" in result.calibration


def test_predict_refuses_an_ensemble_folder(tmp_path):
    (tmp_path / "ensemble.json").write_text(json.dumps({"model": "duo", "members": ["a", "b"]}))
    with pytest.raises(ValueError, match="an ensemble of a, b, which has no network of its own"):
        inference.load_trained(tmp_path)
