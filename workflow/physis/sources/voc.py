"""The thesis's Pascal VOC layout (its Listings 7.1/7.2), read as a physis data source.

Layout under ``root``::

    Annotations/{id}.xml          one VOC annotation per image: filename, size, objects
    JPEGImages/{filename}         the images (folder name: ``dataset.voc_image_dir``), PNG or JPEG
    labels.txt                    the label names the annotators used, one per line
    dataset_ids/{train,val}.txt   optional: the annotation ids the thesis converted
    dataset.csv                   optional: GRAZPEDWRI-DX metadata, matched by file stem

VOC corners are 1-based and inclusive; :func:`voc_to_coco_bbox` turns them into COCO's 0-based
``x, y, w, h`` exactly as the thesis's converter did. VOC carries no patient data, so patient,
study, view, side, sex and age come from ``dataset.csv`` when it has the stem, else from a
GRAZPEDWRI-style file stem, else each image counts as its own patient (and a warning says so,
because patient-level splits are then only image-level).
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from physis import ao
from physis.images import ImageReadError, probe_image, read_gray, write_gray16
from physis.io import atomic_path
from physis.records import YOLO_CLASSES, Box, ImageRecord, Rejected
from physis.sources import PROJECTION_VIEWS, DataSourceError, fit_box, parse_flag, parse_int
from physis.sources.grazpedwri import read_csv

log = logging.getLogger(__name__)

#: Normalised VOC label name → GRAZPEDWRI class. "fracture student" boxes were drawn by a
#: student annotator and still mark a fracture; names missing here (``axis``) are not used.
LABEL_TO_CLASS: dict[str, str] = {"fracture": "fracture", "fracture_student": "fracture",
                                  **{name: name for name in YOLO_CLASSES}}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
SPLIT_LISTS = ("train", "val")
_LOSSLESS_MODES = ("L", "I;16", "I;16B", "I;16L")
_GRAZ_STEM = re.compile(
    r"^(?P<patient>\d+)_(?P<timehash>\d+)_(?P<study>\d+)_WRI-(?P<side>[LR])(?P<projection>[123])"
    r"_(?P<sex>[MFO])(?P<age>\d{3})$")


def voc_to_coco_bbox(xmin: float, ymin: float, xmax: float, ymax: float) -> tuple[float, float, float, float]:
    """VOC's 1-based inclusive corners → COCO's 0-based ``(x, y, w, h)`` (thesis Listing 7.2).

    ``x = xmin - 1``, ``w = xmax - (xmin - 1)``: a box covering pixels 1…10 starts at 0 and is 10 wide.
    """
    x, y = xmin - 1, ymin - 1
    return x, y, xmax - x, ymax - y


def normalise_label(name: str) -> str:
    """``Fracture Student`` and ``fracture-student`` both become ``fracture_student``."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower())


def read_label_names(path: Path) -> set[str]:
    """The names in ``labels.txt`` (one per line, so names may contain spaces), normalised."""
    if not path.is_file():
        raise DataSourceError(f"{path}: labels.txt not found (the VOC layout lists its label names there)")
    names = {normalise_label(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}
    if not names:
        raise DataSourceError(f"{path}: labels.txt lists no label names")
    return names


def read_listed_ids(root: Path) -> dict[str, str] | None:
    """Annotation id → the ``dataset_ids`` list naming it; None when the folder has no lists."""
    listed: dict[str, str] = {}
    for split in SPLIT_LISTS:
        path = root / "dataset_ids" / f"{split}.txt"
        if path.is_file():
            for ann_id in path.read_text(encoding="utf-8-sig").split():  # the thesis splits on whitespace
                listed.setdefault(ann_id, f"dataset_ids/{split}.txt")
    return listed or None


def read_metadata_rows(root: Path, encoding: str = "utf-8-sig") -> dict[str, tuple[int, dict]]:
    """``dataset.csv`` rows by file stem (with their row number); empty when there is no CSV."""
    path = root / "dataset.csv"
    if not path.exists():
        return {}
    rows: dict[str, tuple[int, dict]] = {}
    for number, row in enumerate(read_csv(path, encoding).to_dict("records"), start=2):  # row 1 is the header
        rows.setdefault(row["filestem"].strip(), (number, row))
    return rows


def metadata_from_row(row: dict) -> dict:
    """Record fields from one GRAZPEDWRI ``dataset.csv`` row (raises ValueError on a bad value)."""
    age, side, sex = row["age"].strip(), row["laterality"].strip(), row["gender"].strip()
    return {
        "patient_id": str(parse_int(row["patient_id"], "patient_id")),
        "study": parse_int(row["study_number"], "study_number"),
        "view": PROJECTION_VIEWS.get(row["projection"].strip().split(".")[0], "unknown"),
        "laterality": side if side in ("L", "R") else "U",
        "age": float(age) if age else None,
        "sex": sex if sex in ("M", "F", "O") else "U",
        "ao_codes": ao.split_codes(row["ao_classification"]),
        "fracture_visible": parse_flag(row["fracture_visible"]),
        "diagnosis_uncertain": parse_flag(row["diagnosis_uncertain"]),
    }


def metadata_from_stem(stem: str) -> dict | None:
    """Record fields from a GRAZPEDWRI file stem (``0001_1297860395_01_WRI-L1_M014``), else None."""
    match = _GRAZ_STEM.match(stem)
    if match is None:
        return None
    return {
        "patient_id": str(int(match["patient"])),
        "study": int(match["study"]),
        "view": PROJECTION_VIEWS[match["projection"]],
        "laterality": match["side"],
        "age": float(match["age"]),
        "sex": match["sex"],
    }


def find_image(image_dir: Path, filename: str) -> Path | None:
    """The image an XML ``filename`` refers to, also under another PNG/JPEG suffix."""
    name = Path(filename.replace("\\", "/")).name
    candidates = [image_dir / name] + [image_dir / f"{Path(name).stem}{suffix}" for suffix in IMAGE_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


def as_lossless_png(image_path: Path, depth: int, work_dir: Path, image_id: str) -> Path:
    """The image as a single-channel PNG: the original when it is one, else a grey copy in ``work_dir``."""
    with Image.open(image_path) as image:
        if image.format == "PNG" and image.mode in _LOSSLESS_MODES:
            return image_path
        out = Path(work_dir) / "images" / f"{image_id}.png"
        with atomic_path(out) as tmp:
            if depth == 16:
                write_gray16(tmp, read_gray(image_path))
            else:
                image.convert("L").save(tmp, format="PNG")
        log.info("%s: %s %s image stored as a grey PNG", image_path.name, image.format, image.mode)
    return out


def read_boxes(objects: list[ET.Element], labels: set[str], width: int, height: int, where: str,
               image_id: str) -> tuple[list[Box], list[Rejected]]:
    """The usable boxes of one annotation; each unusable object becomes a reject (image kept)."""
    boxes: list[Box] = []
    rejects: list[Rejected] = []
    for number, obj in enumerate(objects, start=1):
        source = f"{where}:object {number}"
        name = (obj.findtext("name") or "").strip()
        key = normalise_label(name)
        if key not in labels:
            rejects.append(Rejected(source, f"label {name!r} is not in labels.txt", image_id))
            continue
        if key not in LABEL_TO_CLASS:
            rejects.append(Rejected(source, f"label {name!r} is not used (it has no GRAZPEDWRI class)", image_id))
            continue
        try:
            corners = [float(obj.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            rejects.append(Rejected(source, "bndbox is missing or its corners are not numbers", image_id))
            continue
        box = fit_box(LABEL_TO_CLASS[key], *voc_to_coco_bbox(*corners), width, height)
        if isinstance(box, str):
            rejects.append(Rejected(source, box, image_id))
        else:
            boxes.append(box)
    return boxes, rejects


def _xml_size(annotation: ET.Element) -> tuple[int, int] | None:
    """``size/width`` × ``size/height``; None when absent or zero (some tools leave them empty)."""
    try:
        size = int(annotation.findtext("size/width")), int(annotation.findtext("size/height"))
    except (TypeError, ValueError):
        return None
    return size if all(size) else None


def read(root: Path, cfg: dict, work_dir: Path) -> Iterator[ImageRecord | Rejected]:
    """Yield one record or image-level reject per annotation XML (plus rejects for unusable boxes).

    With ``dataset_ids/`` present, only the ids it lists are converted (as in the thesis); other
    XMLs and listed ids without an XML are rejected. The thesis's train/val assignment itself is
    not reused: physis splits by patient.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"{root}: VOC root is not a folder")
    ann_dir = root / "Annotations"
    image_dir = root / cfg.get("voc_image_dir", "JPEGImages")
    for folder in (ann_dir, image_dir):
        if not folder.is_dir():
            raise DataSourceError(f"{folder}: folder not found (expected the Pascal VOC layout: Annotations/, "
                                  f"{image_dir.name}/, labels.txt)")
    labels = read_label_names(root / "labels.txt")
    listed = read_listed_ids(root)
    metadata_rows = read_metadata_rows(root, cfg.get("csv_encoding", "utf-8-sig"))
    xml_paths = sorted(ann_dir.glob("*.xml"))
    if listed is not None:
        log.info("dataset_ids/ lists %d annotation ids; converting those (physis makes its own patient split)",
                 len(listed))
        present = {path.stem for path in xml_paths}
        for ann_id in sorted(set(listed) - present):
            yield Rejected(listed[ann_id], f"id {ann_id!r} has no Annotations/{ann_id}.xml")

    claimed: dict[str, str] = {}  # image stem → the annotation that uses it
    ungrouped = 0
    for xml_path in xml_paths:
        where = f"Annotations/{xml_path.name}"
        if listed is not None and xml_path.stem not in listed:
            yield Rejected(where, "not listed in dataset_ids/train.txt or dataset_ids/val.txt")
            continue
        try:
            annotation = ET.parse(xml_path).getroot()
        except ET.ParseError as err:
            yield Rejected(where, f"not a readable XML file ({err})")
            continue
        filename = (annotation.findtext("filename") or "").strip()
        if not filename:
            yield Rejected(where, "the XML names no image (<filename> is missing or empty)")
            continue
        image_path = find_image(image_dir, filename)
        if image_path is None:
            yield Rejected(where, f"image {filename!r} not found in {image_dir.name}/ (tried .png and .jpg)")
            continue
        image_id = image_path.stem
        image_rel = str(image_path.relative_to(root))
        if image_id in claimed:
            yield Rejected(where, f"image {image_rel} is already annotated by {claimed[image_id]}")
            continue
        claimed[image_id] = where
        try:
            width, height, depth = probe_image(image_path)
        except ImageReadError as err:
            yield Rejected(image_rel, f"image cannot be decoded: {str(err).removeprefix(f'{image_path}: ')}",
                           image_id)
            continue
        xml_size = _xml_size(annotation)
        if xml_size is not None and xml_size != (width, height):
            yield Rejected(where, f"XML size {xml_size[0]}×{xml_size[1]} does not match the image "
                                  f"{image_rel} ({width}×{height})", image_id)
            continue
        if image_id in metadata_rows:
            number, row = metadata_rows[image_id]
            try:
                meta = metadata_from_row(row)
            except ValueError as err:
                yield Rejected(f"dataset.csv:row {number}", f"bad value: {err}", image_id)
                continue
        else:
            meta = metadata_from_stem(image_id)
            if meta is None:
                ungrouped += 1
                meta = {"patient_id": image_id, "study": 1, "view": "unknown", "laterality": "U", "age": None,
                        "sex": "U"}
        boxes, box_rejects = read_boxes(annotation.findall("object"), labels, width, height, where, image_id)
        visible = meta.pop("fracture_visible", any(box.cls == "fracture" for box in boxes))
        yield ImageRecord(
            image_id=image_id, **meta, path=str(as_lossless_png(image_path, depth, work_dir, image_id)),
            width=width, height=height, bit_depth=depth, fracture_visible=visible, boxes=boxes, source=where,
        )
        yield from box_rejects
    if ungrouped:
        log.warning("%d image(s) have neither a dataset.csv row nor a GRAZPEDWRI file stem: patient grouping is "
                    "unknown, so each counts as its own patient and splits cannot keep a patient's images "
                    "together", ungrouped)
