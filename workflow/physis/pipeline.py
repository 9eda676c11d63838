"""The training input pipeline: preprocessed PNGs → batched tf.data for Keras 3 and tf_keras alike.

Reads the preprocess stage's single-channel PNGs (8- or 16-bit) in parallel, optionally caches the
decoded films in memory after the first epoch, shuffles and augments training films (seeded;
:mod:`physis.augment`), replicates grey to three channels for ImageNet-style networks, batches and
prefetches. Validation and test films keep file order and are never augmented.

Determinism: shuffling, class-balanced sampling and the per-film augmentation seeds come from
seeded tf.data ops that re-randomise each epoch along a fixed sequence, and augmentation uses
stateless ops keyed by those seeds, so the same seed gives identical batches in every run.
Class imbalance: :func:`class_weights` for a weighted loss, or ``balance="sampling"``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from physis.augment import augment as augment_film

BALANCE = ("none", "weights", "sampling")


def decode(path: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """One PNG as [height, width, 1] float32 in [0, 1] (decoded as 16-bit, so 16-bit depth survives).

    ``size`` (height, width) is checked: a preset's films all have the network input size.
    """
    png = tf.io.decode_png(tf.io.read_file(path), channels=1, dtype=tf.uint16)
    return tf.ensure_shape(tf.image.convert_image_dtype(png, tf.float32), [*size, 1])


def class_weights(labels) -> dict[int, float]:
    """Balanced loss weights {0: w0, 1: w1} (n / (2 · n_class), scikit-learn's ``balanced``)."""
    labels = np.asarray(labels).astype(int)
    present = set(np.unique(labels))
    if present != {0, 1}:
        raise ValueError(f"class weights need both classes, got labels {sorted(present)}")
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return {0: float(weights[0]), 1: float(weights[1])}


def _box_corners(frame: pd.DataFrame, boxes: pd.DataFrame) -> tf.RaggedTensor:
    """Per film of ``frame``: the (x0, y0, x1, y1) pixel corners of its ``boxes`` when it is
    positive (label 1), none when it is negative: [films, (boxes), 4]."""
    by_film = {image_id: part[["x", "y", "w", "h"]].to_numpy("float32") for image_id, part in boxes.groupby("image_id")}
    empty = np.zeros((0, 4), "float32")
    corners = [by_film.get(image_id, empty) if label == 1 else empty
               for image_id, label in zip(frame["image_id"], frame["label"])]
    values = np.concatenate(corners) if corners else empty
    values[:, 2:] += values[:, :2]
    return tf.RaggedTensor.from_row_lengths(values, [len(c) for c in corners])


def rasterise(corners: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """[H, W, 1] float32 mask: 1 at pixels whose centre lies inside any of the boxes ``corners`` [n, 4]."""
    rows = tf.range(size[0], dtype=tf.float32)[None, :, None] + 0.5
    cols = tf.range(size[1], dtype=tf.float32)[None, None, :] + 0.5
    x0, y0, x1, y1 = (corners[:, k, None, None] for k in range(4))
    inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return tf.cast(tf.reduce_any(inside, axis=0), tf.float32)[..., None]


def _films(part: pd.DataFrame, size: tuple[int, int], *, training: bool, seed: int, cache: bool,
           boxes: pd.DataFrame | None) -> tf.data.Dataset:
    """(image, target) for ``part``: the label, or with ``boxes`` the positive films' box mask.
    Shuffled each epoch when training (paths before decoding, or the cached images when caching),
    in file order otherwise."""
    if boxes is None:
        targets = part["label"].astype("float32").to_numpy()
        load = lambda path, label: (decode(path, size), label)  # noqa: E731
    else:
        targets = _box_corners(part, boxes)
        load = lambda path, corners: (decode(path, size), rasterise(corners, size))  # noqa: E731
    films = tf.data.Dataset.from_tensor_slices((part["path"].astype(str).tolist(), targets))
    if cache:
        films = films.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        films = films.shuffle(len(part), seed=seed, reshuffle_each_iteration=True)
    if not cache:
        films = films.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return films


def image_dataset(frame: pd.DataFrame, channels: int, batch_size: int, *, training: bool, seed: int,
                  augment: dict | None = None, cache: bool = False, balance: str = "none",
                  boxes: pd.DataFrame | None = None, stride: int = 1) -> tf.data.Dataset:
    """Batches of (images [B, H, W, channels] float32 in [0, 1], labels [B] float32).

    ``frame`` needs ``path`` (preprocessed PNG) and ``label`` (0/1). One pass per epoch (no
    repeat). ``training``: shuffle and, with an ``augment`` recipe (config
    ``preprocess.augment``), augment; ``balance="sampling"`` then draws each film of the epoch
    from either class with equal probability. ``"weights"`` leaves the data as it is (pass
    :func:`class_weights` to the loss). Without ``training`` none of this happens.

    With ``boxes`` (image_id, x, y, w, h in the films' pixels) the targets are masks instead of
    labels: [B, ⌈H/stride⌉, ⌈W/stride⌉, 1], 1 where a box of a positive film covers any pixel of
    the cell (max pooling), 0 elsewhere and on every negative film. Augmentation moves the boxes
    with the film.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}, got {balance!r}")
    if frame.empty:
        raise ValueError("no films to feed")
    with Image.open(frame["path"].iloc[0]) as first:
        size = (first.height, first.width)
    if training and balance == "sampling":
        parts = [frame[frame["label"] == label] for label in (0, 1)]
        if any(part.empty for part in parts):
            raise ValueError("balanced sampling needs films of both classes")
        films = tf.data.Dataset.sample_from_datasets(
            [_films(part, size, training=True, seed=seed + k, cache=cache, boxes=boxes).repeat()
             for k, part in enumerate(parts)],
            weights=[0.5, 0.5], seed=seed, rerandomize_each_iteration=True).take(len(frame))
    else:
        films = _films(frame, size, training=training, seed=seed, cache=cache, boxes=boxes)
    if training and augment is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

        def augmented(film, key):
            image, target = film
            key = tf.stack([key, tf.constant(seed, tf.int64)])
            if boxes is None:
                return augment_film(image, key, augment), target
            return augment_film(image, key, augment, mask=target)

        films = tf.data.Dataset.zip(films, seeds).map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    if boxes is not None and stride > 1:
        films = films.map(lambda image, mask: (image, tf.nn.max_pool2d(mask[None], stride, stride, "SAME")[0]),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if channels == 3:
        films = films.map(lambda image, target: (tf.image.grayscale_to_rgb(image), target),
                          num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return films.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def film_images(frame: pd.DataFrame, channels: int, batch_size: int) -> tf.data.Dataset:
    """``frame``'s films in file order as image batches only (no label column needed): what the
    predict hooks and the detectors' own evaluation read."""
    def image_only(images, _labels):
        return images

    labelled = frame if "label" in frame else frame.assign(label=0)
    return image_dataset(labelled, channels, batch_size, training=False, seed=0).map(image_only)
