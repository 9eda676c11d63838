"""The train stage on the tiny phantom: determinism, resume after a kill, outputs, predict."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_config

from physis import preprocess
from physis.convert import convert

PRESET = {"height": 128, "width": 64}


@pytest.fixture(scope="module")
def prepared(phantom_root, tmp_path_factory):
    """Tiny phantom → convert → preprocess once; tests train into their own results folders."""
    base = tmp_path_factory.mktemp("prepared")
    cfg = make_config(phantom_root, base, preprocess={"presets": {"tiny": PRESET}})
    convert(cfg, base / "data")
    params = cfg["preprocess"]["presets"]["tiny"]
    manifest = pd.read_parquet(base / "data" / "manifest.parquet")
    preprocess.run(manifest, pd.read_parquet(base / "data" / "boxes.parquet"), "tiny", params,
                   base / "preprocess" / "tiny", figure_films=1)
    return phantom_root, base


def model_config(prepared, results: Path, epochs: int, model="custom_cnn") -> Path:
    """A config file whose results folder links to the shared data and preprocess outputs."""
    phantom_root, base = prepared
    results.mkdir(parents=True, exist_ok=True)
    for part in ("data", "preprocess"):
        (results / part).symlink_to(base / part)
    cfg = make_config(phantom_root, results, preprocess={"presets": {"tiny": PRESET}},
                      models={model: {"preset": "tiny", "params": {"epochs": epochs, "batch_size": 8}}})
    path = results / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def train_process(config: Path, model="custom_cnn", log: Path | None = None) -> subprocess.Popen:
    code = ("import json, sys; from physis import logs; from physis.train import train_model; "
            f"logs.setup({str(log)!r} if {log is not None} else None); "
            f"train_model({model!r}, json.load(open({str(config)!r})), threads=1)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def train(config: Path, model="custom_cnn", log: Path | None = None) -> str:
    process = train_process(config, model, log)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-4000:]
    return out


def predictions(results: Path, model="custom_cnn") -> pd.DataFrame:
    from physis.inference import predict_frame

    manifest = pd.read_parquet(results / "data" / "manifest.parquet")
    scores, boxes = predict_frame(results / "models" / model, manifest, results / "preprocess" / "tiny")
    assert boxes.empty  # a classifier has no boxes
    return scores


@pytest.mark.slow
def test_same_seed_gives_identical_predictions(prepared, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    train(model_config(prepared, first, epochs=2))
    train(model_config(prepared, second, epochs=2))
    a, b = predictions(first), predictions(second)
    assert len(a) and set(a["split"]) == {"val", "test"}
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    # the model folder holds everything the issue lists
    folder = first / "models" / "custom_cnn"
    for name in ("model.keras", "recipe.json", "params.json", "history.parquet", "train_summary.json"):
        assert (folder / name).is_file(), name
    assert any((folder / "tensorboard").rglob("events.out.tfevents.*"))
    history = pd.read_parquet(folder / "history.parquet")
    assert history["epoch"].tolist() == [1, 2]
    assert {"loss", "val_loss", "auroc", "val_auroc", "accuracy", "val_accuracy"} <= set(history.columns)
    summary = json.loads((folder / "train_summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["params"] > 0
    device = summary["device"]  # what trained it: this machine's CPU, one thread, no mixed precision
    assert (device["type"], device["count"], device["mixed_precision"], device["gpus_visible"]) == ("CPU", 1, False, 0)
    assert json.loads((folder / "recipe.json").read_text())["preset"] == "tiny"


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(prepared, tmp_path):
    results = tmp_path / "run"
    config = model_config(prepared, results, epochs=4)
    folder = results / "models" / "custom_cnn"
    process = train_process(config)
    deadline = time.monotonic() + 600
    while not (folder / "history.parquet").is_file():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.5)
    time.sleep(0.5)  # let the epoch-1 callbacks finish writing
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = pd.read_parquet(folder / "history.parquet")
    assert not (folder / "train_summary.json").exists()
    done = int(first["epoch"].max())
    assert done < 4, "training finished before it could be killed; make the test model slower"

    log = tmp_path / "resume.log"
    train(config, log=log)
    text = log.read_text()
    assert "resuming from checkpoint" in text
    epochs_logged = [int(re.search(r"physis.train: epoch (\d+):", line).group(1)) for line in text.splitlines()
                     if "physis.train: epoch " in line]
    assert epochs_logged and min(epochs_logged) == done + 1, epochs_logged  # continued, not restarted
    history = pd.read_parquet(folder / "history.parquet")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(history[history.epoch <= done].reset_index(drop=True), first)
    assert json.loads((folder / "train_summary.json").read_text())["epochs_run"] == 4


@pytest.mark.slow
def test_predict_cli_replays_the_recipe(prepared, tmp_path):
    results = tmp_path / "cli"
    train(model_config(prepared, results, epochs=1))
    manifest = pd.read_parquet(results / "data" / "manifest.parquet")
    film = manifest[manifest.split == "test"].iloc[0]
    out = subprocess.run([str(Path(sys.executable).parent / "physis"), "predict", film.path, "--model",
                          str(results / "models" / "custom_cnn"), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    score = json.loads(out.stdout.strip().splitlines()[-1])["films"][0]["score"]
    expected = predictions(results).set_index("image_id").loc[film.image_id, "score"]
    assert score == pytest.approx(expected, abs=2e-3)  # same preprocessing → same score (PNG rounding only)


class Killed(Exception):
    """Stands in for SIGKILL/SLURM TIMEOUT inside a custom training loop."""


def test_custom_loop_resumes_after_a_kill_and_keeps_the_best_epoch(tmp_path):
    """run_epochs (the Model Garden plugins' loop): a kill during epoch 3 loses only that epoch; the
    rerun continues at epoch 3 with the trained weights, and the best epoch's weights end up restored."""
    import tensorflow as tf

    from physis.plugins import ModelConfig, ModelSpec
    from physis.train import run_epochs

    cfg = ModelConfig("loop", ModelSpec(kind="detector", framework="tf_keras", preset="p"), (8, 8, 3), {},
                      work_dir=tmp_path)
    val_auroc = {1: 0.6, 2: 0.8, 3: 0.7, 4: 0.75}  # best: epoch 2
    started = []

    def attempt(kill_at: int | None):
        weight = tf.Variable(0.0)  # a fresh "model" each process; its value counts the epochs trained

        def train_epoch(epoch):
            started.append(epoch + 1)
            if epoch + 1 == kill_at:
                raise Killed
            weight.assign_add(1.0)
            return {"loss": 1.0 / (epoch + 1)}

        run_epochs(cfg, trackables={"model": tf.train.Checkpoint(w=weight)}, train_epoch=train_epoch,
                   evaluate=lambda: {"val_auroc": val_auroc[int(weight.numpy())]}, epochs=4, patience=5)
        return float(weight.numpy())

    with pytest.raises(Killed):
        attempt(kill_at=3)
    assert pd.read_parquet(tmp_path / "history.parquet")["epoch"].tolist() == [1, 2]
    assert attempt(kill_at=None) == 2.0  # epochs 3 and 4 ran on the restored weights; then epoch 2's came back
    assert started == [1, 2, 3, 3, 4]
    assert pd.read_parquet(tmp_path / "history.parquet")["epoch"].tolist() == [1, 2, 3, 4]


def test_several_gpus_mirror_classifiers_but_not_custom_loops(monkeypatch):
    """model.fit replicates its steps over a MirroredStrategy; the detectors' loops call theirs
    directly, so they must not be built under one."""
    import tensorflow as tf

    from physis.train import distribution

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu:0", "gpu:1"])
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda: "mirrored")
    assert distribution("tf_keras", "classifier") == "mirrored"
    for kind in ("detector", "two_stage"):
        assert distribution("tf_keras", kind) is tf.distribute.get_strategy()


def test_train_hook_cannot_reach_test_films(prepared):
    """TrainData built as the train rule builds it holds train and validation rows and boxes only."""
    from physis import train

    phantom_root, base = prepared
    config = make_config(phantom_root, base, preprocess={"presets": {"tiny": PRESET}},
                         models={"custom_cnn": {"preset": "tiny"}})
    _, cfg = train.resolve("custom_cnn", config)
    manifest = pd.read_parquet(base / "data" / "manifest.parquet")
    preset_dir = base / "preprocess" / "tiny"
    data = train.train_data(cfg, manifest, preset_dir, config["train"], config["preprocess"].get("augment"))
    test_ids = set(manifest.loc[manifest["split"] == "test", "image_id"])
    all_boxes = pd.read_parquet(preset_dir / "boxes.parquet")
    assert test_ids and all_boxes["image_id"].isin(test_ids).any()  # there was something to hide

    def image_ids(value) -> set:
        """Every image id in a DataFrame, or in the DataFrames of a dict, a list or a dataclass."""
        if isinstance(value, pd.DataFrame):
            return set(value["image_id"]) if "image_id" in value else set()
        if isinstance(value, dict):
            return set().union(*map(image_ids, value.values()))
        if isinstance(value, (list, tuple)):
            return set().union(*map(image_ids, value))
        if dataclasses.is_dataclass(value):
            return image_ids([getattr(value, field.name) for field in dataclasses.fields(value)])
        return set()

    reachable = image_ids(data)
    assert set(data.frames) == {"train", "val"} and not reachable & test_ids
    # nothing the plugins need is lost: every train/val film, and all boxes of those films
    kept = set(manifest.loc[manifest["split"].isin(["train", "val"]), "image_id"])
    assert reachable == kept
    pd.testing.assert_frame_equal(data.boxes, all_boxes[all_boxes["image_id"].isin(kept)].reset_index(drop=True))
    assert sum(len(labels) for _, labels in data.val) == len(data.frames["val"])


def test_a_checkpoint_half_written_by_a_kill_does_not_stop_the_resume(tmp_path):
    """Keras 3 writes .h5 files in place: a kill while the epoch backup is being written leaves it corrupt.
    The job resumes from the backup before it, and the best weights are only ever renamed into place."""
    import keras
    import numpy as np

    from physis.train import callbacks

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), (rng.random(64) < 0.5).astype("float32")

    class Killed(Exception):
        pass

    class KillAt(keras.callbacks.Callback):
        def __init__(self, epoch):
            super().__init__()
            self.at = epoch

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == self.at:
                raise Killed

    def fit(epochs: int, kill_at: int | None = None):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile("adam", "binary_crossentropy", metrics=[keras.metrics.AUC(name="auroc")])
        extra = [] if kill_at is None else [KillAt(kill_at)]
        return model, model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0,
                                callbacks=callbacks("keras", tmp_path, patience=10) + extra)

    with pytest.raises(Killed):
        fit(4, kill_at=2)  # two epochs backed up, then the job dies
    latest = tmp_path / "checkpoints" / "main" / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[:100])  # what SIGKILL in the middle of writing it leaves
    _, history = fit(4)
    assert history.epoch == [1, 2, 3]  # resumed after epoch 1 (the backup before the broken one), not restarted
    assert (tmp_path / "best.weights.h5").is_file() and not list(tmp_path.glob(".partial.*"))
    model, _ = fit(0)
    model.load_weights(str(tmp_path / "best.weights.h5"))
