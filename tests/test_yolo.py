"""physis.yolo: YOLOv7 from official.projects.yolo behind the yolov7 plugin.

The plugin's build/train/predict/save-load/export cycle runs in tests/test_plugins.py (every plugin);
here: the width/depth scaling of the Model Garden's block tables, the detection classes and their
records, and (slow) that the CPU-sized YOLOv7 learns the marker films of tests/test_garden.py.
"""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_garden import MARKER_HW, markers, training_ap50  # noqa: F401  (markers: the module's fixture)

from physis import garden, yolo


def tables():
    from official.projects.yolo.modeling.backbones import yolov7 as backbones
    from official.projects.yolo.modeling.decoders import yolov7 as decoders

    return backbones.BACKBONES, decoders.DECODERS


@pytest.mark.parametrize("variant", ["yolov7", "yolov7x", "yolov7-tiny"])
def test_scaling_by_one_rebuilds_the_shipped_tables(variant):
    """The ELAN rewrite is exact: ×1 gives every shipped table back (``from`` made absolute)."""
    for table in tables():
        assert yolo.scaled_specs(table[variant], 1.0, 1.0) == yolo._absolute(table[variant])
    assert yolo.model_id(1, 1) == "yolov7"  # the real YOLOv7 is the Model Garden's own table


def test_width_and_depth_scale_filters_and_elan_chains():
    backbone_table, decoder_table = tables()
    backbone = yolo.scaled_specs(backbone_table["yolov7"], 0.25, 0.5)
    # the first ELAN: cv1, cv2 (1x1, 64 -> 16 filters), two 3x3 convs instead of four, concat of the
    # second conv, cv2 and cv1 (every second chain member, as YOLOv7's backbone takes them)
    assert backbone[4:9] == [["convbn", 3, 1, 1, 16, False], ["convbn", 3, 1, 1, 16, False],
                             ["convbn", 5, 3, 1, 16, False], ["convbn", 6, 3, 1, 16, False],
                             ["concat", [7, 5, 4], -1, False]]
    assert len(backbone) == len(backbone_table["yolov7"]) - 4 * 2  # four ELAN blocks, two convs fewer each
    assert [row[4] for row in backbone if row[-1]] == [128, 256, 256]  # outputs: 512, 1024, 1024 x 0.25
    decoder = yolo.scaled_specs(decoder_table["yolov7"], 0.25, 0.5)
    assert decoder[0] == ["sppcspc", -1, 128, False]  # layer 0 still reads the backbone's top level
    head_elan = decoder[5:10]  # the head's ELAN concatenates every chain member: c2, c1, cv2, cv1
    assert head_elan[-1] == ["concat", [8, 7, 6, 5], -1, False]
    assert [row[1] for row in decoder if row[-1]] == [20, 31, 42]  # the heads' inputs, renumbered
    assert yolo.model_id(0.25, 0.5) == "physis-yolov7-w0.25-d0.5" and "physis-yolov7-w0.25-d0.5" in tables()[1]


def test_detection_classes_keep_the_fracture_at_one():
    assert yolo.class_ids({}) == {"fracture": garden.FRACTURE_ID}
    assert yolo.class_ids({"extra_classes": ["metal", "fracture", "periostealreaction"]}) == {
        "fracture": 1, "metal": 2, "periostealreaction": 3}
    with pytest.raises(ValueError, match="extra_classes.*'cast'"):
        yolo.class_ids({"extra_classes": ["cast"]})


def test_records_carry_the_extra_classes(tmp_path):
    from official.projects.yolo.dataloaders import tf_example_decoder

    path = tmp_path / "film.png"
    Image.fromarray(np.full((64, 32), 30000, np.uint16)).save(path)
    frame = pd.DataFrame({"image_id": ["film"], "path": [str(path)], "label": [0]})
    boxes = pd.DataFrame([("film", "fracture", 0, 0, 8, 8), ("film", "metal", 8, 16, 8, 16),
                          ("film", "text", 0, 0, 4, 4)], columns=["image_id", "class", "x", "y", "w", "h"])
    records = yolo.write_records(frame, boxes, yolo.class_ids({"extra_classes": ["metal"]}), tmp_path / "r.tfrecord")
    import tensorflow as tf

    decoded = tf_example_decoder.TfExampleDecoder(coco91_to_80=False).decode(
        next(iter(tf.data.TFRecordDataset(str(records)))))
    assert decoded["groundtruth_classes"].numpy().tolist() == [1, 2]  # text is not a class here
    np.testing.assert_allclose(decoded["groundtruth_boxes"].numpy()[1], [0.25, 0.25, 0.5, 0.5])  # y0 x0 y1 x1
    positive_only = yolo.write_records(frame, boxes, yolo.class_ids({}), tmp_path / "p.tfrecord", "positive")
    decoded = tf_example_decoder.TfExampleDecoder(coco91_to_80=False).decode(
        next(iter(tf.data.TFRecordDataset(str(positive_only)))))
    assert decoded["groundtruth_classes"].numpy().tolist() == []  # a film labelled 0: no fracture box kept


YOLO_PARAMS = {"width_multiple": 0.25, "depth_multiple": 0.5, "norm_momentum": 0.9, "score_threshold": 0.05,
               "max_detections": 20, "ota": False, "mosaic": 0.0, "extra_classes": []}


# 4 epochs of 100 steps from scratch; in 4 x 50 steps (test_garden's budget) the best epoch's AP50 ranged
# 0.38-1.0 over four input-pipeline seeds, with 4 x 100 it reached 1.0 (seed 0).
EPOCHS, STEPS = 4, 100


@pytest.mark.slow  # about 1.5 minutes on one core
def test_yolov7_learns_the_fracture_boxes(markers, tmp_path):  # noqa: F811
    """The CPU-sized YOLOv7 (width 0.25, depth 0.5, 2.0 M parameters), from scratch, on test_garden's
    16 marker films: training AP50 0 untrained, then 0.09, 0.22, 0.77, 1.0 after each epoch (one run)."""
    from physis.plugins import TrainData
    from physis.train import seed_everything

    seed_everything(0)  # before the build: the initial weights are part of the measured run
    detector = yolo.YoloDetector((*MARKER_HW, 3), YOLO_PARAMS)
    frame, boxes, folder = markers
    data = TrainData(train=None, val=None, frames={"train": frame}, boxes=boxes, class_weight=None, preset_dir=folder)
    loop = garden.DetectorLoop(detector, data, tmp_path, batch_size=2, steps=STEPS, learning_rate=1e-3,
                               optimizer_name="adam", clip_norm=1.0, train_boxes="all", seed=0)
    before = training_ap50(detector, frame, boxes)
    after = []
    for epoch in range(EPOCHS):
        loop.train_epoch(epoch)
        after.append(training_ap50(detector, frame, boxes))
    assert max(after) >= 0.5 and max(after) >= before + 0.3, (before, after)


@pytest.mark.slow  # four builds and detection traces: about 20 s of CPU
def test_init_checkpoint_loads_a_backbone_or_everything_and_a_misfit_names_the_head(tmp_path):
    """Model Garden layout (``model`` and its ``checkpoint_items``, as its trainer writes) and physis's
    own loop layout (``model`` only); a model with another class count fits only by its backbone."""
    import tensorflow as tf

    from physis import checkpoints

    def variables(model):
        return [v.numpy() for v in model.variables]

    shape, params = (64, 64, 3), {**YOLO_PARAMS, "width_multiple": 0.125, "depth_multiple": 0.25}
    source = yolo.YoloDetector(shape, params).model
    for v in source.variables:
        v.assign(tf.random.uniform(v.shape, dtype=v.dtype))
    garden_layout = tf.train.Checkpoint(model=source, **source.checkpoint_items).write(str(tmp_path / "mg" / "ckpt"))
    loop_layout = tf.train.Checkpoint(model=source).write(str(tmp_path / "loop" / "ckpt"))
    for path in (garden_layout, loop_layout):
        target = yolo.YoloDetector(shape, params)
        head = variables(target.model.head)
        target.restore_initial(path, "backbone")
        assert all(np.array_equal(a, b) for a, b in zip(variables(target.model.backbone), variables(source.backbone)))
        assert all(np.array_equal(a, b) for a, b in zip(variables(target.model.head), head))
        target.restore_initial(path, "all")
        assert all(np.array_equal(a, b) for a, b in zip(variables(target.model), variables(source)))
    wider = yolo.YoloDetector(shape, {**params, "extra_classes": ["metal"]})
    wider.restore_initial(loop_layout, "backbone")
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"of another shape.*head"):
        wider.restore_initial(loop_layout, "all")
