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


def _films(part: pd.DataFrame, size: tuple[int, int], *, training: bool, seed: int, cache: bool
           ) -> tf.data.Dataset:
    """(image, label) for ``part``: shuffled each epoch when training (paths before decoding, or
    the cached images when caching), in file order otherwise."""
    films = tf.data.Dataset.from_tensor_slices((part["path"].astype(str).tolist(),
                                                part["label"].astype("float32").to_numpy()))
    if cache:
        films = films.map(lambda path, label: (decode(path, size), label),
                          num_parallel_calls=tf.data.AUTOTUNE).cache()
    if training:
        films = films.shuffle(len(part), seed=seed, reshuffle_each_iteration=True)
    if not cache:
        films = films.map(lambda path, label: (decode(path, size), label), num_parallel_calls=tf.data.AUTOTUNE)
    return films


def image_dataset(frame: pd.DataFrame, channels: int, batch_size: int, *, training: bool, seed: int,
                  augment: dict | None = None, cache: bool = False, balance: str = "none") -> tf.data.Dataset:
    """Batches of (images [B, H, W, channels] float32 in [0, 1], labels [B] float32).

    ``frame`` needs ``path`` (preprocessed PNG) and ``label`` (0/1). One pass per epoch (no
    repeat). ``training``: shuffle and, with an ``augment`` recipe (config
    ``preprocess.augment``), augment; ``balance="sampling"`` then draws each film of the epoch
    from either class with equal probability. ``"weights"`` leaves the data as it is (pass
    :func:`class_weights` to the loss). Without ``training`` none of this happens.
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
            [_films(part, size, training=True, seed=seed + k, cache=cache).repeat() for k, part in enumerate(parts)],
            weights=[0.5, 0.5], seed=seed, rerandomize_each_iteration=True).take(len(frame))
    else:
        films = _films(frame, size, training=training, seed=seed, cache=cache)
    if training and augment is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        films = tf.data.Dataset.zip(films, seeds).map(
            lambda film, key: (augment_film(film[0], tf.stack([key, tf.constant(seed, tf.int64)]), augment), film[1]),
            num_parallel_calls=tf.data.AUTOTUNE)
    if channels == 3:
        films = films.map(lambda image, label: (tf.image.grayscale_to_rgb(image), label),
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
