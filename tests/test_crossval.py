"""Cross-validation (split.folds = k): fold manifests, pooled out-of-fold scores, the fold ensemble on
test, and one real Snakemake run of the whole workflow with 2 folds on the tiny phantom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from physis import crossval
from physis.splits import SplitError, assign_splits, check_splits

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TINY = ROOT / "tests" / "config" / "tiny.yaml"


def manifest(patients: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"image_id": f"p{p}_f{f}", "patient_id": f"p{p}", "label": int(rng.random() < 0.4)}
            for p in range(patients) for f in range(2)]
    return assign_splits(pd.DataFrame(rows), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1, folds=3)


def test_a_fold_model_validates_on_its_held_out_fold_and_never_sees_test():
    films = manifest()
    seen_as_val = []
    for k in range(3):
        view = crossval.fold_manifest(films, k)
        pool = films["split"] != "test"
        assert (view.loc[~pool, "split"] == "test").all()
        assert set(view.loc[pool & (films["fold"] == k), "split"]) == {"val"}
        assert set(view.loc[pool & (films["fold"] != k), "split"]) == {"train"}
        # patient-grouped: no patient has films in its fold model's train and val
        assert view[view["split"] != "test"].groupby("patient_id")["split"].nunique().max() == 1
        seen_as_val += list(view.loc[view["split"] == "val", "image_id"])
    assert sorted(seen_as_val) == sorted(films.loc[films["split"] != "test", "image_id"])  # each film once


def test_fold_manifest_needs_folds():
    films = manifest().drop(columns="fold")
    with pytest.raises(ValueError, match="no fold column"):
        crossval.fold_manifest(films, 0)
    with pytest.raises(ValueError, match="no fold 7"):
        crossval.fold_manifest(manifest(), 7)


def test_a_fold_with_one_class_is_refused_naming_the_fold():
    films = manifest()
    pool = films["split"] != "test"
    films.loc[pool & (films["fold"] == 1), "label"] = 0
    with pytest.raises(SplitError, match="fold 1's held-out films have only class 0"):
        check_splits(films)


def test_combine_pools_out_of_fold_scores_and_averages_test():
    # two fold models; films a, b held out by fold 0, c by fold 1; t1, t2 are test films
    def scored(val: dict, test: dict) -> pd.DataFrame:
        return pd.DataFrame([{"image_id": i, "split": "val", "score": s} for i, s in val.items()]
                            + [{"image_id": i, "split": "test", "score": s} for i, s in test.items()])

    def boxes(image_ids, split, score):
        return pd.DataFrame({"image_id": image_ids, "split": split, "x": 1.0, "y": 1.0, "w": 2.0, "h": 2.0,
                             "score": score})

    fold0 = scored({"a": 0.1, "b": 0.7}, {"t2": 0.2, "t1": 0.6})
    fold1 = scored({"c": 0.9}, {"t1": 0.4, "t2": 0.8})  # another order of the test films
    scores, found = crossval.combine([
        (fold0, pd.concat([boxes(["a"], "val", 0.5), boxes(["t1"], "test", 0.6)])),
        (fold1, pd.concat([boxes(["c"], "val", 0.9), boxes(["t1"], "test", 0.4)]))])
    by_id = scores.set_index("image_id")
    assert by_id.loc[["a", "b", "c"], "score"].tolist() == [0.1, 0.7, 0.9]
    assert by_id.loc[["a", "b", "c"], "fold"].tolist() == [0, 0, 1]
    assert by_id.loc["t1", "score"] == pytest.approx(0.5) and by_id.loc["t2", "score"] == pytest.approx(0.5)
    assert (by_id.loc[["t1", "t2"], "split"] == "test").all() and len(scores) == 5
    # out-of-fold boxes from the model that scored the film; test boxes from fold 0's model only
    assert sorted(zip(found["image_id"], found["score"])) == [("a", 0.5), ("c", 0.9), ("t1", 0.6)]


def test_finish_joins_the_folds(tmp_path):
    for k, (epochs, best) in enumerate([(3, 2), (4, 4)]):
        folder = tmp_path / f"fold{k}"
        folder.mkdir()
        (folder / "recipe.json").write_text('{"hash": "abc"}')
        (folder / "params.json").write_text('{"model": "m"}')
        pd.DataFrame({"epoch": range(1, epochs + 1), "val_auroc": 0.5}).to_parquet(folder / "history.parquet")
        (folder / "train_summary.json").write_text(json.dumps({
            "model": "m", "plugin": "custom_cnn", "kind": "classifier", "framework": "keras", "preset": "p",
            "recipe_hash": "abc", "train_seconds": 10.0 + k, "params": 100, "epochs_run": epochs,
            "best_epoch": best, "restored_best": True, "input_shape": [8, 8, 1], "device": {"label": "CPU"},
            "fold": k}))
    summary = crossval.finish(tmp_path, 2)
    assert summary["folds"] == 2 and summary["train_seconds"] == 21.0 and summary["epochs_run"] == 7
    assert summary["fold_epochs"] == [3, 4] and summary["fold_best_epochs"] == [2, 4]
    assert json.loads((tmp_path / "train_summary.json").read_text()) == summary
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert history.groupby("fold")["epoch"].max().tolist() == [3, 4]
    assert (tmp_path / "recipe.json").read_text() == '{"hash": "abc"}'
    assert [p.name for p in crossval.fold_dirs(tmp_path)] == ["fold0", "fold1"]


def test_split_folds_1_is_a_config_error():
    from physis import config

    with pytest.raises(config.ConfigError, match="split.folds is 1"):
        config.load(overrides={"split": {"folds": 1}})


# --------------------------------------------------------------------------- the whole workflow, 2 folds


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory) -> Path:
    """``snakemake all`` with split.folds 2 and one tiny model (custom_cnn, one epoch)."""
    folder = tmp_path_factory.mktemp("crossval")
    tiny = yaml.safe_load(TINY.read_text())
    tiny["dataset"]["root"] = str(folder / "phantom")
    tiny["results"] = str(folder / "results")
    tiny["split"] = {"folds": 2}
    tiny["models"]["custom_cnn"]["params"]["epochs"] = 1
    tiny["models"]["mobilenetv2"] = {"enabled": False}
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny))
    run = subprocess.run([str(SNAKEMAKE), "--cores", "2", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(folder), "--configfile", str(folder / "config.yaml"), "--", "all"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return folder / "results"


@pytest.mark.slow
def test_one_train_job_per_fold_and_a_joined_model_folder(cross_validated):
    model = cross_validated / "models" / "custom_cnn"
    for k in (0, 1):
        summary = json.loads((model / f"fold{k}" / "train_summary.json").read_text())
        assert summary["fold"] == k and (model / f"fold{k}" / "model.keras").is_file()
        assert (cross_validated / "logs" / "train" / f"custom_cnn_fold{k}.log").is_file()
    joined = json.loads((model / "train_summary.json").read_text())
    assert joined["folds"] == 2 and len(joined["fold_epochs"]) == 2
    assert set(pd.read_parquet(model / "history.parquet")["fold"]) == {0, 1}


@pytest.mark.slow
def test_pooled_out_of_fold_validation_and_fold_ensemble_test(cross_validated):
    import keras

    from physis import pipeline

    films = pd.read_parquet(cross_validated / "data" / "manifest.parquet")
    predictions = pd.read_parquet(cross_validated / "predictions" / "custom_cnn.parquet")
    pool = films[films["split"] != "test"]
    val = predictions[predictions["split"] == "val"]
    assert sorted(val["image_id"]) == sorted(pool["image_id"])  # every train+val film scored once
    folds = pool.set_index("image_id")["fold"]
    assert (val.set_index("image_id")["fold"] == folds.loc[val["image_id"]]).all()

    # independently: each fold's saved Keras model on the preprocessed films
    index = pd.read_parquet(cross_validated / "preprocess" / "tiny_128x64" / "index.parquet")
    frame = films.merge(index[["image_id"]].assign(path=index["path"]), on="image_id", suffixes=("_raw", ""))
    images = np.concatenate([np.asarray(b) for b in pipeline.film_images(frame, 3, 16)])
    raw = {k: keras.models.load_model(cross_validated / "models" / "custom_cnn" / f"fold{k}" / "model.keras")
           .predict(images, verbose=0)[:, 0] for k in (0, 1)}
    expected = pd.Series(np.where(frame["split"] == "test", (raw[0] + raw[1]) / 2,
                                  np.where(frame["fold"] == 0, raw[0], raw[1])), index=frame["image_id"])
    got = predictions.set_index("image_id")["score_raw"]
    np.testing.assert_allclose(got.to_numpy(), expected.loc[got.index].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_the_report_says_validation_is_out_of_fold(cross_validated):
    board = pd.read_parquet(cross_validated / "leaderboard.parquet").set_index("model")
    assert board.loc["custom_cnn", "folds"] == 2
    html = (cross_validated / "leaderboard.html").read_text()
    assert "pooled out-of-fold, 2 folds" in html
    # study level (the phantom's AP and lateral films of one visit) rides along
    assert board.loc["custom_cnn", "n_test_studies"] < board.loc["custom_cnn", "n_test"]
    assert "Study AUROC" in html
    metrics = pd.read_parquet(cross_validated / "metrics" / "custom_cnn.parquet")
    study = metrics[(metrics["group"] == "study") & (metrics["split"] == "test")].set_index("metric")
    auroc = study.loc["auroc"]  # a tiny test split may hold positive studies only: then undefined, and said so
    assert 0 <= auroc["value"] <= 1 or auroc["note"].startswith("undefined")
    card = (cross_validated / "figures" / "custom_cnn" / "model_card.html").read_text()
    assert "Cross-validation" in card and "pooled out-of-fold" in card
    assert (cross_validated / "figures" / "custom_cnn" / "gallery.png").is_file()


@pytest.mark.slow
def test_physis_predict_scores_with_the_fold_models_mean(cross_validated):
    from physis.images import read_gray
    from physis.inference import Predictor, find_films

    film = sorted((cross_validated.parent / "phantom").glob("images_part*/*.png"))[0]
    model = cross_validated / "models" / "custom_cnn"
    both = Predictor(model)
    prepared = both.prepare(read_gray(film))
    folds = [Predictor(model / f"fold{k}").raw_scores([prepared])[0] for k in (0, 1)]
    assert both.raw_scores([prepared])[0] == pytest.approx(np.mean(folds), abs=1e-7)
    assert folds[0] != folds[1]  # two different networks
    result = next(both.score(find_films([film])))
    assert result.calibrated and result.raw_score == pytest.approx(np.mean(folds), abs=1e-7)
    assert result.threshold == json.loads((model / "calibration.json").read_text())["threshold"]["value"]


@pytest.mark.slow
def test_the_export_is_the_fold_ensemble(cross_validated, tmp_path):
    import keras
    import tensorflow as tf

    from physis import pipeline
    from physis.serving import export

    model = cross_validated / "models" / "custom_cnn"
    metadata = export(model, tmp_path / "export")
    assert metadata["folds"] == 2 and "fold ensemble" in (tmp_path / "export" / "README.md").read_text()
    index = pd.read_parquet(cross_validated / "preprocess" / "tiny_128x64" / "index.parquet").head(8)
    images = np.concatenate([np.asarray(b) for b in pipeline.film_images(index.assign(label=0), 3, 8)])
    folds = [keras.models.load_model(model / f"fold{k}" / "model.keras").predict(images, verbose=0)[:, 0]
             for k in (0, 1)]
    served = tf.saved_model.load(str(tmp_path / "export" / "saved_model")).signatures["serving_default"]
    out = served(images=tf.constant(images))
    np.testing.assert_allclose(out["score"].numpy(), (folds[0] + folds[1]) / 2, atol=1e-5)
