"""GRAZPEDWRI-DX as released (and as the phantom writes it).

Layout: ``dataset.csv`` (UTF-8 with BOM, CRLF, 17 columns, flags ``1`` or empty),
``images_part1..4/*.png`` (16-bit grayscale) and ``folder_structure/yolov5/labels/{stem}.txt``
(normalised YOLO boxes, class ids in :data:`physis.records.YOLO_CLASSES` order). A CSV row and
an image file meet by file stem; either one alone is rejected, as is a duplicate stem.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from physis.images import ImageReadError, probe_image
from physis.records import CSV_COLUMNS, YOLO_CLASSES, YOLO_LABEL_DIR, Box, ImageRecord, Rejected
from physis.sources import PROJECTION_VIEWS, DataSourceError, fit_box, parse_flag, parse_int, read_table

log = logging.getLogger(__name__)

LABEL_DIR = Path(YOLO_LABEL_DIR)


def read_csv(path: Path, encoding: str = "utf-8-sig") -> pd.DataFrame:
    """Read ``dataset.csv`` as text (flags stay ``1``/empty); fail naming the file."""
    if not path.is_file():
        raise DataSourceError(f"{path}: dataset.csv not found (dataset.root must point at the unzipped release)")
    return read_table(path, encoding, CSV_COLUMNS)


def index_images(root: Path) -> tuple[dict[str, Path], list[Rejected]]:
    """Map stem → image path over ``images_part*``; later copies of a stem are rejected."""
    found: dict[str, Path] = {}
    duplicates: list[Rejected] = []
    for path in sorted(root.glob("images_part*/*.png")):
        if path.stem in found:
            duplicates.append(Rejected(
                str(path.relative_to(root)),
                f"duplicate file stem: {found[path.stem].relative_to(root)} has the same name",
            ))
        else:
            found[path.stem] = path
    return found, duplicates


def read_yolo_labels(path: Path, width: int, height: int, source: str) -> tuple[list[Box], list[Rejected]]:
    """Parse one YOLO label file into pixel boxes clipped to the image; bad lines become rejects."""
    boxes: list[Box] = []
    rejects: list[Rejected] = []
    stem = path.stem
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:line {number}"
        parts = line.split()
        try:
            if len(parts) != 5:
                raise ValueError(f"expected 'class xc yc w h', got {len(parts)} fields")
            cls = int(parts[0])
            xc, yc, w, h = (float(p) for p in parts[1:])
        except ValueError as err:
            rejects.append(Rejected(where, f"unreadable label line: {err}", stem))
            continue
        if not 0 <= cls < len(YOLO_CLASSES):
            rejects.append(Rejected(where, f"class id {cls} out of range 0–{len(YOLO_CLASSES) - 1}", stem))
            continue
        box = fit_box(YOLO_CLASSES[cls], (xc - w / 2) * width, (yc - h / 2) * height, w * width, h * height,
                      width, height)
        if isinstance(box, str):
            rejects.append(Rejected(where, box, stem))
        else:
            boxes.append(box)
    return boxes, rejects


def _record(row: pd.Series, path: Path, root: Path, source: str) -> tuple[ImageRecord, list[Rejected]]:
    stem = row["filestem"]
    width, height, depth = probe_image(path)
    label_path = root / LABEL_DIR / f"{stem}.txt"
    boxes, rejects = ([], []) if not label_path.is_file() else read_yolo_labels(
        label_path, width, height, str(LABEL_DIR / label_path.name))
    age = row["age"].strip()
    record = ImageRecord(
        image_id=stem,
        patient_id=str(parse_int(row["patient_id"], "patient_id")),
        study=parse_int(row["study_number"], "study_number"),
        view=PROJECTION_VIEWS.get(row["projection"].strip().split(".")[0], "unknown"),
        laterality=row["laterality"].strip() if row["laterality"].strip() in ("L", "R") else "U",
        age=float(age) if age else None,
        sex=row["gender"].strip() if row["gender"].strip() in ("M", "F", "O") else "U",
        path=str(path),
        width=width,
        height=height,
        bit_depth=depth,
        ao_codes=[row["ao_classification"]] if row["ao_classification"].strip() else [],
        fracture_visible=parse_flag(row["fracture_visible"]),
        diagnosis_uncertain=parse_flag(row["diagnosis_uncertain"]),
        boxes=boxes,
        source=source,
    )
    return record, rejects


def read(root: Path, cfg: dict, work_dir: Path) -> Iterator[ImageRecord | Rejected]:
    """Yield one record or reject per CSV row, then a reject per image file without a row.

    ``ImageRecord.ao_codes`` holds the raw ``ao_classification`` cell; convert parses it.
    """
    root = Path(root)
    frame = read_csv(root / "dataset.csv", cfg.get("csv_encoding", "utf-8-sig"))
    images, duplicates = index_images(root)
    yield from duplicates
    seen: set[str] = set()
    for number, row in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        row = pd.Series(row)
        stem = row["filestem"].strip()
        row["filestem"] = stem
        source = f"dataset.csv:line {number}"
        if stem in seen:
            yield Rejected(source, f"duplicate CSV row for {stem}")
            continue
        seen.add(stem)
        if stem not in images:
            yield Rejected(source, f"CSV row without image: no images_part*/{stem}.png", stem)
            continue
        try:
            record, rejects = _record(row, images[stem], root, source)
        except ImageReadError as err:
            yield Rejected(str(images[stem].relative_to(root)), str(err).removeprefix(f"{images[stem]}: "), stem)
            continue
        except ValueError as err:
            yield Rejected(source, f"bad CSV value: {err}", stem)
            continue
        yield record
        yield from rejects
    for stem in sorted(set(images) - seen):
        yield Rejected(str(images[stem].relative_to(root)), "image without a row in dataset.csv", stem)
