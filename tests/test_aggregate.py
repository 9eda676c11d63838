"""Leaderboard, pairwise comparisons and overview figures from synthetic per-model outputs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_evaluate import eval_config, synthetic_scores, uncalibrated
from test_stats import _brute_force_obuchowski

from physis import aggregate, evaluate, stats

OUTPUTS = {"leaderboard": "leaderboard.parquet", "csv": "leaderboard.csv", "html": "leaderboard.html",
           "comparisons": "comparisons.parquet", "comparisons_html": "comparisons.html",
           "decision_curve": "decision_curve.png",
           "roc_overlay": "roc_overlay.png", "forest": "forest.png", "thesis": "thesis.png", "cost": "cost.png"}
MODELS = {"custom_cnn": ("custom_cnn", 3.0, 1e8, 600.0), "weak": ("mobilenetv2", 0.3, 2e6, 60.0),
          "medium": ("resnet50", 1.2, 2e7, 300.0)}


@pytest.fixture(scope="module")
def model_outputs(tmp_path_factory):
    """Evaluated outputs of three models of different strength on the same films."""
    folder = tmp_path_factory.mktemp("models")
    cfg = eval_config()
    paths = {"metrics": [], "predictions": [], "summaries": []}
    for model, (plugin, strength, params, seconds) in MODELS.items():
        scores = synthetic_scores(patients=40, seed=0, strength=strength)
        scores["score"] = np.clip(scores["score"] + np.random.default_rng(len(model)).normal(0, 0.05, len(scores)),
                                  0, 1)
        evaluation = evaluate.evaluate_scores(scores, cfg, model)
        for key, frame in (("metrics", evaluation.table), ("predictions", evaluation.predictions)):
            path = folder / key / f"{model}.parquet"
            path.parent.mkdir(exist_ok=True)
            frame.to_parquet(path)
            paths[key].append(str(path))
        summary = folder / model / "train_summary.json"
        summary.parent.mkdir()
        summary.write_text(json.dumps({"model": model, "plugin": plugin, "kind": "classifier", "framework": "keras",
                                       "train_seconds": seconds, "params": params, "epochs_run": 3, "best_epoch": 2}))
        paths["summaries"].append(str(summary))
    return paths


def _run(model_outputs, tmp_path, unavailable=None):
    outputs = {key: str(tmp_path / name) for key, name in OUTPUTS.items()}
    board = aggregate.aggregate(model_outputs["metrics"], model_outputs["predictions"], model_outputs["summaries"],
                                outputs, unavailable or {}, eval_config())
    return board, outputs


def test_leaderboard_ranks_lists_unavailable_and_labels_thesis(model_outputs, tmp_path):
    board, outputs = _run(model_outputs, tmp_path, {"azure_custom_vision": "no Azure credentials"})
    assert list(board["model"]) == ["custom_cnn", "medium", "weak", "azure_custom_vision"]
    # only a model that learned is ranked; "medium" ranks on test but not on its small validation split
    assert list(board["verdict"]) == ["learned", "no evidence of learning", "no evidence of learning",
                                      "not configured"]
    assert list(board["rank"].astype(object)) == [1, pd.NA, pd.NA, pd.NA]
    azure = board.set_index("model").loc["azure_custom_vision"]
    assert azure["status"] == "not configured" and azure["reason"] == "no Azure credentials"
    assert np.isnan(azure["auroc"]) and azure["thesis_accuracy"] == 0.737
    cnn = board.set_index("model").loc["custom_cnn"]
    assert cnn["thesis_model"] == "Custom CNN" and cnn["thesis_accuracy"] == 0.746
    assert board.set_index("model").loc["weak", "thesis_model"] == "MobileNetV2"  # matched by plugin name
    assert cnn["auroc_ci_low"] <= cnn["auroc"] <= cnn["auroc_ci_high"]
    assert cnn["train_seconds"] == 600.0 and cnn["params"] == 1e8 and cnn["n_test"] == 40
    assert {"auroc", "accuracy_ci_low", "kappa_ci_high", "threshold", "thesis_accuracy", "brier_raw_ci_low",
            "ece_raw"} <= set(board.columns)
    assert cnn["brier_raw_ci_low"] <= cnn["brier_raw"] <= cnn["brier_raw_ci_high"]
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["leaderboard"]), board)
    assert len(pd.read_csv(outputs["csv"])) == 4
    html = open(outputs["html"], encoding="utf-8").read()
    assert "not configured" in html and "no Azure credentials" in html and "different data set" in html
    assert "no evidence of learning: val AUROC" in html and "Hint: no validation AUROC was recorded" in html
    assert "74.6% (Custom CNN)" in html and "Brier score, raw (95% CI)" in html and "ECE, calibrated (95% CI)" in html
    for key in ("roc_overlay", "forest", "thesis", "cost", "decision_curve"):
        assert open(outputs[key], "rb").read(4) == b"\x89PNG"


def test_comparisons_are_clustered_by_patient_and_holm_corrected_per_family(model_outputs):
    predictions = {path.split("/")[-1][:-8]: pd.read_parquet(path) for path in model_outputs["predictions"]}
    table = aggregate.comparisons(predictions)
    assert len(table) == 3 and set(zip(table["model_a"], table["model_b"])) == {
        ("custom_cnn", "medium"), ("custom_cnn", "weak"), ("medium", "weak")}
    row = table.set_index(["model_a", "model_b"]).loc[("custom_cnn", "weak")]
    a = predictions["custom_cnn"][predictions["custom_cnn"]["split"] == "test"]
    b = predictions["weak"].set_index("image_id").loc[a["image_id"]]
    y, patients = a["y_true"].to_numpy(), a["patient_id"].to_numpy()
    assert row["n"] == len(a) and row["n_patients"] == 20  # two views of each of 20 test patients
    assert (row["auroc_a"], row["auroc_b"]) == pytest.approx((roc_auc_score(y, a["score"]),
                                                              roc_auc_score(y, b["score"])))
    auc_a, auc_b, variance = _brute_force_obuchowski(y, a["score"], b["score"], patients)
    assert row["delong_z"] == pytest.approx((auc_a - auc_b) / np.sqrt(variance))
    per_film = stats.delong_test(y, a["score"], b["score"], np.arange(len(a))).z
    assert row["delong_z"] != pytest.approx(per_film)  # the patients, not the films, are the units
    discordance = (pd.Series((a["y_pred"].to_numpy() == y).astype(int) - (b["y_pred"].to_numpy() == y), index=patients)
                   .groupby(level=0).sum())
    expected_chi2 = 19 / 20 * discordance.sum() ** 2 / (discordance**2).sum()
    assert row["mcnemar_chi2"] == pytest.approx(expected_chi2)
    assert row["mcnemar_p"] == pytest.approx(math.erfc(math.sqrt(expected_chi2 / 2)))
    for family in ("delong", "mcnemar"):  # Holm within each family, not across both
        assert table[f"{family}_p_holm"].to_numpy() == pytest.approx(stats.holm(table[f"{family}_p"]))


def test_comparisons_use_only_common_films_and_explain_failures():
    scores = uncalibrated(synthetic_scores(patients=12))
    a = evaluate.predictions_table(scores, evaluate.Threshold(0.5, "youden"))
    b = a.iloc[: len(a) // 2].copy()
    one_class = a.assign(y_true=0)
    table = aggregate.comparisons({"a": a, "b": b})
    assert table["n"].item() == (b["split"] == "test").sum()
    broken = aggregate.comparisons({"a": one_class, "c": one_class})
    assert broken["note"].item().startswith("DeLong not computable") and np.isnan(broken["delong_p"].item())


def test_aggregate_with_no_evaluated_model(tmp_path):
    board, outputs = _run({"metrics": [], "predictions": [], "summaries": []}, tmp_path,
                          {"azure_custom_vision": "no credentials"})
    assert list(board["status"]) == ["not configured"]
    assert open(outputs["roc_overlay"], "rb").read(4) == b"\x89PNG"
