"""The evaluate stage on synthetic scores: calibration, threshold, predictions, metric table, figures, model card,
gallery."""

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from physis import aggregate, calibration, config, evaluate, metrics, model_card, verdict

FIGURES = ["roc", "pr", "calibration", "decision_curve", "confusion", "subgroups"]


def synthetic_scores(patients: int = 40, seed: int = 0, strength: float = 2.0) -> pd.DataFrame:
    """A scores table as ``physis.inference.predict_frame`` writes it: two views per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = int(rng.random() < 0.4)
        sh_type = rng.choice([1, 2, 2, 3]) if label else pd.NA
        age, sex, base = rng.uniform(2, 18), rng.choice(["F", "M"]), rng.normal(strength * label, 1)
        for view in ("ap", "lat"):
            rows.append({"image_id": f"{p:04d}_{view}", "patient_id": f"{p:04d}", "split": ("val", "test")[p % 2],
                         "y_true": label, "score": float(1 / (1 + np.exp(-(base + rng.normal(0, 0.3))))),
                         "sh_type": sh_type, "age": age, "sex": sex, "view": view})
    frame = pd.DataFrame(rows)
    frame["sh_type"] = frame["sh_type"].astype("Int64")
    return frame


def uncalibrated(scores: pd.DataFrame) -> pd.DataFrame:
    """A scores table as the evaluate stage passes it on when calibration is off (``score_raw`` = ``score``)."""
    return calibration.calibrate(scores, calibration.Calibrator("none"))


def eval_config(**changes) -> dict:
    cfg = config.load(overrides={"evaluate": {"bootstrap": 60, "min_positive_patients": 3, **changes}})
    return cfg["evaluate"]


def output_paths(folder) -> dict[str, str]:
    names = {"predictions": "predictions.parquet", "metrics": "metrics.parquet", "metrics_html": "metrics.html",
             "subgroups_html": "subgroups.html", "curves": "training.png", "card": "model_card.html",
             "calibrator": "calibration.json"}
    names.update({name: f"{name}.png" for name in FIGURES})
    return {key: str(folder / name) for key, name in names.items()}


def test_threshold_on_validation_applied_to_test():
    scores = uncalibrated(synthetic_scores())
    cfg = eval_config()
    threshold = evaluate.pick_threshold(scores, cfg)
    val = scores[scores["split"] == "val"]
    y, s = val["y_true"].to_numpy(), val["score"].to_numpy()
    candidates = np.unique(s)[::-1]  # every validation score, highest first: the first best J wins
    youden = [(s[y == 1] >= t).mean() - (s[y == 0] >= t).mean() for t in candidates]
    assert threshold.value == candidates[int(np.argmax(youden))]
    assert threshold.rule == "youden" and threshold.note == ""
    predictions = evaluate.predictions_table(scores, threshold)
    assert list(predictions.columns) == evaluate.PREDICTION_COLUMNS
    assert (predictions["y_pred"] == (predictions["score"] >= threshold.value)).all()
    moved = scores.assign(score=np.where(scores["split"] == "test", 0.0, scores["score"]))
    assert evaluate.pick_threshold(moved, cfg).value == threshold.value  # test films never move it


def test_sensitivity_target_rule():
    scores = synthetic_scores()
    threshold = evaluate.pick_threshold(scores, eval_config(threshold={"rule": "sensitivity",
                                                                       "target_sensitivity": 1.0}))
    val = scores[scores["split"] == "val"]
    assert (val.loc[val["y_true"] == 1, "score"] >= threshold.value).all()


def test_one_class_validation_falls_back_with_a_message(caplog):
    scores = synthetic_scores()
    scores.loc[scores["split"] == "val", "y_true"] = 0
    threshold = evaluate.pick_threshold(scores, eval_config())
    assert threshold.value == 0.5 and threshold.rule == "fallback"
    assert "val split has only negative films" in threshold.note
    assert "val split has only negative films" in caplog.text


def test_no_skill_on_validation_keeps_the_threshold_and_says_so_up_to_the_leaderboard(caplog):
    scores = uncalibrated(synthetic_scores())
    val = scores["split"] == "val"
    scores.loc[val, "score"] = np.where(scores.loc[val, "y_true"] == 1, 0.2, 0.8)  # every fracture ranked last
    cfg = eval_config()
    threshold = evaluate.pick_threshold(scores, cfg)
    assert threshold.value == 1.0 and threshold.rule == "youden"  # Youden's J is 0 only calling nothing positive
    assert threshold.note.startswith("no validation threshold beats chance (Youden's J ≤ 0)")
    assert "beats chance" in caplog.text
    table = evaluate.metric_table(evaluate.predictions_table(scores, threshold), threshold, cfg, "toy")
    board = aggregate.leaderboard([table], {"toy": {}}, {}, {}, {"toy": verdict.Verdict(verdict.NO_EVIDENCE, "")})
    assert board["threshold_note"].item() == threshold.note
    sensitivity_rule = eval_config(threshold={"rule": "sensitivity", "target_sensitivity": 0.9})
    assert "beats chance" in evaluate.pick_threshold(scores, sensitivity_rule).note
    assert evaluate.pick_threshold(synthetic_scores(), cfg).note == ""  # a model with skill: no note


def test_predictions_need_the_contract_columns():
    with pytest.raises(evaluate.EvaluateError, match="sh_type"):
        evaluate.predictions_table(uncalibrated(synthetic_scores()).drop(columns=["sh_type"]),
                                   evaluate.Threshold(0.5, "youden"))


def test_metric_table_rows_and_consistency():
    scores = synthetic_scores()
    cfg = eval_config()
    evaluation = evaluate.evaluate_scores(scores, cfg, "toy")
    predictions, table, threshold = evaluation.predictions, evaluation.table, evaluation.threshold
    assert evaluation.calibrator.method == "platt"
    assert list(table.columns) == evaluate.METRIC_COLUMNS and (table["model"] == "toy").all()
    overall = table[table["group"] == "overall"]
    for split in ("val", "test"):
        got = overall[(overall["split"] == split) & (overall["metric"] != "threshold")].set_index("metric")
        assert list(got.index) == list(metrics.METRICS) + ["brier_raw", "ece_raw"]
        films = predictions[predictions["split"] == split]
        y, s, p = films["y_true"].to_numpy(), films["score"].to_numpy(), films["y_pred"].to_numpy()
        raw = scores.loc[scores["split"] == split, "score"].to_numpy()
        assert (films["score_raw"].to_numpy() == raw).all() and (s == evaluation.calibrator(raw)).all()
        expected = {"accuracy": (y == p).mean(), "sensitivity": p[y == 1].mean(), "specificity": 1 - p[y == 0].mean(),
                    "auroc": sps.mannwhitneyu(s[y == 1], s[y == 0]).statistic / ((y == 1).sum() * (y == 0).sum()),
                    "brier": np.mean((s - y) ** 2), "brier_raw": np.mean((raw - y) ** 2),
                    "ece_raw": metrics.expected_calibration_error(y, raw, cfg["ece_bins"])}
        assert got.loc[list(expected), "value"].to_dict() == pytest.approx(expected)
        assert (got["n"] == len(films)).all() and (got["n_patients"] == films["patient_id"].nunique()).all()
        assert (got["ci_low"] <= got["value"] + 1e-12).all() and (got["value"] <= got["ci_high"] + 1e-12).all()
    assert overall.loc[overall["metric"] == "threshold", "value"].item() == threshold.value
    sh = table[table["group"] == "sh_type"]
    assert list(sh["subgroup"]) == ["SH I", "SH II", "SH III", "SH IV"] and set(sh["metric"]) == {"sensitivity"}
    assert sh.set_index("subgroup").loc["SH IV", "note"].startswith("too rare: 0 positive patient")
    assert list(table.loc[table["group"] == "age", "subgroup"].unique()) == sorted(
        table.loc[table["group"] == "age", "subgroup"].unique(), key=lambda band: float(band.split("–")[0]))
    assert set(table.loc[table["group"] == "view", "subgroup"]) == {"ap", "lat"}
    again = evaluate.metric_table(predictions, threshold, cfg, "toy")
    pd.testing.assert_frame_equal(table, again)  # seeded


def test_age_bands():
    bands = evaluate.age_bands(pd.Series([0.5, 6.0, 13.9, 19.5, np.nan]), [0, 6, 10, 14, 20])
    assert list(bands) == ["0–6 y", "6–10 y", "10–14 y", "14–20 y", "unknown"]


def test_evaluate_model_writes_everything(tmp_path):
    scores_path = tmp_path / "scores.parquet"
    synthetic_scores().to_parquet(scores_path)
    outputs = output_paths(tmp_path)
    evaluation = evaluate.evaluate_model(scores_path, outputs, eval_config(), "toy")
    for name in FIGURES:
        assert open(outputs[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
    html = open(outputs["metrics_html"], encoding="utf-8").read()
    assert "Cohen's κ" in html and "Threshold" in html and "patients" in html
    assert "Brier score before calibration" in html and "Platt scaling fitted on 40 validation films" in html
    assert "Salter-Harris" in open(outputs["subgroups_html"], encoding="utf-8").read()
    predictions = pd.read_parquet(outputs["predictions"])
    assert list(predictions.columns) == evaluate.PREDICTION_COLUMNS
    saved, threshold = calibration.load(tmp_path)  # the folder physis predict reads
    assert saved == evaluation.calibrator and threshold == {"value": evaluation.threshold.value, "rule": "youden",
                                                            "note": ""}


def test_one_class_test_split_is_a_message_not_a_crash(tmp_path, caplog):
    scores = synthetic_scores()
    scores.loc[scores["split"] == "test", "y_true"] = 0
    scores.loc[scores["split"] == "test", "sh_type"] = pd.NA
    scores_path = tmp_path / "scores.parquet"
    scores.to_parquet(scores_path)
    outputs = output_paths(tmp_path)
    table = evaluate.evaluate_model(scores_path, outputs, eval_config(), "toy").table
    test = table[(table["split"] == "test") & (table["group"] == "overall")].set_index("metric")
    assert np.isnan(test.loc["auroc", "value"]) and test.loc["auroc", "note"] == "undefined: no positives"
    assert test["value"].notna().sum() >= 5  # accuracy, specificity, Brier, ECE, NPV/PPV still reported
    assert "the test split has only class 0" in caplog.text
    assert all(open(outputs[name], "rb").read(4) == b"\x89PNG" for name in FIGURES)


DATA_SUMMARY = {"splits": {"train": {"images": 140, "patients": 70, "positives": 50},
                           "val": {"images": 40, "patients": 20, "positives": 16},
                           "test": {"images": 40, "patients": 20, "positives": 14}}}


def card_inputs(tmp_path, summary: dict, phantom: bool = True):
    """(summary path, data summary path, evaluation, outputs, context) for :func:`model_card.training_report`."""
    model_dir = tmp_path / summary["model"]
    model_dir.mkdir()
    name = "ensemble.json" if summary.get("kind") == "ensemble" else "train_summary.json"
    (model_dir / name).write_text(json.dumps(summary))
    (tmp_path / "data_summary.json").write_text(json.dumps(DATA_SUMMARY))
    cfg = config.load(overrides={"evaluate": {"bootstrap": 60}, "dataset": {"phantom": {"enabled": phantom}}})
    evaluation = evaluate.evaluate_scores(synthetic_scores(), cfg["evaluate"], summary["model"])
    return model_dir / name, tmp_path / "data_summary.json", evaluation, output_paths(tmp_path), cfg


def test_model_card_has_the_sections_of_mitchell_et_al(tmp_path):
    device = {"type": "GPU", "name": "NVIDIA H200", "count": 1, "mixed_precision": True,
              "label": "1 × NVIDIA H200 (mixed precision)"}
    summary_path, data_path, evaluation, outputs, cfg = card_inputs(tmp_path, {
        "model": "toy", "plugin": "custom_cnn", "kind": "classifier", "framework": "keras", "train_seconds": 750.0,
        "params": 1234, "epochs_run": 3, "best_epoch": 2, "input_shape": [64, 32, 1], "device": device})
    model_dir = summary_path.parent
    (model_dir / "params.json").write_text(json.dumps({"model": "toy", "params": {"epochs": 3, "lr": 0.001}}))
    (model_dir / "recipe.json").write_text(json.dumps({"preset": "p", "params": {"resize": {"height": 64}}}))
    pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.7, 0.6, 0.5], "val_loss": [0.7, 0.65, 0.66],
                  "auroc": [0.5, 0.6, 0.7], "val_auroc": [0.5, 0.62, 0.6], "accuracy": [0.5, 0.6, 0.7],
                  "val_accuracy": [0.5, 0.6, 0.6]}).to_parquet(model_dir / "history.parquet")
    model_card.training_report(summary_path, data_path, evaluation, outputs, cfg, "toy")
    assert open(outputs["curves"], "rb").read(4) == b"\x89PNG"
    card = pd.read_html(outputs["card"], thousands=None)[0].set_index(["Section", "Field"])["Value"]
    sections = list(dict.fromkeys(card.index.get_level_values(0)))
    assert sections == ["Model details, training device and budget", "Intended use", "Data",
                        "Metrics (test split, 95% CI)", "Calibration", "Subgroups (test sensitivity)", "Limitations",
                        "Run parameters", "Preprocessing recipe"]
    details = card["Model details, training device and budget"]
    assert details["Training device"] == device["label"] and details["Training time"] == "12.5 min"
    assert details["Plugin"] == "custom_cnn" and details["Parameters"] == "1,234"
    assert "second reader" in card[("Intended use", "Intended use")]
    assert "adults" in card[("Intended use", "Out of scope")]
    assert card[("Data", "val split")] == "40 films, 20 patients, 16 positive films"
    assert "procedural phantom" in card[("Data", "Source")] and "E/1–E/4" in card[("Data", "Label")]
    test = evaluation.table.query("split == 'test' and group == 'overall'").set_index("metric")
    auroc = test.loc["auroc"]
    assert card[("Metrics (test split, 95% CI)", "AUROC")] == (
        f"{auroc.value:.3f} ({auroc.ci_low:.3f}–{auroc.ci_high:.3f})")
    assert card[("Calibration", "Method")] == (f"Platt scaling fitted on 40 validation films "
                                               f"({evaluation.calibrator.n_positive} positive)")
    assert card[("Calibration", "Brier score: before → after")].startswith(f"{test.loc['brier_raw', 'value']:.3f} (")
    assert "SH II" in card[("Subgroups (test sensitivity)", "Salter-Harris type")]
    limitations = card["Limitations"]
    assert limitations["Phantom"].endswith("are not clinical results.")
    assert limitations["Verdict"].startswith(verdict.judge(evaluation.table, evaluation.predictions).verdict)
    assert card[("Run parameters", "params.lr")] == "0.001"
    assert card[("Preprocessing recipe", "params.resize.height")] == "64"


def test_model_card_of_an_ensemble_and_of_a_model_without_a_recorded_device(tmp_path):
    ensemble = {"model": "duo", "kind": "ensemble", "framework": "ensemble", "plugin": None, "rule": "logistic",
                "members": ["a", "b"], "selection": "listed in the config", "train_seconds": 120.0, "params": 10,
                "weights": {"members": ["a", "b"], "coefficients": [1.0, 0.5], "intercept": 0.1}}
    summary_path, data_path, evaluation, outputs, cfg = card_inputs(tmp_path, ensemble, phantom=False)
    model_card.training_report(summary_path, data_path, evaluation, outputs, cfg, "duo")
    card = pd.read_html(outputs["card"], thousands=None)[0].set_index(["Section", "Field"])["Value"]
    details = card["Model details, training device and budget"]
    assert details["Ensemble"] == "logistic of a, b" and details["Training time (members' total)"] == "2.0 min"
    assert "coefficients" in details["Stacking weights (fitted on validation)"]
    assert "Phantom" not in card["Limitations"] and "GRAZPEDWRI-DX" in card[("Data", "Source")]
    rows = model_card.training_rows({"model": "old", "plugin": "x", "train_seconds": None})
    assert dict((field, value) for _, field, value in rows)["Training device"] == model_card.NOT_RECORDED


def test_gallery_selection():
    predictions = evaluate.predictions_table(uncalibrated(synthetic_scores()), evaluate.Threshold(0.5, "youden"))
    chosen = evaluate.gallery_selection(predictions, 3)
    assert set(chosen) == {"True positives", "False positives", "False negatives"}
    for name, (truth, predicted, ascending) in evaluate.GALLERY_ROWS.items():
        films = chosen[name]
        assert len(films) <= 3 and films["patient_id"].is_unique
        assert (films["split"] == "test").all()
        assert (films["y_true"] == truth).all() and (films["y_pred"] == predicted).all()
        assert list(films["score"]) == sorted(films["score"], reverse=not ascending)


def test_write_gallery_with_gradcam_fallback(tmp_path, monkeypatch):
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    from physis.plugins import ModelConfig, ModelSpec, Plugin

    predictions = evaluate.predictions_table(uncalibrated(synthetic_scores()), evaluate.Threshold(0.5, "youden"))
    predictions_path = tmp_path / "predictions.parquet"
    predictions.to_parquet(predictions_path)
    preset = tmp_path / "preset"
    preset.mkdir()
    pd.DataFrame({"image_id": predictions["image_id"], "path": "unused.png"}).to_parquet(preset / "index.parquet")
    pd.DataFrame({"image_id": [predictions["image_id"].iloc[1]], "class": ["fracture"], "x": [4.0], "y": [4.0],
                  "w": [8.0], "h": [6.0]}).to_parquet(preset / "boxes.parquet")
    spec = ModelSpec(kind="classifier", framework="keras", preset="preset")
    cfg = ModelConfig("toy", spec, (24, 24, 1), {})
    model = keras.Sequential([keras.Input((24, 24, 1)), keras.layers.Conv2D(2, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    plugin = Plugin("toy", types.SimpleNamespace(SPEC=spec), "test")
    fake_inference = types.SimpleNamespace(load_trained=lambda model_dir: (plugin, model, cfg))
    seen = {}

    def image_dataset(frame, channels, batch, training, seed):
        seen["rows"] = len(frame)
        images = np.random.default_rng(0).random((len(frame), 24, 24, channels)).astype("float32")
        return tf.data.Dataset.from_tensor_slices((images, frame["label"].to_numpy())).batch(batch)

    fake_pipeline = types.SimpleNamespace(image_dataset=image_dataset)
    # `from physis import x` reads the package attribute first, so replace both places
    import physis

    for name, fake in (("inference", fake_inference), ("pipeline", fake_pipeline)):
        monkeypatch.setitem(sys.modules, f"physis.{name}", fake)
        monkeypatch.setattr(physis, name, fake, raising=False)
    output = tmp_path / "gallery.png"
    evaluate.write_gallery(predictions_path, tmp_path, preset, output, 2, "toy")
    assert output.read_bytes()[:4] == b"\x89PNG" and seen["rows"] <= 2


def test_sensitivity_by_phantom_conspicuity_in_thirds():
    """With the phantom's ground truth, test positives are split into thirds by displacement; a model that
    misses subtle fractures shows it. Without the column there is no such group."""
    from physis.phantom import CONSPICUITY

    cfg = eval_config()
    scores = synthetic_scores(patients=120, seed=4)
    positive = scores["y_true"] == 1
    displacement = pd.Series(np.random.default_rng(1).uniform(0, 30, len(scores)), index=scores.index)
    scores[CONSPICUITY] = displacement.where(positive)
    scores.loc[positive, "score"] = (displacement[positive] / 30).to_numpy()  # only displaced ones score high
    scores.loc[~positive, "score"] = 0.2
    threshold = evaluate.Threshold(0.5, "fixed")
    predictions = evaluate.predictions_table(uncalibrated(scores), threshold)
    assert CONSPICUITY in predictions
    table = evaluate.metric_table(predictions, threshold, cfg, "toy")
    thirds = table[table["group"] == "conspicuity"].set_index("subgroup")["value"]
    assert len(thirds) == 3 and list(thirds.index)[0].startswith("subtle (<")
    subtle, moderate, obvious = thirds.to_numpy()
    assert subtle == 0.0 and obvious == 1.0 and 0.0 < moderate < 1.0  # edges near 10% and 20%; threshold at 15%
    plain = evaluate.metric_table(evaluate.predictions_table(uncalibrated(scores.drop(columns=CONSPICUITY)), threshold),
                                  threshold, cfg, "toy")
    assert "conspicuity" not in set(plain["group"])


def test_study_table_combines_a_visits_films():
    films = pd.DataFrame({
        "image_id": ["a1", "a2", "a3", "b1", "b2"], "patient_id": ["A", "A", "A", "B", "B"],
        "study": [1, 1, 2, 1, 1], "split": "test", "y_true": [0, 1, 0, 0, 0],
        "score": [0.2, 0.9, 0.3, 0.6, 0.4], "score_raw": [0.1, 0.8, 0.2, 0.5, 0.3]})
    top = evaluate.study_table(films, "max").set_index("image_id")
    assert top.loc[["A/1", "A/2", "B/1"], "score"].tolist() == [0.9, 0.3, 0.6]
    assert top.loc[["A/1", "A/2", "B/1"], "y_true"].tolist() == [1, 0, 0]  # positive when any film is
    assert top.loc[["A/1", "A/2", "B/1"], "films"].tolist() == [2, 1, 2]
    mean = evaluate.study_table(films, "mean").set_index("image_id")
    assert mean.loc["A/1", "score"] == pytest.approx(0.55) and mean.loc["B/1", "score_raw"] == pytest.approx(0.4)


def test_study_level_metrics_use_their_own_validation_threshold():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    rows = []
    for p in range(60):  # two studies per patient, two films each; one film of a positive study shows it
        for study in (1, 2):
            positive = rng.random() < 0.35
            for film in range(2):
                label = int(positive and film == 0)
                rows.append({"image_id": f"{p}_{study}_{film}", "patient_id": f"p{p}", "study": study,
                             "split": ("val", "test")[p % 2], "y_true": label,
                             "score": float(np.clip(rng.normal(0.3 + 0.4 * label, 0.2), 0, 1))})
    films = pd.DataFrame(rows).assign(score_raw=lambda f: f["score"])
    cfg = eval_config()
    table = evaluate.study_rows(films, cfg, "toy")
    assert set(table["group"]) == {"study"} and set(table["subgroup"]) == {"max"}
    studies = films.groupby(["patient_id", "study", "split"]).agg(y=("y_true", "max"), s=("score", "max"))
    studies = studies.reset_index()
    val, test = studies[studies["split"] == "val"], studies[studies["split"] == "test"]
    expected = metrics.choose_threshold(val["y"], val["s"], "youden", 0.9, split="val")
    rows = table.set_index(["split", "metric"])
    assert rows.loc[("val", "threshold"), "value"] == expected
    assert rows.loc[("test", "auroc"), "value"] == pytest.approx(roc_auc_score(test["y"], test["s"]))
    called = test["s"] >= expected
    assert rows.loc[("test", "sensitivity"), "value"] == pytest.approx(called[test["y"] == 1].mean())
    assert rows.loc[("test", "accuracy"), "value"] == pytest.approx((called == (test["y"] == 1)).mean())
    assert rows.loc[("test", "auroc"), "n"] == len(test) == 60
    assert rows.loc[("test", "auroc"), "ci_low"] < rows.loc[("test", "auroc"), "value"] < rows.loc[
        ("test", "auroc"), "ci_high"]
    assert evaluate.study_rows(films, {**cfg, "study_score": "none"}, "toy").empty
    assert evaluate.study_rows(films.drop(columns="study"), cfg, "toy").empty
    # the whole stage: study rows in the table, not among the subgroups
    evaluation = evaluate.evaluate_scores(films.drop(columns="score_raw").assign(
        sh_type=pd.NA, age=10.0, sex="F", view="ap"), cfg, "toy")
    assert (evaluation.table["group"] == "study").any()
    assert "study" not in set(evaluate.subgroup_rows(evaluation.table)["group"])
