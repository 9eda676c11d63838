"""The records every data source yields, and what the convert stage writes.

A source (``physis.sources.<format>``) turns one on-disk layout into a stream of
:class:`ImageRecord` (an image it can use) and :class:`Rejected` (an input it cannot use,
with a human-readable reason). The convert stage never drops an input silently: every
item a source sees ends up as a kept record or a rejects row, so counts reconcile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: GRAZPEDWRI-DX YOLO class ids, in the release's order (id = index).
YOLO_CLASSES: tuple[str, ...] = (
    "boneanomaly",
    "bonelesion",
    "foreignbody",
    "fracture",
    "metal",
    "periostealreaction",
    "pronatorsign",
    "softtissue",
    "text",
)

VIEWS = ("ap", "lat", "oblique", "unknown")

#: GRAZPEDWRI-DX ``dataset.csv`` columns, in the release's order.
CSV_COLUMNS: tuple[str, ...] = (
    "filestem", "patient_id", "study_number", "timehash", "gender", "age", "laterality",
    "projection", "initial_exam", "ao_classification", "cast", "diagnosis_uncertain",
    "osteopenia", "fracture_visible", "metal", "pixel_spacing", "device_manufacturer",
)

#: Optional manifest column (phantom data only): displacement of the film's physeal fracture, percent of the
#: bone's width (physis.phantom.attach_truth); evaluate reports sensitivity in thirds of it.
CONSPICUITY = "phantom_displacement_pct"

#: Where the release keeps its YOLO label files, relative to the data set root.
YOLO_LABEL_DIR = "folder_structure/yolov5/labels"


@dataclass(frozen=True)
class Box:
    """One annotated box in pixels of the original image: top-left corner, width, height.

    ``clipped``: the annotation reached outside the image and was cut to it (counted in the manifest).
    """

    cls: str
    x: float
    y: float
    w: float
    h: float
    clipped: bool = field(default=False, compare=False)


@dataclass
class ImageRecord:
    """One usable image and everything known about it, before labelling and splitting.

    ``path`` points at a lossless single-channel PNG (the original for PNG sources; a PNG
    that the source wrote for DICOM). ``patient_id`` is already pseudonymous.
    """

    image_id: str
    patient_id: str
    study: int
    view: str  # one of VIEWS
    laterality: str  # "L", "R" or "U" (unknown)
    age: float | None
    sex: str  # "M", "F", "O" or "U"
    path: str
    width: int
    height: int
    bit_depth: int
    ao_codes: list[str] = field(default_factory=list)
    fracture_visible: bool = False
    diagnosis_uncertain: bool = False
    boxes: list[Box] = field(default_factory=list)
    source: str = ""  # the file (or csv row) the record came from, for messages


@dataclass(frozen=True)
class Rejected:
    """An input a source could not use. ``source`` names the file or row; ``reason`` says why."""

    source: str
    reason: str
    image_id: str | None = None
