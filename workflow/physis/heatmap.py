"""Box-supervised heat-map classifiers: a fracture map trained on the boxes, its maximum the score.

An image-level label gives a classifier one bit per film; on a few hundred films a network
memorises them before it finds a two-pixel fracture line (the Keras classifiers do exactly that
on the phantom). Supervising every position of a coarse map with the fracture boxes gives it
hundreds of located examples per film instead, including the hard negatives: the boxes of
non-physeal fractures are 0 on the physeal map. The image score is the map's maximum, so the
model stays a classifier with one sigmoid output (predict, evaluate, export and ``physis predict``
unchanged) and its explanation is its own map. After Li et al., "Thoracic Disease Identification and
Localization with Limited Supervision", CVPR 2018.

A plugin builds a model whose output ``score`` is the global maximum of a sigmoid map layer named
:data:`HEAT_LAYER` (:func:`map_head` puts one on any backbone's last feature map); :func:`fit` is its
``train`` hook and :func:`explain` its ``explain`` hook. The Keras classifier plugins take the
parameter ``supervision: boxes`` to become such a model (:func:`physis.keras_models.classifier`).
"""

from __future__ import annotations

import logging

from physis import plugins as registry
from physis.plugins import Explanation, ModelConfig, TrainData

log = logging.getLogger(__name__)

HEAT_LAYER = "head_heat"
BOX_CLASS = "fracture"
#: The loss weights of a plugin without ``heat_weight`` / ``cell_weight`` parameters (heatmap_cnn's defaults).
HEAT_WEIGHT, CELL_WEIGHT = 10.0, 20.0
#: What trains a Keras classifier (its ``supervision`` parameter): one label per film, or the fracture boxes.
SUPERVISION = ("labels", "boxes")


def box_supervised(cfg: ModelConfig) -> bool:
    """Whether the model's ``supervision`` parameter asks for the box-supervised map head."""
    value = cfg.params.get("supervision", "labels")
    if value not in SUPERVISION:
        raise registry.PluginError(f"model {cfg.name!r}: supervision must be one of {', '.join(SUPERVISION)}, "
                                   f"got {value!r}")
    return value == "boxes"


def map_head(inputs, features, name: str):
    """A model scoring films by the maximum of a 1×1-convolution sigmoid map on ``features`` (a 4-D
    feature map of ``inputs``): the head that :func:`fit` trains on the boxes."""
    import keras
    from keras import layers

    heat = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=HEAT_LAYER)(features)
    score = layers.Reshape((1,), name="head_score")(layers.GlobalMaxPooling2D(name="head_pool")(heat))
    return keras.Model(inputs, score, name=name)


def grid_stride(model) -> int:
    """Input pixels per map cell (the same along both axes), from the built model's shapes."""
    height, width = model.input_shape[1:3]
    map_height, map_width = model.get_layer(HEAT_LAYER).output.shape[1:3]
    stride = int(round(height / map_height))
    if (-(-height // stride), -(-width // stride)) != (map_height, map_width):
        raise registry.PluginError(f"heat map {map_height}x{map_width} is not the {height}x{width} input "
                                   f"divided by one stride (use 'same' padding in every layer)")
    return stride


def _maximum(tensor):
    from keras import ops

    return ops.max(tensor, axis=(1, 2, 3))


def _metrics():
    """AUROC and accuracy of the image scores (map maxima), logged as ``auroc`` and ``accuracy``."""
    import keras

    class MapAUC(keras.metrics.AUC):
        def update_state(self, y_true, y_pred, sample_weight=None):
            super().update_state(_maximum(y_true), _maximum(y_pred), sample_weight)

    class MapAccuracy(keras.metrics.BinaryAccuracy):
        def update_state(self, y_true, y_pred, sample_weight=None):
            super().update_state(_maximum(y_true), _maximum(y_pred), sample_weight)

    return [MapAUC(name="auroc"), MapAccuracy(name="accuracy")]


def loss(class_weight: dict[int, float] | None, heat_weight: float, cell_weight: float):
    """Per film: ``heat_weight`` × the mean cross-entropy of the map's cells, a fracture cell
    counting ``cell_weight`` times (they are few: about 1 in 100 on the phantom), + the image's
    class-weighted cross-entropy between the map maxima."""
    import keras
    from keras import ops

    weights = class_weight or {0: 1.0, 1: 1.0}

    def heatmap_loss(y_true, y_pred):
        cells = keras.losses.binary_crossentropy(y_true, y_pred)  # [B, h, w]: the channel axis reduced
        dense = ops.mean(cells * (1.0 + (cell_weight - 1.0) * y_true[..., 0]), axis=(1, 2))
        label, score = _maximum(y_true), _maximum(y_pred)
        image = keras.losses.binary_crossentropy(label[:, None], score[:, None])
        weight = label * weights[1] + (1.0 - label) * weights[0]
        return heat_weight * dense + weight * image

    return heatmap_loss


def fit(model, data: TrainData, cfg: ModelConfig, callbacks_: list) -> None:
    """Train ``model``'s map on the ``fracture`` boxes of the positive films (a ``train`` hook).

    Positive films without a fracture box cannot say where the fracture is: they are left out of
    training (logged). The framework's callbacks watch ``val_auroc`` of the image scores. Class
    balance as configured: the image loss's class weights, or balanced sampling of the films.
    """
    import keras

    from physis import pipeline

    params = cfg.params
    stride = grid_stride(model)
    boxes = data.boxes[data.boxes["class"] == BOX_CLASS]
    datasets = {}
    for split in ("train", "val"):
        frame = data.frames[split]
        unboxed = (frame["label"] == 1) & ~frame["image_id"].isin(boxes["image_id"])
        if unboxed.any():
            log.warning("%s: %d positive %s films have no %s box: left out of the map's %s data",
                        cfg.name, int(unboxed.sum()), split, BOX_CLASS, split)
        datasets[split] = pipeline.image_dataset(
            frame[~unboxed], cfg.spec.channels, int(params["batch_size"]), training=split == "train",
            seed=cfg.seed, augment=data.augment if split == "train" else None, cache=data.cache,
            balance=data.balance if split == "train" else "none", boxes=boxes, stride=stride)
    with model.distribute_strategy.scope():
        trainer = keras.Model(model.inputs, model.get_layer(HEAT_LAYER).output, name=f"{model.name}_map")
        trainer.compile(optimizer=keras.optimizers.Adam(float(params["learning_rate"])),
                        loss=loss(data.class_weight, float(params.get("heat_weight", HEAT_WEIGHT)),
                                  float(params.get("cell_weight", CELL_WEIGHT))),
                        metrics=_metrics())
    # the trainer shares every layer (and so every weight) with ``model``: the framework's
    # checkpoints of the trainer restore into the saved one-output model
    trainer.fit(datasets["train"], validation_data=datasets["val"], epochs=int(params["epochs"]),
                callbacks=callbacks_, verbose=2)


def explain(model, image, cfg: ModelConfig) -> Explanation:
    """The model's own fracture map over ``image``, upsampled to its pixels."""
    import keras
    import numpy as np
    import tensorflow as tf

    pixels = np.asarray(image, dtype="float32")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    mapper = keras.Model(model.inputs, model.get_layer(HEAT_LAYER).output)
    heat = mapper(pixels[None], training=False)
    heat = tf.image.resize(heat, pixels.shape[:2], method="bilinear")[0, ..., 0].numpy()
    return Explanation(heatmap=np.clip(heat, 0.0, 1.0))
