"""COCO AP of the fracture class (physis.detection): pycocotools on tiny hand-made tables."""

import math

import numpy as np
import pandas as pd
import pytest

from physis.detection import boxes_table, coco_ap

GT = pd.DataFrame([
    {"image_id": "a", "class": "fracture", "x": 10.0, "y": 10.0, "w": 40.0, "h": 20.0},
    {"image_id": "b", "class": "fracture", "x": 60.0, "y": 30.0, "w": 30.0, "h": 30.0},
    {"image_id": "b", "class": "text", "x": 0.0, "y": 0.0, "w": 50.0, "h": 10.0},
    {"image_id": "z", "class": "fracture", "x": 0.0, "y": 0.0, "w": 10.0, "h": 10.0},  # not in the set
])
IMAGES = ["a", "b", "c"]


def table(rows):
    return pd.DataFrame(rows, columns=["image_id", "x", "y", "w", "h", "score"])


def test_perfect_detections_score_one():
    pred = table([("a", 10, 10, 40, 20, 0.9), ("b", 60, 30, 30, 30, 0.8)])
    result = coco_ap(pred, GT, IMAGES)
    assert result["ap50"] == pytest.approx(1.0)
    assert result["ap50_95"] == pytest.approx(1.0)
    assert (result["n_images"], result["n_gt"], result["n_pred"]) == (3, 2, 2)


def test_loose_boxes_pass_iou50_but_not_the_strict_thresholds():
    # IoU of each detection with its box is 0.6: a hit at thresholds 0.50-0.60 (3 of 10), a miss from 0.65 on
    pred = table([("a", 10, 10, 40, 12, 0.9), ("b", 60, 30, 30, 18, 0.8)])
    result = coco_ap(pred, GT, IMAGES)
    assert result["ap50"] == pytest.approx(1.0)
    assert result["ap50_95"] == pytest.approx(0.3, abs=0.01)


def test_confident_false_positive_on_a_fracture_free_image_lowers_ap50():
    pred = table([("c", 0, 0, 20, 20, 0.99), ("a", 10, 10, 40, 20, 0.9), ("b", 60, 30, 30, 30, 0.8)])
    result = coco_ap(pred, GT, IMAGES)
    assert 0.5 < result["ap50"] < 1.0


def test_other_classes_and_images_outside_the_set_are_ignored():
    pred = table([("a", 10, 10, 40, 20, 0.9), ("b", 60, 30, 30, 30, 0.8), ("z", 0, 0, 10, 10, 0.99)])
    assert coco_ap(pred, GT, IMAGES)["ap50"] == pytest.approx(1.0)
    assert coco_ap(pred, GT, ["z"])["ap50"] == pytest.approx(1.0)


def test_no_detections_is_zero_and_no_ground_truth_is_nan():
    assert coco_ap(table([]), GT, IMAGES)["ap50"] == 0.0
    result = coco_ap(table([("c", 0, 0, 5, 5, 0.5)]), GT, ["c"])
    assert math.isnan(result["ap50"]) and math.isnan(result["ap50_95"])


def test_boxes_table_from_predict_boxes_output():
    boxes = [np.array([[1, 2, 3, 4, 0.5], [5, 6, 7, 8, 0.25]]), np.zeros((0, 5))]
    rows = boxes_table(["a", "b"], boxes)
    assert list(rows.columns) == ["image_id", "x", "y", "w", "h", "score"]
    assert rows["image_id"].tolist() == ["a", "a"]
    assert rows["score"].tolist() == [0.5, 0.25]
    assert boxes_table([], []).empty
    with pytest.raises(ValueError):
        boxes_table(["a"], [])
