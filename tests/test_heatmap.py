"""Box-supervised heat maps: box masks in the input pipeline, the map's loss and metrics, the plugin."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from physis import config, heatmap
from physis.pipeline import image_dataset, rasterise

AUGMENT = config.load()["preprocess"]["augment"]
SIZE = (64, 32)


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Twelve dark 64 × 32 films; the positives (every third) have a bright box-shaped patch at a
    random place, and so do the first two negatives (a non-target fracture)."""
    folder = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(1)
    rows, boxes = [], []
    for k in range(12):
        pixels = np.full(SIZE, 20, np.uint8)
        label = int(k % 3 == 0)
        if label or k in (1, 2):
            x, y = int(rng.integers(0, 20)), int(rng.integers(0, 50))
            pixels[y:y + 10, x:x + 8] = 250
            boxes.append({"image_id": f"f{k}", "class": "fracture", "x": float(x), "y": float(y), "w": 8.0, "h": 10.0})
        Image.fromarray(pixels).save(folder / f"f{k}.png")
        rows.append({"image_id": f"f{k}", "path": str(folder / f"f{k}.png"), "label": label})
    return pd.DataFrame(rows), pd.DataFrame(boxes)


def masks_of(frame, boxes, **kwargs):
    batches = list(image_dataset(frame, 1, 4, boxes=boxes, seed=0, **kwargs))
    return (np.concatenate([image.numpy() for image, _ in batches]),
            np.concatenate([mask.numpy() for _, mask in batches]))


def test_rasterise_covers_the_pixel_centres_inside_each_box():
    mask = rasterise(np.array([[1.0, 2.0, 3.0, 5.0], [6.2, 0.0, 6.8, 1.0]], np.float32), (6, 8)).numpy()[..., 0]
    expected = np.zeros((6, 8))
    expected[2:5, 1:3] = 1  # x in [1, 3), y in [2, 5)
    expected[0, 6] = 1  # the thin box holds the centre 6.5 of column 6
    np.testing.assert_array_equal(mask, expected)


def test_masks_mark_the_boxes_of_positive_films_only(films):
    frame, boxes = films
    images, masks = masks_of(frame, boxes, training=False)
    assert masks.shape == (12, *SIZE, 1)
    for k, label in enumerate(frame["label"]):
        bright = images[k, ..., 0] > 0.5
        if label:
            np.testing.assert_array_equal(masks[k, ..., 0] == 1, bright)
        else:  # the negatives' boxes (k = 1, 2) are not the target
            assert masks[k].max() == 0


def test_balanced_sampling_keeps_each_films_mask(films):
    frame, boxes = films
    images, masks = masks_of(frame, boxes, training=True, balance="sampling")
    assert len(images) == len(frame)
    for image, mask in zip(images, masks):  # a positive's patch is masked; a negative has no mask
        bright = image[..., 0] > 0.5
        assert (mask[..., 0] == 1).sum() in (0, bright.sum())
        assert not mask.any() or np.array_equal(mask[..., 0] == 1, bright)
    assert 0 < masks.reshape(len(masks), -1).max(axis=1).mean() < 1


def test_stride_pools_the_mask_to_the_map_grid(films):
    frame, boxes = films
    _, full = masks_of(frame, boxes, training=False)
    _, coarse = masks_of(frame, boxes, training=False, stride=8)
    assert coarse.shape == (12, 8, 4, 1)
    pooled = full.reshape(12, 8, 8, 4, 8).max(axis=(2, 4))
    np.testing.assert_array_equal(coarse[..., 0], pooled)


def test_augmentation_moves_the_mask_with_the_film(films):
    frame, boxes = films
    positives = frame[frame["label"] == 1]
    recipe = {**AUGMENT, "rotation": 20, "scale": 0.2, "elastic_alpha": 4, "brightness": 0, "contrast": 0}
    images, masks = masks_of(positives, boxes, training=True, augment=recipe)
    plain, _ = masks_of(positives, boxes, training=False)
    assert not np.allclose(images, plain), "the recipe changed nothing"
    for image, mask in zip(images, masks):
        inside = mask[..., 0] > 0.5
        assert inside.any()
        # the bright patch went where its mask went
        assert image[..., 0][inside].mean() > 0.6 > image[..., 0][~inside].mean()


def test_map_metrics_and_loss_score_the_map_maximum():
    truth = np.zeros((4, 2, 2, 1), np.float32)
    truth[0, 1, 1] = truth[1, 0, 0] = 1  # two positives
    maps = np.full((4, 2, 2, 1), 0.1, np.float32)
    maps[0, 0, 1] = 0.9  # positive 0 scores high anywhere on its map
    maps[2, 1, 0] = 0.8  # negative 2 scores higher than positive 1
    auroc, accuracy = heatmap._metrics()
    auroc.update_state(truth, maps)
    accuracy.update_state(truth, maps)
    expected = roc_auc_score([1, 1, 0, 0], [0.9, 0.1, 0.8, 0.1])  # the films' map maxima
    assert float(auroc.result()) == pytest.approx(expected, abs=0.01)
    assert float(accuracy.result()) == pytest.approx(0.5)  # scores 0.9 0.1 0.8 0.1 at 0.5
    image_bce = -np.log(np.array([0.9, 0.1, 0.2, 0.9]))
    per_film = np.asarray(heatmap.loss({0: 1.0, 1: 3.0}, heat_weight=0.0, cell_weight=5.0)(truth, maps))
    np.testing.assert_allclose(per_film, image_bce * [3, 3, 1, 1], rtol=1e-4)
    # the cells: film 0 has its fracture cell at 0.1 (weight 5) and three background cells
    cells = np.asarray(heatmap.loss({0: 1.0, 1: 1.0}, heat_weight=1.0, cell_weight=5.0)(truth, maps)) - image_bce
    film0 = (5 * -np.log(0.1) + -np.log(0.1) + 2 * -np.log(0.9)) / 4
    assert cells[0] == pytest.approx(film0, rel=1e-4)


def test_a_map_that_is_not_the_input_over_one_stride_is_an_error():
    import keras

    inputs = keras.Input((64, 32, 1))
    heat = keras.layers.Conv2D(1, 3, strides=(8, 4), padding="same", name=heatmap.HEAT_LAYER)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalMaxPooling2D()(heat))
    with pytest.raises(Exception, match="not the 64x32 input divided by one stride"):
        heatmap.grid_stride(model)


def bar_films(folder, count: int, seed: int):
    """128 × 64 noisy films, each with a bright bar anywhere and its box: across on positives,
    along on negatives (a fracture that is not the target) — the label is which bar, not whether."""
    rng = np.random.default_rng(seed)
    rows, boxes = [], []
    for k in range(count):
        label = k % 2
        pixels = (rng.random((128, 64)) * 80 + 30).astype(np.uint8)
        w, h = (24, 4) if label else (4, 24)
        x, y = int(rng.integers(2, 62 - w)), int(rng.integers(2, 126 - h))
        pixels[y:y + h, x:x + w] = 230
        image_id = f"s{seed}_{k}"
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
        rows.append({"image_id": image_id, "path": str(folder / f"{image_id}.png"), "label": label})
        boxes.append({"image_id": image_id, "class": "fracture", "x": float(x), "y": float(y), "w": float(w),
                      "h": float(h)})
    return pd.DataFrame(rows), pd.DataFrame(boxes)


@pytest.mark.slow
def test_heatmap_cnn_learns_where_the_target_fracture_is(tmp_path, caplog):
    from physis import plugins, train
    from physis.plugins import ModelConfig, PredictData, TrainData

    plugin = plugins.discover()["heatmap_cnn"]
    split = {name: bar_films(tmp_path, count, seed) for name, count, seed in
             (("train", 32, 0), ("val", 8, 1), ("test", 16, 2))}
    boxes = pd.concat([films_boxes for _, films_boxes in split.values()])
    boxes = boxes[boxes["image_id"] != "s0_1"]  # a positive without its box: left out, and said so
    params = {**plugin.spec.params, "epochs": 12, "batch_size": 4, "patience": 12}
    cfg = ModelConfig("heatmap_cnn", plugin.spec, (128, 64, 1), params, seed=0, work_dir=tmp_path / "model")
    train.seed_everything(0)
    model = plugin.hook("build")(cfg)
    data = TrainData(train=None, val=None, frames={s: split[s][0] for s in ("train", "val")}, boxes=boxes,
                     class_weight={0: 1.0, 1: 1.0}, preset_dir=tmp_path)
    plugin.hook("train")(model, data, cfg, train.callbacks("keras", cfg.work_dir, patience=12))
    assert "1 positive train films have no fracture box" in caplog.text
    train.restore_best(model, "keras", cfg.work_dir)  # the trainer's checkpoint fits the one-output model
    test, test_boxes = split["test"]
    predict = train.predict_data(cfg, test, test_boxes, tmp_path)
    scores = train.predict_scores(plugin, model, cfg, predict)
    assert roc_auc_score(test["label"], scores) >= 0.9
    # its explanation is its own map: hot on a positive's bar
    film = np.asarray(Image.open(test["path"].iloc[1]), np.float32)[..., None] / 255
    heat = plugin.hook("explain")(model, film, cfg).heatmap
    bar = test_boxes.iloc[1]
    assert heat.shape == (128, 64)
    assert heat[int(bar.y):int(bar.y + bar.h), int(bar.x):int(bar.x + bar.w)].mean() > heat.mean()


BOX_SUPERVISABLE = sorted(name for name, plugin in __import__("physis.plugins", fromlist=["discover"]).discover().items()
                          if "supervision" in plugin.spec.params)


def test_the_keras_classifiers_take_box_supervision():
    assert {"resnet50", "densenet169", "custom_cnn", "efficientnetv2", "convnext", "mobilenetv2"} <= set(
        BOX_SUPERVISABLE)


@pytest.mark.parametrize("name", BOX_SUPERVISABLE)
def test_supervision_boxes_puts_a_map_head_on_the_backbone(name):
    from physis import plugins
    from physis.plugins import ModelConfig, PluginError

    plugin = plugins.discover()[name]

    def build(supervision):
        params = {**plugin.spec.params, "supervision": supervision}
        return plugin.hook("build")(ModelConfig(name, plugin.spec, (128, 64, 3), params))

    assert heatmap.HEAT_LAYER not in [layer.name for layer in build("labels").layers]
    model = build("boxes")
    assert model.output_shape == (None, 1) and heatmap.grid_stride(model) > 1
    with pytest.raises(PluginError, match="supervision must be one of labels, boxes"):
        build("box")


# the training and explanation code is shared by every plugin (physis.keras_models.classifier): a
# thesis network and a keras.applications one stand for the rest, which take minutes each to train
@pytest.mark.slow
@pytest.mark.parametrize("name", ["custom_cnn", "mobilenetv2"])
def test_a_box_supervised_classifier_trains_and_explains_with_its_map(name, tmp_path, caplog):
    import keras

    from physis import plugins, train
    from physis.plugins import ModelConfig, TrainData

    plugin = plugins.discover()[name]
    split = {s: bar_films(tmp_path, count, seed) for s, count, seed in (("train", 8, 0), ("val", 4, 1))}
    boxes = pd.concat([b for _, b in split.values()])
    boxes = boxes[boxes["image_id"] != "s0_1"]  # a positive without its box: only the map trainer says so
    params = {**plugin.spec.params, "epochs": 1, "batch_size": 4, "supervision": "boxes"}
    cfg = ModelConfig(name, plugin.spec, (128, 64, 3), params, seed=0, work_dir=tmp_path / "model")
    train.seed_everything(0)
    model = plugin.hook("build")(cfg)
    heat = model.get_layer(heatmap.HEAT_LAYER)
    before = [w.copy() for w in heat.get_weights()]
    data = TrainData(train=None, val=None, frames={s: split[s][0] for s in ("train", "val")}, boxes=boxes,
                     class_weight={0: 1.0, 1: 1.0}, preset_dir=tmp_path)
    plugin.hook("train")(model, data, cfg, train.callbacks("keras", cfg.work_dir, patience=2))
    assert "1 positive train films have no fracture box" in caplog.text  # physis.heatmap.fit trained it
    assert any(not np.allclose(a, b) for a, b in zip(before, heat.get_weights()))
    assert "val_auroc" in pd.read_parquet(cfg.work_dir / "history.parquet")
    film = np.asarray(Image.open(split["val"][0]["path"].iloc[1]), np.float32)[..., None].repeat(3, -1) / 255
    np.testing.assert_array_equal(plugin.hook("explain")(model, film, cfg).heatmap,
                                  heatmap.explain(model, film, cfg).heatmap)  # its own map, not Grad-CAM
    keras.backend.clear_session()
