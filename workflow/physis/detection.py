"""Detection metrics: COCO AP50 and AP50:95 of the fracture class, computed by pycocotools.

Detector plugins return boxes per image (:func:`boxes_table` turns them into the
``results/predictions/boxes/{model}.parquet`` rows); :func:`coco_ap` scores such a table against
the ground-truth boxes with pycocotools' ``COCOeval`` (the reference implementation that the
published GRAZPEDWRI-DX detectors report, e.g. YOLOv8's fracture AP50), never a hand-rolled mAP.
Both tables use top-left x, y, width and height in the same pixel frame (preprocessed pixels for
the plugins). No TensorFlow here: the evaluate stage imports this module.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

FRACTURE = "fracture"
BOX_COLUMNS = ["image_id", "x", "y", "w", "h", "score"]


def boxes_table(image_ids: Sequence[str], boxes: Sequence[np.ndarray]) -> pd.DataFrame:
    """Rows (image_id, x, y, w, h, score) from one (n, 5) array per image (a ``predict_boxes`` result)."""
    if len(image_ids) != len(boxes):
        raise ValueError(f"{len(image_ids)} image ids but {len(boxes)} box arrays")
    parts = [pd.DataFrame(np.asarray(b, dtype=float).reshape(-1, 5), columns=BOX_COLUMNS[1:]).assign(image_id=i)
             for i, b in zip(image_ids, boxes)]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=BOX_COLUMNS)
    return table[BOX_COLUMNS].astype({"image_id": str})


def coco_ap(pred_boxes: pd.DataFrame, gt_boxes: pd.DataFrame, images: Iterable[str],
            cls: str = FRACTURE) -> dict[str, float]:
    """COCO AP50 and AP50:95 (area "all", up to 100 detections per image) of one class.

    ``pred_boxes``: image_id, x, y, w, h, score (detections of ``cls``; a ``class`` column, when
    present, is filtered to ``cls``). ``gt_boxes``: image_id, class, x, y, w, h. ``images``: the
    image ids that form the evaluated set — images without any box count too (detections there
    are false positives); boxes of other images are ignored. Returns ``ap50``, ``ap50_95``,
    ``n_images``, ``n_gt`` and ``n_pred``; the APs are NaN when the set has no ground-truth box.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {image_id: n for n, image_id in enumerate(dict.fromkeys(str(i) for i in images), start=1)}
    gt = gt_boxes[(gt_boxes["class"] == cls) & gt_boxes["image_id"].astype(str).isin(ids)]
    pred = pred_boxes[pred_boxes["image_id"].astype(str).isin(ids)]
    if "class" in pred:
        pred = pred[pred["class"] == cls]
    result = {"ap50": float("nan"), "ap50_95": float("nan"), "n_images": len(ids), "n_gt": len(gt),
              "n_pred": len(pred)}
    if gt.empty:
        return result

    truth = COCO()
    truth.dataset = {
        "images": [{"id": n} for n in ids.values()],
        "categories": [{"id": 1, "name": cls}],
        "annotations": [
            {"id": k, "image_id": ids[str(row.image_id)], "category_id": 1,
             "bbox": [float(row.x), float(row.y), float(row.w), float(row.h)],
             "area": float(row.w * row.h), "iscrowd": 0}
            for k, row in enumerate(gt.itertuples(), start=1)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        truth.createIndex()
        if pred.empty:
            return {**result, "ap50": 0.0, "ap50_95": 0.0}
        detections = truth.loadRes([
            {"image_id": ids[str(row.image_id)], "category_id": 1,
             "bbox": [float(row.x), float(row.y), float(row.w), float(row.h)], "score": float(row.score)}
            for row in pred.itertuples()
        ])
        evaluator = COCOeval(truth, detections, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0] = AP@[.50:.95], stats[1] = AP@.50 (area all, maxDets 100); -1 means undefined
    ap50_95, ap50 = (float(value) if value >= 0 else float("nan") for value in evaluator.stats[:2])
    return {**result, "ap50": ap50, "ap50_95": ap50_95}
