"""Every registered plugin — including one a user drops in later — gets these tests with no new
test code: the contract, a tiny CPU build + one training epoch through its own ``train`` hook +
``predict``, the built network's real input/output shapes against its declared metadata, and its
export (``physis export``) scoring as ``predict`` does.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from physis import plugins
from physis.plugins import ModelConfig, PluginError, PredictData, TrainData

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = plugins.discover()
TINY_SHAPE = (128, 128)  # a multiple of 128: the Model Garden detectors' smallest input
# A service talks to a remote API: its whole cycle runs against a local emulator in its own tests.
LOCAL = [name for name, plugin in REGISTRY.items() if plugin.spec.framework != "service"]


def tiny_params(plugin) -> dict:
    """The plugin's defaults cut down to one short epoch."""
    params = dict(plugin.spec.params)
    for key, value in {"epochs": 1, "batch_size": 2, "steps_per_epoch": 2, "frozen_epochs": 0}.items():
        if key in params:
            params[key] = value
    return params


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Eight 128×128 films (four with a bright 'fracture' bar and its box) as preprocessed PNGs."""
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    rows, boxes = [], []
    for i in range(8):
        pixels = (rng.random(TINY_SHAPE) * 60 + 40).astype(np.uint8)
        label = i % 2
        if label:
            pixels[50:58, 30:100] = 250
            boxes.append({"image_id": f"img{i}", "class": "fracture", "x": 28.0, "y": 48.0, "w": 74.0, "h": 12.0})
        boxes.append({"image_id": f"img{i}", "class": "text", "x": 2.0, "y": 2.0, "w": 20.0, "h": 10.0})
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append({"image_id": f"img{i}", "patient_id": f"p{i}", "path": str(path), "label": label,
                     "split": "train" if i < 6 else "val"})
    return pd.DataFrame(rows), pd.DataFrame(boxes), folder


def build(name, tmp_path):
    plugin = REGISTRY[name]
    shape = (*TINY_SHAPE, plugin.spec.channels)
    cfg = ModelConfig(name, plugin.spec, shape, tiny_params(plugin), seed=0, work_dir=tmp_path / name)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    return plugin, cfg, plugin.hook("build")(cfg)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract(name):
    plugin = REGISTRY[name]
    spec = plugin.spec
    assert spec.kind in plugins.KINDS and spec.framework in plugins.FRAMEWORKS
    assert spec.reference, "every plugin names the paper or thesis listing it comes from"
    for hook in plugins.REQUIRED_HOOKS:
        assert callable(plugin.hook(hook))
    from physis import config

    presets = config.load()["preprocess"]["presets"]
    assert spec.preset in presets, f"{name}: preset {spec.preset!r} is not a configured preset"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOCAL))
def test_tiny_build_train_predict(name, tiny_set, tmp_path):
    import tensorflow as tf

    from physis import pipeline, train

    train.seed_everything(0)  # seeded and op-deterministic, as in a train job
    frame, boxes, folder = tiny_set
    plugin, cfg, model = build(name, tmp_path)
    if plugin.spec.kind == "classifier":
        # real input/output shapes match the declared metadata
        assert tuple(model.input_shape[1:]) == cfg.input_shape
        assert tuple(model.output_shape[1:]) == (1,)
    frames = {s: part.reset_index(drop=True) for s, part in frame.groupby("split")}
    data = TrainData(
        train=pipeline.image_dataset(frames["train"], cfg.spec.channels, 2, training=True, seed=0),
        val=pipeline.image_dataset(frames["val"], cfg.spec.channels, 2, training=False, seed=0),
        frames=frames, boxes=boxes, class_weight={0: 1.0, 1: 1.0}, preset_dir=folder)
    plugin.hook("train")(model, data, cfg, train.callbacks(cfg.spec.framework, cfg.work_dir, patience=2))
    history = pd.read_parquet(cfg.work_dir / "history.parquet")
    assert history["epoch"].tolist() == [1] and "val_auroc" in history
    images = pipeline.film_images(frame, cfg.spec.channels, 4)
    scores = np.asarray(plugin.hook("predict")(model, PredictData(images, frame, boxes, folder), cfg))
    assert scores.shape == (len(frame),)
    assert np.all((scores >= 0) & (scores <= 1))
    # save/load round trip through the framework gives the same scores
    train.save_model(plugin, model, cfg.work_dir)
    reloaded = train.load_model(plugin, cfg)
    again = np.asarray(plugin.hook("predict")(reloaded, PredictData(images, frame, boxes, folder), cfg))
    np.testing.assert_allclose(again, scores, atol=1e-5)
    check_export(plugin, reloaded, cfg, PredictData(images, frame, boxes, folder), again, tmp_path / "export")
    tf.keras.backend.clear_session()


def check_export(plugin, model, cfg, data, scores, folder):
    """The exported SavedModel (and a Keras classifier's ONNX file) scores the same batches as the predict
    hook did, and a detector's boxes are its ``predict_boxes``; uncalibrated, probability = score."""
    import tensorflow as tf

    from physis import serving

    onnx = cfg.spec.framework == "keras"
    serving.save_serving(plugin, model, cfg, folder, onnx=onnx)
    serve = tf.saved_model.load(str(folder / serving.SAVED_MODEL)).signatures[serving.SIGNATURE]
    batches = [{key: value.numpy() for key, value in serve(images=batch).items()} for batch in data.images]
    out = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    np.testing.assert_allclose(out["score"], scores, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out["probability"], out["score"])
    if plugin.hook("predict_boxes") is not None:
        for found, boxes, count in zip(plugin.hook("predict_boxes")(model, data, cfg), out["boxes"], out["num_boxes"]):
            assert count == len(found)
            np.testing.assert_allclose(boxes[:count], found, atol=1e-3, rtol=0)
            assert not boxes[count:].any()
    if onnx:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(folder / serving.ONNX_FILE), providers=["CPUExecutionProvider"])
        films = np.concatenate(list(data.images.as_numpy_iterator()))
        probability, score = session.run(["probability", "score"], {serving.INPUT: films})
        np.testing.assert_allclose(score, scores, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probability, scores, atol=1e-4, rtol=0)


def write_plugin(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    from physis.plugins import ModelSpec
    SPEC = ModelSpec(kind="classifier", framework="keras", preset="letterbox_256x128", reference="test")
    def build(cfg): return None
    def train(model, data, cfg, callbacks): pass
    def predict(model, data, cfg): return [0.5] * len(data.frame)
"""


def test_missing_hook_names_the_plugin_and_the_hook(tmp_path):
    write_plugin(tmp_path, "broken", GOOD.replace("    def predict(model, data, cfg): return [0.5] * len(data.frame)\n", ""))
    with pytest.raises(PluginError, match=r"plugin 'broken' .*missing hook predict\(\)"):
        plugins.discover([tmp_path], use_entry_points=False)


@pytest.mark.parametrize("change, message", [
    ('kind="classifier"', "SPEC.kind 'segmenter'"),
    ('framework="keras"', "SPEC.framework 'torch'"),
])
def test_malformed_metadata_names_the_plugin(tmp_path, change, message):
    bad = {"kind": 'kind="segmenter"', "framework": 'framework="torch"'}[change.split("=")[0]]
    write_plugin(tmp_path, "odd", GOOD.replace(change, bad))
    with pytest.raises(PluginError, match=f"plugin 'odd' .*{message}"):
        plugins.discover([tmp_path], use_entry_points=False)


def test_spec_must_be_a_model_spec(tmp_path):
    write_plugin(tmp_path, "nospec", GOOD.replace("SPEC = ModelSpec(", "SPEC = dict(").replace("reference=", "ref="))
    with pytest.raises(PluginError, match="plugin 'nospec'.*SPEC must be a physis.plugins.ModelSpec"):
        plugins.discover([tmp_path], use_entry_points=False)


def test_import_error_names_the_plugin(tmp_path):
    write_plugin(tmp_path, "crash", "import does_not_exist\n")
    with pytest.raises(PluginError, match="plugin 'crash'.*import failed.*does_not_exist"):
        plugins.discover([tmp_path], use_entry_points=False)


def test_duplicate_names_are_an_error_naming_both_sources(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_plugin(first, "twin", GOOD)
    write_plugin(second, "twin", GOOD)
    with pytest.raises(PluginError, match=rf"'twin' is defined twice: .*{first.name}.*and .*{second.name}"):
        plugins.discover([first, second], use_entry_points=False)


def test_unknown_parameter_override_is_an_error():
    with pytest.raises(PluginError, match="plugin 'resnet50': unknown parameter.*learnig_rate"):
        plugins.resolve_params(REGISTRY["resnet50"], {"learnig_rate": 0.1})


def test_thesis_parameter_counts_are_reproduced():
    custom = REGISTRY["custom_cnn"]
    params = {**custom.spec.params, "outputs": 3}
    model = custom.hook("build")(ModelConfig("custom_cnn", custom.spec, (540, 203, 3), params))
    assert model.count_params() == 102_850_851  # thesis Listing 7.6
    resnet = REGISTRY["resnet50"]
    model = resnet.hook("build")(ModelConfig("resnet50", resnet.spec, (224, 224, 3), dict(resnet.spec.params)))
    assert model.count_params() == 23_620_481  # thesis Listing 7.10


@pytest.mark.xdist_group("slurm")  # snakemake in the repository root, like the SLURM workflow test
def test_a_dropped_in_plugin_file_is_picked_up_by_the_workflow(tmp_path):
    extra = tmp_path / "my_plugins"
    extra.mkdir()
    write_plugin(extra, "tiny_net", GOOD)
    config = tmp_path / "extra.yaml"
    config.write_text(f"plugin_dirs: [plugins, {extra}]\nmodels:\n  tiny_net: {{}}\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1", "--configfile", str(config),
         "--config", f"results={tmp_path / 'results'}", "--quiet", "rules"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "train" in out
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--cores", "1", "--configfile", str(config),
         "--config", f"results={tmp_path / 'results'}", "--forcerun", "all"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "models/tiny_net/train_summary.json" in listing.stdout + listing.stderr


COUNTED = """
    from physis.plugins import ModelSpec
    SPEC = ModelSpec(kind="classifier", framework="keras", preset="tiny_8x8", reference="test", params={"units": 1})
    def build(cfg):
        import keras
        inputs = keras.Input(cfg.input_shape)
        return keras.Model(inputs, keras.layers.Dense(cfg.params["units"])(keras.layers.Flatten()(inputs)))
    def train(model, data, cfg, callbacks): pass
    def predict(model, data, cfg): return [0.5] * len(data.frame)
"""


def test_physis_plugins_is_fast_by_default_and_counts_parameters_with_params(tmp_path):
    """The listing builds nothing (no TensorFlow import) and shows the counts cached by the last
    ``--params``, which builds each network; a changed plugin file is counted anew."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    plugin_file = write_plugin(folder, "counted", COUNTED)
    config = tmp_path / "config.yaml"
    config.write_text(f"plugin_dirs: [{folder}]\npreprocess:\n  presets:\n    tiny_8x8: {{height: 8, width: 8}}\n")
    code = ("import json, sys; from physis.cli import main; main(sys.argv[1:]); "
            "print(json.dumps(sorted({'tensorflow', 'keras', 'tf_keras'} & set(sys.modules))))")

    def listing(*flags) -> tuple[int | None, list[str]]:
        result = subprocess.run([sys.executable, "-c", code, "plugins", "--json", "--config", str(config), *flags],
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert result.returncode == 0, result.stderr[-3000:]
        rows, _, loaded = result.stdout.strip().rpartition("\n")
        counted = next(row for row in json.loads(rows) if row["name"] == "counted")
        return counted["params"], json.loads(loaded)

    assert listing() == (None, [])
    assert listing("--params")[0] == 8 * 8 + 1  # Flatten(8x8x1) -> Dense(1): 64 weights and a bias
    assert listing() == (65, [])
    plugin_file.write_text(plugin_file.read_text().replace('"units": 1', '"units": 2'))
    assert listing() == (None, [])
