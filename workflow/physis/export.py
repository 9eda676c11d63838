"""Detection exports of the converted data: COCO JSON per split and Model Garden TFRecords.

COCO is the interchange format (pycocotools loads it; the thesis converted VOC → COCO →
TFRecord). The TFRecords use the ``tf.Example`` keys of the Model Garden's COCO decoder, with
box-filled instance masks so ShapeMask/Mask R-CNN inputs need no extra conversion.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from physis.images import read_gray, to_uint8
from physis.io import atomic_path
from physis.records import YOLO_CLASSES

#: COCO category id (1-based, as in the thesis's labels.txt → id mapping) per class name.
CATEGORY_IDS = {name: index + 1 for index, name in enumerate(YOLO_CLASSES)}


def coco_dict(manifest: pd.DataFrame, boxes: pd.DataFrame) -> dict:
    """One split as a COCO instances dict. ``manifest`` needs ``coco_id``; boxes are pixels."""
    images = [
        {"id": int(row.coco_id), "file_name": row.path, "width": int(row.width), "height": int(row.height),
         "image_id": row.image_id}
        for row in manifest.itertuples()
    ]
    ids = dict(zip(manifest["image_id"], manifest["coco_id"]))
    selected = boxes[boxes["image_id"].isin(ids)]
    annotations = [
        {"id": n, "image_id": int(ids[row.image_id]), "category_id": CATEGORY_IDS[row["class"]],
         "bbox": [float(row.x), float(row.y), float(row.w), float(row.h)], "area": float(row.w * row.h),
         "iscrowd": 0, "segmentation": [_box_polygon(row)]}
        for n, (_, row) in enumerate(selected.iterrows(), start=1)
    ]
    categories = [{"id": cid, "name": name, "supercategory": "wrist"} for name, cid in CATEGORY_IDS.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _box_polygon(row) -> list[float]:
    x0, y0, x1, y1 = float(row.x), float(row.y), float(row.x + row.w), float(row.y + row.h)
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def write_coco(manifest: pd.DataFrame, boxes: pd.DataFrame, out_dir: Path) -> None:
    """Write ``{split}.json`` for every split in the manifest."""
    for split, part in manifest.groupby("split"):
        with atomic_path(out_dir / f"{split}.json") as tmp:
            tmp.write_text(json.dumps(coco_dict(part, boxes)))


def _png_bytes(array: np.ndarray) -> bytes:
    # compress_level=1: four times faster than the default, about 15% larger files
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def tf_example(row, image_boxes: pd.DataFrame):
    """One image as a Model Garden COCO ``tf.train.Example`` (8-bit PNG, normalised boxes, masks)."""
    import tensorflow as tf  # imported here: TF costs seconds and is only needed for this export

    pixels = to_uint8(read_gray(row.path))
    height, width = pixels.shape
    masks = []
    for box in image_boxes.itertuples():
        mask = np.zeros((height, width), np.uint8)
        mask[int(box.y):int(np.ceil(box.y + box.h)), int(box.x):int(np.ceil(box.x + box.w))] = 1
        masks.append(_png_bytes(mask))

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))

    def raw(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    b = image_boxes
    feature = {
        "image/encoded": raw([_png_bytes(pixels)]),
        "image/format": raw([b"png"]),
        "image/height": ints([height]),
        "image/width": ints([width]),
        "image/source_id": raw([str(int(row.coco_id)).encode()]),
        "image/filename": raw([str(row.image_id).encode()]),
        "image/object/bbox/xmin": floats(b["x"] / width),
        "image/object/bbox/ymin": floats(b["y"] / height),
        "image/object/bbox/xmax": floats((b["x"] + b["w"]) / width),
        "image/object/bbox/ymax": floats((b["y"] + b["h"]) / height),
        "image/object/class/label": ints(b["class"].map(CATEGORY_IDS)),
        "image/object/class/text": raw([name.encode() for name in b["class"]]),
        "image/object/area": floats(b["w"] * b["h"]),
        "image/object/is_crowd": ints([0] * len(b)),
        "image/object/mask": raw(masks),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_tfrecords(manifest: pd.DataFrame, boxes: pd.DataFrame, out_dir: Path, shard_size: int = 256) -> None:
    """Write ``{split}-{k:05d}-of-{n:05d}.tfrecord`` shards, ``shard_size`` images each."""
    import tensorflow as tf

    out_dir.mkdir(parents=True, exist_ok=True)
    by_image = dict(tuple(boxes.groupby("image_id")))
    empty = boxes.iloc[0:0]
    for split, part in manifest.groupby("split"):
        shards = max(1, -(-len(part) // shard_size))
        for k in range(shards):
            chunk = part.iloc[k * shard_size:(k + 1) * shard_size]
            with atomic_path(out_dir / f"{split}-{k:05d}-of-{shards:05d}.tfrecord") as tmp:
                with tf.io.TFRecordWriter(str(tmp)) as writer:
                    for row in chunk.itertuples():
                        example = tf_example(row, by_image.get(row.image_id, empty))
                        writer.write(example.SerializeToString())
