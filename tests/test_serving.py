"""``physis export``: the calibrator inside the SavedModel/ONNX signature, the files beside it, a film scored
without physis, and the errors (a service plugin, a folder that is not an export). Every plugin's parity with
its predict hook is checked in tests/test_plugins.py::test_tiny_build_train_predict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from physis import calibration, cli, plugins, serving
from physis.calibration import Calibrator

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = plugins.discover()
PRESET = {"height": 128, "width": 64}
THRESHOLD = {"value": 0.42, "rule": "youden", "note": ""}


def calibrators(raw: np.ndarray) -> dict[str, Calibrator]:
    """A Platt map, and isotonic knots inside the range of ``raw`` (so scores fall below, between and above)."""
    knots = np.quantile(raw, [0.2, 0.4, 0.6, 0.8]).tolist()
    return {"platt": Calibrator("platt", {"a": 3.0, "b": -1.5}, n=40, n_positive=10),
            "isotonic": Calibrator("isotonic", {"x": knots, "y": [0.05, 0.2, 0.2, 0.9]}, n=40, n_positive=10)}


@pytest.mark.parametrize("method", ["platt", "isotonic", "none"])
def test_the_graph_calibrator_is_the_numpy_one(method):
    import tensorflow as tf

    raw = np.array([0.0, 1e-13, 1e-7, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 1 - 1e-7, 1.0], np.float32)
    calibrator = calibrators(raw).get(method, Calibrator("none"))
    edges = calibrator.params.get("x", [])  # the knots themselves
    scores = np.concatenate([raw, np.asarray(edges, np.float32)])
    graph = serving.calibrate(calibrator, tf.constant(scores)).numpy()
    np.testing.assert_allclose(graph, calibrator(scores), atol=1e-12, rtol=0)
    one_knot = Calibrator("isotonic", {"x": [0.5], "y": [0.3]})
    np.testing.assert_allclose(serving.calibrate(one_knot, tf.constant(scores)).numpy(), one_knot(scores), atol=1e-12)


@pytest.fixture
def model_folder(tmp_path):
    """A finished baseline_cnn folder (random weights) with its params, recipe and summary, as train writes them."""
    from physis import config, preprocess, train
    from physis.io import write_json
    from physis.plugins import ModelConfig

    plugin = REGISTRY["baseline_cnn"]
    params = config.load(overrides={"preprocess": {"presets": {"tiny": PRESET}}})["preprocess"]["presets"]["tiny"]
    folder = tmp_path / "models" / "baseline_cnn"
    folder.mkdir(parents=True)
    cfg = ModelConfig("baseline_cnn", plugin.spec, (PRESET["height"], PRESET["width"], 1), dict(plugin.spec.params),
                      work_dir=folder)
    train.save_model(plugin, plugin.hook("build")(cfg), folder)
    write_json(preprocess.make_recipe("tiny", params), folder / "recipe.json")
    write_json({"model": cfg.name, "plugin": plugin.name, "plugin_source": plugin.source, "params": cfg.params,
                "seed": 0, "input_shape": list(cfg.input_shape)}, folder / "params.json")
    write_json({"model": cfg.name}, folder / "train_summary.json")
    return folder


def films(count: int = 12) -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.random((count, PRESET["height"], PRESET["width"], 1), np.float32) * 0.3
    images[::2, 40:48, 10:50] = 1.0  # a bright bar on every other film: scores spread
    return images


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_export_returns_the_calibrated_probability_and_carries_the_threshold(method, model_folder, tmp_path, capsys):
    import keras
    import onnxruntime
    import tensorflow as tf

    images = films()
    raw = keras.models.load_model(model_folder / "model.keras").predict(images, verbose=0)[:, 0]
    calibrator = calibrators(raw)[method]
    calibration.save(calibrator, THRESHOLD, model_folder / "calibration.json")
    out = tmp_path / "export"
    assert cli.main(["export", "--model", str(model_folder), "--out", str(out), "--onnx"]) == 0
    assert "threshold 0.420 (youden)" in capsys.readouterr().out

    served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["score"].numpy(), raw, atol=1e-4, rtol=0)
    np.testing.assert_allclose(served["probability"].numpy(), calibrator(served["score"].numpy()), atol=1e-5, rtol=0)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    probability, score = session.run(["probability", "score"], {"images": images})
    np.testing.assert_allclose(probability, calibrator(score), atol=1e-5, rtol=0)
    np.testing.assert_allclose(score, raw, atol=1e-4, rtol=0)

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["threshold"] == THRESHOLD and metadata["calibration"]["method"] == method
    assert metadata["input"]["shape"] == [None, 128, 64, 1] and list(metadata["outputs"]) == ["probability", "score"]
    assert json.loads((out / "calibration.json").read_text())["threshold"] == THRESHOLD
    assert (out / "recipe.json").read_bytes() == (model_folder / "recipe.json").read_bytes()
    assert sorted(path.name for path in out.iterdir()) == sorted(metadata["files"])
    assert "probability >= 0.42" in (out / "README.md").read_text()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary left


def test_an_exported_model_scores_a_film_without_physis(model_folder, phantom_root, tmp_path):
    """The export's score.py (docs/score_export.py, the README's snippet) in a process where physis cannot be
    imported gives the probability ``physis predict`` gives for the same film."""
    from physis import preprocess
    from physis.images import read_gray, write_gray16
    from physis.inference import predict_probability

    film = next(iter(sorted(phantom_root.glob("images_part*/*.png"))))
    calibration.save(Calibrator("platt", {"a": 2.0, "b": -0.5}, n=40, n_positive=10), THRESHOLD,
                     model_folder / "calibration.json")
    out = tmp_path / "export"
    serving.export(model_folder, out)
    recipe = json.loads((model_folder / "recipe.json").read_text())
    image, _, _ = preprocess.preprocess_array(read_gray(film), recipe["params"])  # what physis predict feeds
    png = tmp_path / "film.png"
    write_gray16(png, np.round(image * 65535))

    code = ("import runpy, sys; sys.modules['physis'] = None; sys.argv = sys.argv[1:]; "  # import physis fails
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert [name for name in sys.modules if 'physis' in name] == ['physis']")
    result = subprocess.run([sys.executable, "-c", code, str(out / "score.py"), str(out), str(png)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    expected = predict_probability(film, model_folder)
    assert scored["probability"] == pytest.approx(expected.probability, abs=1e-5)
    assert scored["score"] == pytest.approx(expected.raw, abs=1e-5)
    assert scored["threshold"] == THRESHOLD["value"] and scored["preset"] == "tiny"
    assert scored["positive"] == (expected.probability >= THRESHOLD["value"])
    assert (out / "score.py").read_text() == (ROOT / "docs" / "score_export.py").read_text()


def test_a_service_model_cannot_be_exported(tmp_path, capsys):
    plugin = REGISTRY["azure_custom_vision"]
    folder = tmp_path / "azure_custom_vision"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({
        "model": "azure_custom_vision", "plugin": plugin.name, "plugin_source": plugin.source,
        "params": dict(plugin.spec.params), "seed": 0, "input_shape": [512, 256, 1]}))
    (folder / "train_summary.json").write_text("{}")
    assert cli.main(["export", "--model", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("physis: error: model 'azure_custom_vision' (plugin azure_custom_vision) cannot be exported: "
                     "it is a cloud service (framework service) whose trained model lives in the service, not in "
                     "the model folder")
    assert not (tmp_path / "out").exists()


def test_onnx_is_for_keras_classifiers_only(tmp_path):
    plugin = REGISTRY["spinenet49"]
    cfg = plugins.ModelConfig("spinenet49", plugin.spec, (128, 128, 3), dict(plugin.spec.params))
    with pytest.raises(plugins.PluginError, match="'spinenet49': ONNX export is for Keras classifiers"):
        serving.save_serving(plugin, None, cfg, tmp_path, onnx=True)


def test_a_failed_export_leaves_nothing_and_a_foreign_folder_is_never_replaced(model_folder, tmp_path, monkeypatch):
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "letter.txt").write_text("keep me")
    assert cli.main(["export", "--model", str(model_folder), "--out", str(foreign)]) == 2
    assert (foreign / "letter.txt").read_text() == "keep me"

    def broken(plugin, model, cfg, folder, *args):
        (Path(folder) / "saved_model").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(serving, "save_serving", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        serving.export(model_folder, tmp_path / "exports" / "baseline_cnn")
    assert list((tmp_path / "exports").iterdir()) == []


def test_export_all_exports_every_trained_network(tmp_path):
    """``snakemake export_all`` (not part of ``all``) plans one export per configured network, none for a service."""
    from physis import config

    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1", "export_all", "--config",
         f"results={tmp_path / 'results'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    for name, entry in config.load()["models"].items():
        network = entry["enabled"] and REGISTRY[entry.get("plugin") or name].spec.framework != "service"
        assert (f"exports/{name}" in out) == network, name


def test_the_readme_deploy_section_shows_what_the_tests_run():
    """README "Deploy a trained model": its scoring snippet is docs/score_export.py (run without physis above)
    and its `physis predict` command is the one tests/test_predict_cli.py runs."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy a trained model", 1)[1].split("\n## ", 1)[0]
    assert f"```python\n{(ROOT / 'docs' / 'score_export.py').read_text()}```" in section
    command = "physis predict films --model results/models/custom_cnn --csv scores.csv --overlay overlays"
    assert command in section
    runs = (ROOT / "tests" / "test_predict_cli.py").read_text()
    assert '"predict", "films", "--model",' in runs and '"--csv", "scores.csv", "--overlay", "overlays"' in runs
