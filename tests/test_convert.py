"""The convert stage on the phantom: outputs, reconciliation and every bad-input kind."""

import json

import pandas as pd
import pytest
from conftest import make_config

from physis.convert import MANIFEST_COLUMNS, ConvertError, convert
from physis.sources import DataSourceError
from physis.splits import SplitError


def run(root, tmp_path, **sections):
    cfg = make_config(root, tmp_path / "results", **sections)
    summary = convert(cfg, tmp_path / "results" / "data")
    data = tmp_path / "results" / "data"
    return (summary, pd.read_parquet(data / "manifest.parquet"), pd.read_parquet(data / "boxes.parquet"),
            pd.read_parquet(data / "rejected.parquet"))


def reconciles(summary, manifest, rejected, csv_rows, extra_files=0):
    images = rejected[rejected.level == "image"]
    excluded = rejected[rejected.level == "excluded"]
    assert summary["images_in"] == len(manifest) + len(images) + len(excluded)
    assert summary["images_in"] == csv_rows + extra_files


def csv_rows(root):
    return len(pd.read_csv(root / "dataset.csv", encoding="utf-8-sig", dtype=str))


def test_clean_phantom_converts_and_reconciles(phantom_root, tmp_path):
    summary, manifest, boxes, rejected = run(phantom_root, tmp_path)
    assert list(manifest.columns)[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS
    assert set(rejected["level"]) <= {"excluded"}  # nothing wrong with the phantom itself
    reconciles(summary, manifest, rejected, csv_rows(phantom_root))
    assert set(rejected["reason"]) == {"physeal_code_not_visible"}
    # label rule: positives have a physeal code and a visible fracture
    positives = manifest[manifest.label == 1]
    assert len(positives) and positives["fracture_visible"].all()
    assert positives["sh_type"].between(1, 4).all()
    assert manifest.loc[manifest.label == 0, "sh_type"].isna().all()
    # patient-level split, stored in the manifest
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest["bit_depth"].eq(16).all()
    # boxes are pixels inside their image
    sizes = manifest.set_index("image_id")[["width", "height"]]
    joined = boxes.join(sizes, on="image_id")
    assert (joined.x >= 0).all() and (joined.x + joined.w <= joined.width + 1e-6).all()
    assert (joined.y >= 0).all() and (joined.y + joined.h <= joined.height + 1e-6).all()


def test_fracture_target_keeps_follow_ups(phantom_root, tmp_path):
    summary, manifest, _, rejected = run(phantom_root, tmp_path, target={"name": "fracture"})
    assert summary["excluded"] == 0
    assert (manifest["label"] == manifest["fracture_visible"].astype(int)).all()


def test_same_seed_same_manifest(phantom_root, tmp_path):
    first = run(phantom_root, tmp_path / "a")[1]
    second = run(phantom_root, tmp_path / "b")[1]
    pd.testing.assert_frame_equal(first, second)


def test_coco_loads_with_pycocotools(phantom_root, tmp_path):
    from pycocotools.coco import COCO

    _, manifest, boxes, _ = run(phantom_root, tmp_path)
    coco = COCO(str(tmp_path / "results" / "data" / "coco" / "train.json"))
    train = manifest[manifest.split == "train"]
    assert len(coco.getImgIds()) == len(train)
    fracture = coco.getCatIds(catNms=["fracture"])
    n_boxes = len(boxes[boxes.image_id.isin(train.image_id) & (boxes["class"] == "fracture")])
    assert len(coco.getAnnIds(catIds=fracture)) == n_boxes


def test_tfrecords_decode_with_the_model_garden_decoder(phantom_root, tmp_path):
    import tensorflow as tf
    from official.vision.dataloaders.tf_example_decoder import TfExampleDecoder

    _, manifest, boxes, _ = run(phantom_root, tmp_path, convert={"tfrecord": True, "tfrecord_shard_size": 8})
    files = sorted((tmp_path / "results" / "data" / "tfrecord").glob("val-*.tfrecord"))
    assert files and len(files) == -(-len(manifest[manifest.split == "val"]) // 8)
    decoder = TfExampleDecoder(include_mask=True)
    record = next(iter(tf.data.TFRecordDataset([str(files[0])])))
    decoded = decoder.decode(record)
    image_id = decoded["source_id"].numpy().decode()
    row = manifest[manifest.coco_id == int(image_id)].iloc[0]
    assert decoded["image"].shape[:2] == (row.height, row.width)
    assert decoded["groundtruth_boxes"].shape[0] == len(boxes[boxes.image_id == row.image_id])
    assert decoded["groundtruth_instance_masks"].shape[0] == decoded["groundtruth_boxes"].shape[0]


def test_every_bad_input_kind_is_listed_and_counts_reconcile(phantom_copy, tmp_path):
    root = phantom_copy
    frame = pd.read_csv(root / "dataset.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    stems = list(frame["filestem"])
    images = {p.stem: p for p in root.glob("images_part*/*.png")}
    labels = root / "folder_structure" / "yolov5" / "labels"
    # 1. truncated image
    truncated = images[stems[0]]
    truncated.write_bytes(truncated.read_bytes()[:400])
    # 2. image without a CSV row
    orphan = root / "images_part1" / "9999_0000000000_01_WRI-L1_M010.png"
    orphan.write_bytes(images[stems[2]].read_bytes())
    # 3. CSV row without image
    images[stems[1]].unlink()
    # 4. label file missing: image kept without boxes (not a reject)
    (labels / f"{stems[3]}.txt").unlink()
    # 5. class id out of range, 6. degenerate box, 7. box outside the image
    (labels / f"{stems[4]}.txt").write_text("12 0.5 0.5 0.1 0.1\n8 0.5 0.5 0.0 0.1\n8 1.7 1.7 0.1 0.1\n8 0.5 0.5 0.2 0.2")
    # 8. duplicate stem in another images_part folder
    duplicate = root / "images_part4" / images[stems[5]].name
    if images[stems[5]].parent.name == "images_part4":
        duplicate = root / "images_part1" / images[stems[5]].name
    duplicate.write_bytes(images[stems[5]].read_bytes())
    # 9. non-parsable AO code: kept, marked unknown
    frame.loc[6, "ao_classification"] = "23r-X/9?"
    frame.loc[6, "fracture_visible"] = ""
    with open(root / "dataset.csv", "w", encoding="utf-8-sig", newline="") as handle:
        frame.to_csv(handle, index=False, lineterminator="\r\n")

    summary, manifest, boxes, rejected = run(root, tmp_path)
    by_source = rejected.set_index("source")["reason"]
    image_rejects = rejected[rejected.level == "image"]
    assert any("unreadable image" in r for r in image_rejects.reason), "truncated image"
    assert "image without a row in dataset.csv" in set(image_rejects.reason)
    assert any(r.startswith("CSV row without image") for r in image_rejects.reason)
    assert any(r.startswith("duplicate file stem") for r in image_rejects.reason)
    assert stems[3] in set(manifest.image_id)
    assert boxes[boxes.image_id == stems[3]].empty
    annotation = rejected[rejected.level == "annotation"]
    assert len(annotation) == 3 and set(annotation.image_id) == {stems[4]}
    assert any("class id 12 out of range" in r for r in annotation.reason)
    assert any("degenerate" in r for r in annotation.reason)
    assert any("outside" in r for r in annotation.reason)
    assert len(boxes[boxes.image_id == stems[4]]) == 1
    unknown = manifest.set_index("image_id").loc[stems[6], "ao_unknown"]
    assert list(unknown) == ["23r-X/9?"]
    # every reason names its file or row
    assert all(by_source.index.str.len() > 0)
    reconciles(summary, manifest, rejected, len(frame), extra_files=2)  # orphan + duplicate copy
    assert json.loads((tmp_path / "results" / "data" / "summary.json").read_text()) == summary


def test_strict_mode_fails_on_any_reject_and_counts_the_reasons(phantom_copy, tmp_path):
    images = sorted(phantom_copy.glob("images_part*/*.png"))
    images[0].unlink()
    images[1].unlink()
    images[2].write_bytes(images[2].read_bytes()[:300])  # truncated
    failure = tmp_path / "logs" / "convert_rejected.csv"
    failure.parent.mkdir()
    cfg = make_config(phantom_copy, tmp_path / "results", convert={"strict": True, "tfrecord": False})
    with pytest.raises(ConvertError, match=r"convert.strict is true and 3 input\(s\) were rejected: "
                                           r"2 × CSV row without image, 1 × unreadable image") as raised:
        convert(cfg, tmp_path / "results" / "data", failure_rejects=failure)
    assert str(failure) in str(raised.value)
    assert not (tmp_path / "results" / "data" / "manifest.parquet").exists()
    written = pd.read_csv(failure)  # the rejects survive the failed job, with their reasons
    assert set(written.loc[written.level == "image", "image_id"]) == {path.stem for path in images[:3]}
    assert pd.read_csv(tmp_path / "results" / "data" / "rejected.csv").equals(written)


def test_a_split_error_still_writes_the_rejects(phantom_copy, tmp_path):
    next(phantom_copy.glob("images_part*/*.png")).unlink()
    failure = tmp_path / "convert_rejected.csv"
    cfg = make_config(phantom_copy, tmp_path / "results", split={"fractions": {"train": 0.96, "val": 0.02,
                                                                                "test": 0.02}})
    with pytest.raises(SplitError, match="has only class"):
        convert(cfg, tmp_path / "results" / "data", failure_rejects=failure)
    assert "CSV row without image" in set(pd.read_csv(failure)["reason"].str.split(":").str[0])


def test_boxes_partly_outside_are_clipped_and_counted(phantom_copy, tmp_path):
    label = sorted((phantom_copy / "folder_structure/yolov5/labels").glob("*.txt"))[0]
    label.write_text("3 0.98 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n3 0.02 0.02 0.1 0.2")  # two reach outside
    summary, manifest, boxes, rejected = run(phantom_copy, tmp_path)
    clipped = manifest.set_index("image_id")["boxes_clipped"]
    assert clipped[label.stem] == 2 and clipped.drop(label.stem).eq(0).all()
    assert summary["boxes_clipped"] == 2 and len(boxes[boxes.image_id == label.stem]) == 3
    assert not (rejected["image_id"] == label.stem).any()


def test_a_csv_that_is_not_utf8_says_where_and_how_to_convert(phantom_copy, tmp_path):
    csv = phantom_copy / "dataset.csv"
    text = csv.read_text(encoding="utf-8-sig").replace("Siemens", "Siemens Müller", 1)
    csv.write_bytes(text.encode("cp1252"))
    offset = text.encode("cp1252").index("ü".encode("cp1252"))
    with pytest.raises(DataSourceError, match=rf"dataset.csv: not UTF-8 text: byte 0xfc at offset {offset} "
                                              r".*iconv -f cp1252 -t utf-8 .*dataset.csv_encoding"):
        run(phantom_copy, tmp_path)
    summary, manifest, _, _ = run(phantom_copy, tmp_path, dataset={"root": str(phantom_copy), "csv_encoding": "cp1252",
                                                                   "phantom": {"enabled": False}})
    assert summary["kept"] == len(manifest) > 0


def test_empty_data_set_is_an_error(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "dataset.csv").write_text("filestem,patient_id\n")
    with pytest.raises(DataSourceError, match="missing column"):
        run(root, tmp_path)
    from physis.records import CSV_COLUMNS

    (root / "dataset.csv").write_text(",".join(CSV_COLUMNS) + "\n")
    with pytest.raises(ConvertError, match="no usable image"):
        run(root, tmp_path)


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(ConvertError, match="does-not-exist"):
        run(tmp_path / "does-not-exist", tmp_path)


def test_split_left_with_one_class_is_an_error(phantom_root, tmp_path):
    with pytest.raises(SplitError, match="has only class"):
        run(phantom_root, tmp_path, split={"fractions": {"train": 0.96, "val": 0.02, "test": 0.02}})


def test_the_phantom_truth_reaches_the_manifest_and_only_for_physeal_positives(phantom_root, tmp_path):
    from physis.phantom import CONSPICUITY, TRUTH_FILE

    _, manifest, _, _ = run(phantom_root, tmp_path)
    truth = pd.read_csv(phantom_root / TRUTH_FILE)
    assert set(truth["kind"]) >= {"SH2"} and (truth.loc[truth["kind"].str.startswith("SH"), "displacement_pct"] > 0).all()
    positives = manifest[manifest["label"] == 1]
    assert positives[CONSPICUITY].notna().all() and positives[CONSPICUITY].gt(0).all()
    assert manifest.loc[manifest["sh_type"].isna(), CONSPICUITY].isna().all()  # no physeal fracture, no value
    film = positives.iloc[0]
    rows = truth[(truth["filestem"] == film["image_id"]) & truth["kind"].str.startswith("SH")]
    assert film[CONSPICUITY] == rows["displacement_pct"].max()
