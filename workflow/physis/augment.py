"""Train-time augmentation of preprocessed films, as TensorFlow ops inside the tf.data pipeline.

Every transform draws from stateless random ops keyed by a per-film seed (see
:func:`physis.pipeline.image_dataset`), so the same seed gives the same augmented batch on any
run and any number of parallel workers. The recipe is config ``preprocess.augment``: horizontal
flip, rotation, scale, brightness, contrast and an optional elastic warp. Geometry and elastic
warps fill with black, like the letterbox border.

Flip and laterality: mirroring a left wrist gives a plausible right wrist of the same projection;
whether a physis is fractured does not depend on the side, so the label stays valid. (The burned-in
side marker is mirrored too; it carries no label information.)
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


def augment(image: tf.Tensor, seed: tf.Tensor, recipe: dict, mask: tf.Tensor | None = None):
    """One film ([H, W, 1] float32 in [0, 1]) augmented per ``recipe`` with stateless ``seed`` ([2] int).

    With a ``mask`` ([H, W, K], e.g. rasterised boxes) the geometric transforms move it with the
    film, the photometric ones leave it alone, and ``(image, mask)`` is returned.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    stack = image if mask is None else tf.concat([image, mask], axis=-1)
    if recipe["flip"]:
        stack = tf.image.stateless_random_flip_left_right(stack, seeds[0])
    if recipe["rotation"] > 0 or recipe["scale"] > 0:
        stack = _rotate_and_scale(stack, seeds[1], recipe["rotation"], recipe["scale"])
    if recipe["elastic_alpha"] > 0:
        stack = _elastic(stack, seeds[2], recipe["elastic_alpha"], recipe["elastic_spacing"])
    image = stack[..., :1]
    if recipe["brightness"] > 0:
        image = tf.image.stateless_random_brightness(image, recipe["brightness"], seeds[3])
    if recipe["contrast"] > 0:
        image = tf.image.stateless_random_contrast(image, 1 - recipe["contrast"], 1 + recipe["contrast"], seeds[4])
    image = tf.clip_by_value(image, 0.0, 1.0)
    return image if mask is None else (image, stack[..., 1:])


def _rotate_and_scale(image: tf.Tensor, seed: tf.Tensor, degrees: float, scale: float) -> tf.Tensor:
    """Rotate by U(−degrees, degrees) and zoom by U(1 − scale, 1 + scale) about the centre."""
    angle_seed, zoom_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    angle = tf.random.stateless_uniform([], angle_seed, -degrees, degrees) * (math.pi / 180)
    zoom = tf.random.stateless_uniform([], zoom_seed, 1 - scale, 1 + scale)
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # affine_transform maps output pixels to input pixels: the inverse rotation and zoom
    a0, a1 = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    b0, b1 = -tf.sin(angle) / zoom, tf.cos(angle) / zoom
    transform = tf.stack([a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, 0.0, 0.0])
    return keras.ops.image.affine_transform(image, transform, interpolation="bilinear", fill_mode="constant")


def _elastic(image: tf.Tensor, seed: tf.Tensor, alpha: float, spacing: int) -> tf.Tensor:
    """Smooth random displacement of every channel (up to about ``alpha`` pixels), interpolated
    bicubically from control points every ``spacing`` pixels."""
    shape = tf.shape(image)
    grid = tf.maximum(2, shape[:2] // spacing + 1)
    coarse = tf.random.stateless_uniform(tf.concat([grid, [2]], 0), seed, -alpha, alpha)
    shift = tf.image.resize(coarse, shape[:2], method="bicubic")
    rows, cols = tf.meshgrid(tf.range(shape[0], dtype=tf.float32), tf.range(shape[1], dtype=tf.float32),
                             indexing="ij")
    coordinates = tf.stack([rows + shift[..., 0], cols + shift[..., 1]])
    channels = tf.unstack(image, num=image.shape[-1], axis=-1)
    return tf.stack([keras.ops.image.map_coordinates(channel, coordinates, order=1, fill_mode="constant")
                     for channel in channels], axis=-1)
