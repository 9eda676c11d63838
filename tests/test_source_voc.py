"""The Pascal VOC source: the thesis's corner conversion, a small VOC tree, and every reject path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from physis.records import Box, ImageRecord, Rejected
from physis.sources import DataSourceError
from physis.records import CSV_COLUMNS
from physis.sources.voc import read, voc_to_coco_bbox

GRAZ_STEM = "0001_1297860395_01_WRI-L1_M014"
LABELS = ("fracture", "fracture_student", "metal", "text", "axis")


def write_png(path: Path, width: int, height: int, bits: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(width * height, dtype=np.float64).reshape(height, width) / (width * height - 1)
    array = (ramp * 65535).astype(np.uint16) if bits == 16 else (ramp * 255).astype(np.uint8)
    Image.fromarray(array).save(path, format="PNG")


def write_xml(path: Path, filename: str, size: tuple[int, int] | None, objects=()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    objects_xml = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in objects)
    path.write_text(f"<annotation><folder>wrist</folder><filename>{filename}</filename>{size_xml}"
                    f"{objects_xml}</annotation>")


def make_root(tmp_path: Path, labels=LABELS) -> Path:
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "labels.txt").write_text("\n".join(labels) + "\n")
    return root


def run(root: Path, cfg: dict | None = None) -> tuple[list[ImageRecord], list[Rejected]]:
    items = list(read(root, cfg or {}, root.parent / "work"))
    assert all(isinstance(item, (ImageRecord, Rejected)) for item in items)
    return ([i for i in items if isinstance(i, ImageRecord)], [i for i in items if isinstance(i, Rejected)])


def image_level(records: list[ImageRecord], rejects: list[Rejected]) -> list[Rejected]:
    """convert's rule: a reject is about an annotation iff its image_id is a kept image."""
    kept = {record.image_id for record in records}
    return [reject for reject in rejects if reject.image_id not in kept]


def one(rejects: list[Rejected], source: str) -> Rejected:
    found = [reject for reject in rejects if reject.source == source]
    assert len(found) == 1, (source, rejects)
    return found[0]


@pytest.mark.parametrize(("corners", "expected"), [
    ((1, 1, 10, 10), (0, 0, 10, 10)),  # pixels 1…10 inclusive: 10 wide, starting at 0
    ((5, 7, 5, 7), (4, 6, 1, 1)),  # a single pixel
    ((11, 21, 30, 60), (10, 20, 20, 40)),
    ((1.5, 2.5, 4.5, 8.5), (0.5, 1.5, 4.0, 7.0)),
])
def test_voc_to_coco_bbox_follows_the_thesis(corners, expected):
    assert voc_to_coco_bbox(*corners) == expected
    x, y, w, h = voc_to_coco_bbox(*corners)
    assert (x + 1, y + 1, x + w, y + h) == corners  # back to VOC's 1-based inclusive corners


@pytest.fixture
def tree(tmp_path):
    root = make_root(tmp_path)
    images, ann = root / "JPEGImages", root / "Annotations"
    write_png(images / f"{GRAZ_STEM}.png", 40, 30)
    write_xml(ann / f"{GRAZ_STEM}.xml", f"{GRAZ_STEM}.png", (40, 30), [
        ("fracture", 1, 1, 10, 10),
        ("fracture student", 5, 5, 20, 20),
        ("text", 30, 20, 50, 40),  # sticks out right and bottom: clipped
        ("axis", 1, 1, 5, 5),  # listed in labels.txt but no GRAZPEDWRI class
        ("tumour", 1, 1, 5, 5),  # not in labels.txt
        ("metal", 10, 10, 5, 5),  # xmax < xmin: degenerate
        ("fracture", 45, 1, 50, 5),  # right of the 40-px-wide image
    ])
    write_png(images / "plain.png", 20, 10, bits=8)
    write_xml(ann / "plain.xml", "plain.png", (20, 10))
    write_png(images / "truncated.png", 40, 30)
    data = (images / "truncated.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    write_xml(ann / "truncated.xml", "truncated.png", (40, 30))
    write_png(images / "mismatch.png", 40, 30)
    write_xml(ann / "mismatch.xml", "mismatch.png", (50, 50))
    write_xml(ann / "missing.xml", "missing.png", (40, 30))
    Image.new("RGB", (16, 12), (200, 100, 50)).save(images / "photo.jpg")
    write_xml(ann / "photo.xml", "photo.png", (16, 12))  # the XML says .png; only a .jpg exists
    return root


def test_tree_gives_expected_records(tree, caplog):
    caplog.set_level(logging.WARNING)
    records, rejects = run(tree)
    by_id = {record.image_id: record for record in records}
    assert set(by_id) == {GRAZ_STEM, "plain", "photo"}

    graz = by_id[GRAZ_STEM]
    assert (graz.patient_id, graz.study, graz.laterality, graz.view, graz.sex, graz.age) == ("1", 1, "L", "ap", "M",
                                                                                               14.0)
    assert (graz.width, graz.height, graz.bit_depth) == (40, 30, 16)
    assert graz.path == str(tree / "JPEGImages" / f"{GRAZ_STEM}.png")  # a 16-bit PNG is used as it is
    assert graz.boxes == [Box("fracture", 0, 0, 10, 10), Box("fracture", 4, 4, 16, 16), Box("text", 29, 19, 11, 11)]
    assert graz.fracture_visible  # no dataset.csv: a fracture box makes the fracture visible
    assert graz.ao_codes == [] and graz.source == f"Annotations/{GRAZ_STEM}.xml"

    plain = by_id["plain"]
    assert (plain.patient_id, plain.study, plain.bit_depth, plain.view, plain.age) == ("plain", 1, 8, "unknown", None)
    assert not plain.fracture_visible

    photo = by_id["photo"]
    assert photo.path == str(tree.parent / "work" / "images" / "photo.png")
    with Image.open(photo.path) as image:
        assert (image.format, image.mode, image.size, photo.bit_depth) == ("PNG", "L", (16, 12), 8)

    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("2 image(s)") and "patient grouping is unknown" in warning  # plain and photo


def test_tree_rejects_say_why(tree):
    records, rejects = run(tree)
    where = f"Annotations/{GRAZ_STEM}.xml"
    assert "not used" in one(rejects, f"{where}:object 4").reason
    assert "'tumour' is not in labels.txt" in one(rejects, f"{where}:object 5").reason
    assert "degenerate" in one(rejects, f"{where}:object 6").reason
    assert "outside the 40×30 image" in one(rejects, f"{where}:object 7").reason
    truncated = one(rejects, "JPEGImages/truncated.png").reason
    assert "cannot be decoded" in truncated and "truncated" in truncated
    mismatch = one(rejects, "Annotations/mismatch.xml").reason
    assert "50×50" in mismatch and "40×30" in mismatch
    assert "'missing.png' not found" in one(rejects, "Annotations/missing.xml").reason


def test_counts_reconcile(tree):
    records, rejects = run(tree)
    images = image_level(records, rejects)
    assert len(list((tree / "Annotations").glob("*.xml"))) == len(records) + len(images)
    assert {r.source for r in images} == {"JPEGImages/truncated.png", "Annotations/mismatch.xml",
                                          "Annotations/missing.xml"}
    assert len(rejects) - len(images) == 4  # the four unusable boxes; their image is kept


def test_one_warning_only_for_many_ungrouped_images(tmp_path, caplog):
    root = make_root(tmp_path)
    for name in ("a", "b", "c"):
        write_png(root / "JPEGImages" / f"{name}.png", 8, 8)
        write_xml(root / "Annotations" / f"{name}.xml", f"{name}.png", (8, 8))
    caplog.set_level(logging.WARNING)
    records, _ = run(root)
    assert len({r.patient_id for r in records}) == 3
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("3 image(s)")


def write_dataset_csv(path: Path, rows: list[dict]) -> None:
    lines = [",".join(CSV_COLUMNS)] + [",".join(f'"{row.get(col, "")}"' for col in CSV_COLUMNS) for row in rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))  # as released: BOM and CRLF


def test_dataset_csv_supplies_metadata(tmp_path, caplog):
    root = make_root(tmp_path)
    for stem in (GRAZ_STEM, "plain"):
        write_png(root / "JPEGImages" / f"{stem}.png", 8, 8)
    write_xml(root / "Annotations" / "a.xml", f"{GRAZ_STEM}.png", (8, 8), [("fracture", 1, 1, 4, 4)])
    write_xml(root / "Annotations" / "b.xml", "plain.png", (8, 8))
    write_dataset_csv(root / "dataset.csv", [
        {"filestem": GRAZ_STEM, "patient_id": "1", "study_number": "2", "gender": "M", "age": "14.2",
         "laterality": "R", "projection": "2", "ao_classification": "23r-E/2.1; 23u-E/7,23-M/3.1",
         "diagnosis_uncertain": "1", "fracture_visible": ""},
        {"filestem": "plain", "patient_id": "7", "study_number": "1.0", "gender": "F", "age": "9",
         "laterality": "L", "projection": "3", "fracture_visible": "1"},
    ])
    caplog.set_level(logging.WARNING)
    records, rejects = run(root)
    graz, plain = sorted(records, key=lambda r: r.image_id != GRAZ_STEM)
    # the CSV wins over the stem (study 2, side R, lateral, age 14.2) and over the boxes (not visible)
    assert (graz.patient_id, graz.study, graz.laterality, graz.view, graz.age) == ("1", 2, "R", "lat", 14.2)
    assert graz.ao_codes == ["23r-E/2.1", "23u-E/7", "23-M/3.1"]
    assert graz.diagnosis_uncertain and not graz.fracture_visible and len(graz.boxes) == 1
    assert (plain.patient_id, plain.study, plain.sex, plain.view, plain.age) == ("7", 1, "F", "oblique", 9.0)
    assert plain.fracture_visible and plain.ao_codes == []
    assert not rejects and not caplog.records  # grouping is known for both


def test_bad_dataset_csv_value_rejects_the_image(tmp_path):
    root = make_root(tmp_path)
    write_png(root / "JPEGImages" / "a.png", 8, 8)
    write_xml(root / "Annotations" / "a.xml", "a.png", (8, 8))
    write_dataset_csv(root / "dataset.csv", [{"filestem": "a", "patient_id": "x", "study_number": "1"}])
    records, rejects = run(root)
    assert not records and rejects[0].source == "dataset.csv:row 2" and "patient_id" in rejects[0].reason


def test_dataset_ids_select_the_converted_annotations(tmp_path):
    root = make_root(tmp_path)
    for name in ("a", "b"):
        write_png(root / "JPEGImages" / f"{name}.png", 8, 8)
        write_xml(root / "Annotations" / f"{name}.xml", f"{name}.png", (8, 8))
    (root / "dataset_ids").mkdir()
    (root / "dataset_ids" / "train.txt").write_text("a\n")
    (root / "dataset_ids" / "val.txt").write_text("ghost\n")
    records, rejects = run(root)
    assert [r.image_id for r in records] == ["a"]
    assert "not listed in dataset_ids" in one(rejects, "Annotations/b.xml").reason
    assert "'ghost' has no Annotations/ghost.xml" in one(rejects, "dataset_ids/val.txt").reason


def test_broken_and_duplicate_annotations_are_rejected(tmp_path):
    root = make_root(tmp_path)
    write_png(root / "JPEGImages" / "a.png", 8, 8)
    write_xml(root / "Annotations" / "a.xml", "a.png", (8, 8))
    write_xml(root / "Annotations" / "a_copy.xml", "a.png", (8, 8))
    (root / "Annotations" / "broken.xml").write_text("<annotation><filename>a.png")
    write_xml(root / "Annotations" / "nameless.xml", "", (8, 8))
    records, rejects = run(root)
    assert [r.image_id for r in records] == ["a"]
    duplicate = one(rejects, "Annotations/a_copy.xml")
    assert "already annotated by Annotations/a.xml" in duplicate.reason
    assert duplicate.image_id is None  # so convert counts it as an image, not as a box of the kept "a"
    assert "not a readable XML" in one(rejects, "Annotations/broken.xml").reason
    assert "names no image" in one(rejects, "Annotations/nameless.xml").reason
    assert len(image_level(records, rejects)) == 3


def test_image_dir_is_configurable(tmp_path):
    root = make_root(tmp_path)
    write_png(root / "PNGImages" / "a.png", 8, 8)
    write_xml(root / "Annotations" / "a.xml", "a.png", (8, 8))
    records, _ = run(root, {"voc_image_dir": "PNGImages"})
    assert records[0].path == str(root / "PNGImages" / "a.png")


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda root: root.rename(root.with_name("elsewhere")), "not a folder"),
    (lambda root: (root / "Annotations").rmdir(), "Annotations: folder not found"),
    (lambda root: (root / "labels.txt").unlink(), "labels.txt not found"),
    (lambda root: (root / "labels.txt").write_text("\n"), "lists no label names"),
    (lambda root: (root / "dataset.csv").write_text("filestem,patient_id\n"), "missing column(s) study_number"),
])
def test_unusable_input_raises_naming_the_file(tmp_path, breakage, message):
    root = make_root(tmp_path)
    breakage(root)
    with pytest.raises(DataSourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(root)
