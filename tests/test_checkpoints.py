"""Pretrained starts, offline: Model Garden ``init_checkpoint`` (physis.checkpoints) and Keras
``weights`` files.

The stand-in for a public checkpoint is one physis writes here: a tiny model trained one step (or
freshly built, where its random values differ from the model restored into), saved in the layout
the Model Garden trainers write (top-level ``model`` and ``backbone``). Restored variables must be
bit-equal to the saved ones, the rest untouched; what does not fit must fail naming the variables;
a frozen backbone must not move; a resumed job must keep its own progress.
"""

import itertools

import numpy as np
import pandas as pd
import pytest
from test_garden import DETECTOR_PARAMS, marker_films

from physis import checkpoints, garden, plugins
from physis.plugins import ModelConfig, ModelSpec, PluginError, TrainData
from physis.train import callbacks, fit_classifier, run_epochs, seed_everything

REGISTRY = plugins.discover()
SHAPE = (128, 128, 3)  # SpineNet's smallest input: a multiple of 2^7


def values(variables) -> list[np.ndarray]:
    return [v.numpy() for v in variables]


def equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def others(model, part) -> list:
    """The variables of ``model`` that are not ``part``'s (the head, for a backbone)."""
    inside = {id(v) for v in part.variables}
    return [v for v in model.variables if id(v) not in inside]


def write_garden_checkpoint(model, path) -> str:
    """What a Model Garden trainer saves: ``model`` plus its ``checkpoint_items`` (``backbone``, …)."""
    import tensorflow as tf

    return tf.train.Checkpoint(model=model, **model.checkpoint_items).write(str(path))


# --------------------------------------------------------------------------- parameters and paths


def test_no_checkpoint_is_the_default_and_modules_are_checked():
    assert checkpoints.requested({"init_checkpoint": "none"}) is None
    assert checkpoints.requested({"init_checkpoint": "/ckpt", "init_checkpoint_modules": "all"}) == ("/ckpt", "all")
    with pytest.raises(ValueError, match="init_checkpoint_modules 'decoder' is not one of backbone, all"):
        checkpoints.requested({"init_checkpoint": "/ckpt", "init_checkpoint_modules": "decoder"})


def test_paths_tensorflow_cannot_read_are_named(tmp_path):
    with pytest.raises(checkpoints.CheckpointMismatch, match="https://example.org/r.tar.gz: TensorFlow's file "
                                                             "system cannot read it .*https"):
        checkpoints.resolve("https://example.org/r.tar.gz")
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"no checkpoint there \(no .*missing/ckpt.index"):
        checkpoints.resolve(str(tmp_path / "missing" / "ckpt"))
    with pytest.raises(checkpoints.CheckpointMismatch, match="a folder without a 'checkpoint' file"):
        checkpoints.resolve(str(tmp_path))


# --------------------------------------------------------------------------- the SpineNet-49 classifier


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints to start from: a classifier trained one step (Model Garden layout, and physis's
    own loop layout: ``model`` only), a 3-class ClassificationModel (like an ImageNet head: another
    size), another architecture, and a name-based (TF1) one."""
    import tensorflow as tf
    import tf_keras
    from official.vision.configs import backbones, common
    from official.vision.configs.image_classification import ImageClassificationModel
    from official.vision.modeling import factory

    folder = tmp_path_factory.mktemp("checkpoints")
    seed_everything(0)
    trained = garden.spinenet_classifier(SHAPE)
    with tf.GradientTape() as tape:  # one training step, eager (tracing one would take longer)
        loss = tf_keras.losses.BinaryCrossentropy()([[0.0], [1.0]], trained(tf.random.uniform([2, *SHAPE]),
                                                                             training=True))
    gradients = tape.gradient(loss, trained.trainable_variables)
    tf_keras.optimizers.Adam(1e-3).apply_gradients(
        [(g, v) for g, v in zip(gradients, trained.trainable_variables) if g is not None])
    inner = garden.classification_model(trained)
    paths = {"trained": write_garden_checkpoint(inner, folder / "trained" / "ckpt"),
             "loop": tf.train.Checkpoint(model=inner).write(str(folder / "loop" / "ckpt"))}
    three = factory.build_classification_model(
        tf_keras.layers.InputSpec(shape=[None, *SHAPE]),
        ImageClassificationModel(num_classes=3, input_size=list(SHAPE), backbone=backbones.Backbone(
            type="spinenet", spinenet=backbones.SpineNet(model_id="49")),
            norm_activation=common.NormActivation(use_sync_bn=False)))
    paths["three_classes"] = write_garden_checkpoint(three, folder / "three" / "ckpt")
    other = tf_keras.Sequential([tf_keras.layers.Conv2D(4, 3, input_shape=(8, 8, 3), name="other_conv")])
    paths["other"] = tf.train.Checkpoint(model=other, backbone=other).write(str(folder / "other" / "ckpt"))
    paths["tf1"] = tf.compat.v1.train.Saver({v.name[:-2]: v for v in other.variables}).save(
        None, str(folder / "tf1" / "model.ckpt"))
    return paths, {"backbone": values(inner.backbone.variables), "all": values(inner.variables),
                   "head": values(others(inner, inner.backbone))}


def test_backbone_checkpoint_restores_the_backbone_and_leaves_the_head_fresh(saved):
    paths, trained = saved
    model = garden.spinenet_classifier(SHAPE)
    inner = garden.classification_model(model)
    fresh_head = values(others(inner, inner.backbone))
    assert not equal(fresh_head, trained["head"])  # trained one step: the checkpoint's head differs
    garden.restore_classifier(model, paths["trained"], "backbone")
    assert equal(values(inner.backbone.variables), trained["backbone"])
    assert equal(values(others(inner, inner.backbone)), fresh_head)
    garden.restore_classifier(model, paths["trained"], "all")
    assert equal(values(inner.variables), trained["all"])


def test_what_does_not_fit_fails_naming_the_variables(saved):
    paths, trained = saved
    model = garden.spinenet_classifier(SHAPE)
    inner = garden.classification_model(model)
    before = values(inner.variables)
    with pytest.raises(checkpoints.CheckpointMismatch) as error:
        garden.restore_classifier(model, paths["other"], "backbone")
    message = str(error.value)
    assert "does not fit the SpineNet-49 classifier (init_checkpoint_modules: backbone)" in message
    assert "650 of 650 variables would not be restored" in message
    assert "not in the checkpoint: backbone/layer_with_weights-1/gamma (" in message  # object path + name + shape
    assert "of another shape: backbone/layer_with_weights-0/kernel (" in message  # the stem conv
    assert "model (7, 7, 3, 64), checkpoint (3, 3, 3, 4)" in message
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"2 of 652 variables would not be restored\n"
                                                             r"  2 of another shape: .*model \(256, 1\), checkpoint "
                                                             r"\(256, 3\).*model \(1,\), checkpoint \(3,\)"):
        garden.restore_classifier(model, paths["three_classes"], "all")  # a head of another size
    with pytest.raises(checkpoints.CheckpointMismatch, match="a name-based \\(TF1\\) checkpoint"):
        garden.restore_classifier(model, paths["tf1"], "all")
    assert equal(values(inner.variables), before)  # nothing was loaded by the failed attempts
    garden.restore_classifier(model, paths["three_classes"], "backbone")  # its backbone fits
    garden.restore_classifier(model, paths["loop"], "backbone")  # from inside ``model``
    assert equal(values(inner.backbone.variables), trained["backbone"])


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands in for SIGKILL or a SLURM time limit."""


def test_a_resumed_custom_loop_keeps_its_progress_instead_of_the_initial_checkpoint(tmp_path):
    import tensorflow as tf

    cfg = ModelConfig("loop", ModelSpec(kind="detector", framework="tf_keras", preset="p"), (8, 8, 3), {},
                      work_dir=tmp_path)
    initialised = []

    def attempt(kill_at: int | None) -> float:
        weight = tf.Variable(0.0)  # a fresh build; the initial checkpoint sets 100

        def initialize():
            initialised.append(True)
            weight.assign(100.0)

        def train_epoch(epoch):
            if epoch + 1 == kill_at:
                raise Killed
            weight.assign_add(1.0)
            return {}

        run_epochs(cfg, trackables={"model": tf.train.Checkpoint(w=weight)}, train_epoch=train_epoch,
                   evaluate=lambda: {"val_auroc": float(weight.numpy())}, epochs=3, patience=5,
                   initialize=initialize)
        return float(weight.numpy())

    with pytest.raises(Killed):
        attempt(kill_at=2)
    assert attempt(kill_at=None) == 103.0  # 100 + epoch 1 (restored) + epochs 2 and 3
    assert initialised == [True]  # the fresh start only


def tiny_keras_classifier():
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head_score")(x))


def test_a_job_resumed_after_the_frozen_phase_continues_from_it_not_from_the_initial_weights(tmp_path):
    import keras
    import tensorflow as tf

    seed_everything(0)
    images = np.random.default_rng(0).random((8, 16, 16, 3), np.float32)
    batches = tf.data.Dataset.from_tensor_slices((images, np.array([0, 1] * 4, np.float32))).batch(4)
    data = TrainData(train=batches, val=batches, frames={}, boxes=None, class_weight=None, preset_dir=tmp_path)
    spec = ModelSpec(kind="classifier", framework="keras", preset="p")
    cfg = ModelConfig("tiny", spec, (16, 16, 3), {"epochs": 3, "learning_rate": 0.05, "patience": 5, "weights":
                      "pretend.weights.h5", "frozen_epochs": 1, "finetune_lr_factor": 0.1}, work_dir=tmp_path)
    initialised = []

    class KillMainPhase(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise Killed

    model = tiny_keras_classifier()
    initial = model.get_weights()  # the "pretrained" start a build gives
    with pytest.raises(Killed):
        fit_classifier(model, data, cfg, callbacks("keras", tmp_path, 5) + [KillMainPhase()],
                       initialize=lambda: initialised.append(True))
    after_frozen = model.get_weights()
    conv, head = slice(0, 2), slice(2, 4)
    assert equal(after_frozen[conv], initial[conv]) and not equal(after_frozen[head], initial[head])

    started = []

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            started.append(self.model.get_weights())

    rebuilt = tiny_keras_classifier()
    rebuilt.set_weights(initial)  # a new process builds the pretrained start again
    fit_classifier(rebuilt, data, cfg, callbacks("keras", tmp_path, 5) + [Record()],
                   initialize=lambda: initialised.append(True))
    assert initialised == [True]  # the initial weights were applied on the fresh start only
    assert len(started) == 1 and equal(started[0], after_frozen)  # the main phase began where the frozen one ended
    assert not equal(rebuilt.get_weights()[conv], initial[conv])  # and fine-tuned the backbone
    assert pd.read_parquet(tmp_path / "history.parquet")["epoch"].tolist() == [1, 2, 3]


# --------------------------------------------------------------------------- Keras weights files


def keras_cfg(name: str, **params) -> ModelConfig:
    plugin = REGISTRY[name]
    return ModelConfig(name, plugin.spec, (64, 64, 3), {**plugin.spec.params, **params})


def test_a_local_keras_weights_file_loads_offline_and_a_misfit_names_file_and_layers(tmp_path):
    import keras

    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3), alpha=0.35)
    path = tmp_path / "mobilenetv2_notop.weights.h5"
    source.save_weights(path)
    build = REGISTRY["mobilenetv2"].hook("build")
    model = build(keras_cfg("mobilenetv2", alpha=0.35, weights=str(path)))
    assert equal(model.get_weights()[:len(source.weights)], source.get_weights())

    with pytest.raises(PluginError, match=rf"model 'mobilenetv2': weights file {path} does not fit "
                                          r".*first: block_1_project.*block_1_project: model \(1, 1, 48, 16\), "
                                          r"file \(1, 1, 48, 8\)"):
        build(keras_cfg("mobilenetv2", alpha=0.5, weights=str(path)))
    with pytest.raises(PluginError, match=rf"model 'resnet50': weights file {path} does not fit resnet50: "
                                          r"\d+ layers do not fit; first: conv1_conv"):
        REGISTRY["resnet50"].hook("build")(keras_cfg("resnet50", weights=str(path)))
    with pytest.raises(PluginError, match="weights file .*nowhere.weights.h5 does not exist"):
        build(keras_cfg("mobilenetv2", alpha=0.35, weights=str(tmp_path / "nowhere.weights.h5")))


# --------------------------------------------------------------------------- detectors


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    folder = tmp_path_factory.mktemp("films")
    frame, boxes = marker_films(folder, n=4)
    return TrainData(train=None, val=None, frames={"train": frame}, boxes=boxes, class_weight=None,
                     preset_dir=folder)


@pytest.mark.slow  # a RetinaNet build, a detection trace and two traced steps: about a minute of CPU
def test_a_detector_fine_tunes_from_its_checkpoint_with_a_frozen_backbone_and_resumes_without_it(
        saved, films, tmp_path, monkeypatch):
    import tensorflow as tf

    paths, trained = saved  # the classifier's SpineNet-49 fits RetinaNet's backbone, as an ImageNet one would
    plugin = REGISTRY["retinanet_spinenet"]
    rising = itertools.count(0.5, 0.1)  # validation stand-in: every epoch better, so the last one is kept
    monkeypatch.setattr(garden.DetectorLoop, "evaluate", lambda self: {"val_auroc": next(rising)})
    restored, entered = [], []
    restore_initial, train_epoch = garden.VisionDetector.restore_initial, garden.DetectorLoop.train_epoch
    monkeypatch.setattr(garden.VisionDetector, "restore_initial",
                        lambda self, *args: (restored.append(args), restore_initial(self, *args)))
    monkeypatch.setattr(garden.DetectorLoop, "train_epoch",
                        lambda self, epoch: (entered.append(values(self.detector.model.variables)),
                                             train_epoch(self, epoch))[1])

    def job(model, epochs: int) -> None:
        params = {**plugin.spec.params, "epochs": epochs, "steps_per_epoch": 1, "batch_size": 2,
                  "scale_jitter": [1.0, 1.0], "init_checkpoint": paths["trained"], "frozen_epochs": 1}
        cfg = ModelConfig("retinanet_spinenet", plugin.spec, SHAPE, params, seed=0, work_dir=tmp_path / "job")
        plugin.hook("train")(model, films, cfg, [])
        model.backbone.trainable = True  # lists the variables in their usual order again (freezing reorders them)

    seed_everything(0)
    cfg = ModelConfig("retinanet_spinenet", plugin.spec, SHAPE, dict(plugin.spec.params), work_dir=tmp_path / "job")
    model = plugin.hook("build")(cfg)
    garden._detector("retinanet", model, cfg).ensure_built()
    fresh_head = values(others(model, model.backbone))
    job(model, epochs=1)  # the frozen phase
    assert restored == [(paths["trained"], "backbone")]
    assert equal(values(model.backbone.variables), trained["backbone"])  # restored, then frozen: bit-equal
    changed = [not np.array_equal(v.numpy(), f) for v, f in zip(others(model, model.backbone), fresh_head)
               if v.trainable]
    assert any(changed)  # the head was not restored, and trained (what had a gradient in the one step)

    after_epoch_1 = values(model.variables)
    for v in model.variables:  # as a new process builds it: nothing of the job's progress
        v.assign(tf.zeros_like(v))
    job(model, epochs=2)  # resumed from the job's own checkpoint
    assert restored == [(paths["trained"], "backbone")]  # not loaded again
    assert equal(entered[-1], after_epoch_1)  # epoch 2 began where epoch 1 ended
    assert not equal(values(model.backbone.variables), trained["backbone"])  # and fine-tuned the backbone
    assert pd.read_parquet(tmp_path / "job" / "history.parquet")["epoch"].tolist() == [1, 2]


@pytest.mark.slow  # one ShapeMask build (train and eval models) and a traced step: about a minute of CPU
def test_shapemask_loads_the_legacy_way_and_freezes_its_spinenet(films, tmp_path):
    import tensorflow as tf
    import tf_keras

    seed_everything(0)
    tf_keras.backend.clear_session()  # layer names as in a train job, where the ShapeMask is built first
    detector = garden.ShapeMaskDetector(SHAPE[:2], SHAPE[:2], {**DETECTOR_PARAMS, "predict_batch_size": 2}, 2)
    model, backbone = detector.model, detector.backbone
    saved = {id(v): v.numpy() for v in model.variables}  # by variable: freezing reorders the lists
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "loop" / "ckpt"))  # the legacy executor's layout
    for v in model.variables:
        v.assign(tf.zeros_like(v))
    detector.restore_initial(path, "backbone")
    assert all(np.array_equal(v.numpy(), saved[id(v)]) for v in backbone.variables)
    assert not any(np.any(v.numpy()) for v in others(model, backbone))  # the rest untouched
    detector.restore_initial(path, "all")
    assert all(np.array_equal(v.numpy(), saved[id(v)]) for v in model.variables)

    # name-based (TF1) checkpoints go through the legacy checkpoint_utils, whose suffix matching
    # cannot tell the legacy SpineNet's unscoped names apart: an error, not a partial load
    named = tf.compat.v1.train.Saver({v.name[:-2]: v for v in model.variables}).save(None, str(tmp_path / "tf1" / "m"))
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"does not fit ShapeMask .*conv2d/kernel"):
        detector.restore_initial(named, "backbone")
    other = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,), name="other_dense")])
    foreign = tf.compat.v1.train.Saver({v.name[:-2]: v for v in other.variables}).save(None, str(tmp_path / "x" / "m"))
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"(?s)\d+ of 892 variables .*not in the checkpoint: "
                                                             r".*holds 2 named tensors, e.g. other_dense/bias"):
        detector.restore_initial(foreign, "all")

    loop = garden.DetectorLoop(detector, films, tmp_path, batch_size=2, steps=1, learning_rate=1e-3,
                               optimizer_name="adam", clip_norm=1.0, train_boxes="all", seed=0, frozen_epochs=1)
    loop.train_epoch(0)
    assert all(np.array_equal(v.numpy(), saved[id(v)]) for v in backbone.variables)  # batch-norm statistics too
    assert any(not np.array_equal(v.numpy(), saved[id(v)]) for v in others(model, backbone) if v.trainable)
