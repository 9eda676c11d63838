"""The training input pipeline: determinism, no augmentation outside training, balance, depth, Keras feeds."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from physis import config
from physis.pipeline import class_weights, image_dataset

AUGMENT = config.load()["preprocess"]["augment"]


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> pd.DataFrame:
    """Twenty 8-bit 32 × 16 films with distinct content, 4 positives."""
    folder = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(20):
        pixels = rng.integers(0, 256, (32, 16)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
        rows.append({"path": str(folder / f"{k}.png"), "label": int(k % 5 == 0)})
    return pd.DataFrame(rows)


def first_batch(frame, **kwargs):
    images, labels = next(iter(image_dataset(frame, 1, 8, **kwargs)))
    return images.numpy(), labels.numpy()


def stored(frame) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path), np.float32) / 255 for path in frame["path"]])[..., None]


def same(a, b) -> bool:
    """Equal up to float32 rounding (TensorFlow scales 8-bit PNGs by 257 / 65535, not 1 / 255)."""
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-6)


def test_same_seed_gives_the_same_augmented_batch_and_another_seed_does_not(films):
    a, _ = first_batch(films, training=True, seed=3, augment=AUGMENT)
    b, _ = first_batch(films, training=True, seed=3, augment=AUGMENT)
    c, _ = first_batch(films, training=True, seed=4, augment=AUGMENT)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_training_augments_and_each_epoch_differs(films):
    dataset = image_dataset(films, 1, 20, training=True, seed=3, augment=AUGMENT)
    first, second = (next(iter(dataset))[0].numpy() for _ in range(2))
    assert not np.array_equal(first, second)
    originals = stored(films)
    assert not any(same(image, original) for image in first for original in originals)
    assert first.min() >= 0 and first.max() <= 1


def test_validation_is_never_augmented_nor_shuffled(films):
    images, labels = first_batch(films, training=False, seed=3, augment=AUGMENT, cache=True)
    assert same(images, stored(films)[:8])
    assert np.array_equal(labels, films["label"].to_numpy()[:8])


def test_an_empty_recipe_leaves_films_unchanged_but_shuffled(films):
    still = {**AUGMENT, "flip": False, "rotation": 0, "scale": 0, "brightness": 0, "contrast": 0}
    images = np.concatenate([x.numpy() for x, _ in image_dataset(films, 1, 8, training=True, seed=1, augment=still)])
    originals = stored(films)
    assert not same(images, originals)
    assert all(sum(same(image, original) for original in originals) == 1 for image in images)


def test_elastic_warp_is_seeded(films):
    elastic = {**AUGMENT, "elastic_alpha": 3, "elastic_spacing": 8}
    a, _ = first_batch(films, training=True, seed=5, augment=elastic)
    b, _ = first_batch(films, training=True, seed=5, augment=elastic)
    plain, _ = first_batch(films, training=True, seed=5, augment=AUGMENT)
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


def test_three_channels_replicate_grey(films):
    images, _ = next(iter(image_dataset(films, 3, 4, training=False, seed=0)))
    assert images.shape == (4, 32, 16, 3)
    assert np.array_equal(images[..., 0], images[..., 2])


def test_balanced_sampling_draws_both_classes_equally(films):
    many = pd.concat([films] * 10, ignore_index=True)  # 200 films, 20 % positive
    labels = np.concatenate([y.numpy() for _, y in image_dataset(many, 1, 50, training=True, seed=0,
                                                                  balance="sampling", cache=True)])
    assert len(labels) == len(many)
    assert 0.4 < labels.mean() < 0.6


def test_class_weights_are_balanced():
    weights = class_weights([0, 0, 0, 1])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    with pytest.raises(ValueError, match="both classes"):
        class_weights([0, 0])


def test_16_bit_films_keep_their_depth(tmp_path):
    pixels = (np.arange(32 * 16, dtype=np.uint32) * 97 % 65536).astype(np.uint16).reshape(32, 16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    images, _ = first_batch(pd.DataFrame({"path": [str(tmp_path / "deep.png")], "label": [0]}),
                            training=False, seed=0)
    assert np.allclose(images[0, ..., 0], pixels / 65535, atol=1e-7)


def test_feeds_keras_3_and_tf_keras_models(films):
    import keras
    import tf_keras

    dataset = image_dataset(films, 1, 8, training=True, seed=0, augment=AUGMENT)
    for library in (keras, tf_keras):
        model = library.Sequential([library.Input((32, 16, 1)), library.layers.Flatten(),
                                    library.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer="sgd", loss="binary_crossentropy")
        history = model.fit(dataset, epochs=1, verbose=0, shuffle=False, class_weight=class_weights(films["label"]))
        assert np.isfinite(history.history["loss"][0])
