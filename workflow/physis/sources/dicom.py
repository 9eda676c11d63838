"""A folder of DICOM files plus a labels CSV, read as a physis data source.

Layout: DICOM files anywhere under ``root`` (any name or extension; a file is DICOM when pydicom
reads it) and ``root/{dataset.labels_csv}`` with columns ``file`` (path relative to root),
``ao_classification``, ``fracture_visible`` (1, 0 or empty), optional ``diagnosis_uncertain`` and
optional ``boxes`` (a JSON list of ``[class, x, y, w, h]`` in pixels). A row and a file meet by
path; either one alone is rejected, and so is a second file holding the same SOP instance.

Pixels go through pydicom's own helpers (modality LUT, then VOI LUT or window, MONOCHROME1
inverted so bone is bright), are scaled linearly to 0–65535 and written as a 16-bit PNG.

Privacy: nothing that identifies a patient leaves this module. ``patient_id`` is
``sha256(salt + PatientID)[:12]``, ``image_id`` a salted hash of the SOP Instance UID, ``study``
the rank of the study among the patient's studies, and age is computed, never the dates behind
it. The salt comes from ``PHYSIS_PSEUDONYM_SALT`` (else ``dataset.pseudonym_salt``) and is
never logged. Reject reasons and log lines quote only paths relative to root and text with
dates, UIDs and the file's patient identifiers removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from physis import ao
from physis.images import write_gray16
from physis.io import atomic_path
from physis.records import YOLO_CLASSES, Box, ImageRecord, Rejected
from physis.sources import DataSourceError
from physis.sources import fit_box, parse_flag

log = logging.getLogger(__name__)

SALT_ENV = "PHYSIS_PSEUDONYM_SALT"
REQUIRED_COLUMNS = ("file", "ao_classification", "fracture_visible")
#: Header elements whose values identify a patient or a visit; scrubbed from any text we emit.
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
               "StudyID", "InstitutionName", "ReferringPhysicianName")
_VIEW_POSITIONS = {"AP": "ap", "PA": "ap", "LAT": "lat", "LL": "lat", "RL": "lat", "LLO": "oblique",
                   "RLO": "oblique"}
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_UID_OR_DATE = re.compile(r"\b\d+(?:\.\d+){3,}\b|\b(?:19|20)\d{6}\b")
_STUDY_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@dataclass
class LabelRow:
    source: str  # "labels.csv:row 7" (row 1 is the header, as in a spreadsheet)
    ao_codes: list[str]
    fracture_visible: bool
    diagnosis_uncertain: bool
    boxes: list  # raw JSON entries, checked once the image size is known


def pseudonym(salt: str, value: str, length: int = 12) -> str:
    """``sha256(salt + value)`` in hex, cut to ``length``: stable per salt, not reversible without it."""
    return hashlib.sha256((salt + value).encode("utf-8")).hexdigest()[:length]


def salt_from(cfg: dict) -> str:
    """The pseudonym salt: the environment variable wins over the config key."""
    return os.environ.get(SALT_ENV) or cfg.get("pseudonym_salt", "") or ""


def scrub(text: str, ds: Dataset | None = None, root: Path | None = None) -> str:
    """One line of ``text`` without UIDs, dates, ``root`` or the identifying values of ``ds``."""
    text = " ".join(str(text).split())
    if root is not None:
        text = text.replace(f"{root}{os.sep}", "").replace(str(root), "")
    for keyword in IDENTIFYING if ds is not None else ():
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 2:
            text = text.replace(value, "[removed]")
    text = _UID_OR_DATE.sub("[removed]", text)
    return text[:300]


def _describe(err: BaseException, ds: Dataset | None, root: Path) -> str:
    return scrub(str(err), ds, root) or type(err).__name__


def age_years(ds: Dataset) -> float | None:
    """PatientAge (``012Y``, ``006M``), else study date − birth date; None when neither is known."""
    match = _AGE.match(str(ds.get("PatientAge", "") or "").strip().upper())
    if match:
        return round(int(match[1]) * _AGE_UNIT_YEARS[match[2]], 1)
    birth = _date(ds.get("PatientBirthDate"))
    seen = next((d for d in (_date(ds.get(k)) for k in _STUDY_DATES) if d is not None), None)
    if birth is None or seen is None or seen < birth:
        return None
    return round((seen - birth).days / 365.25, 1)


def _date(value) -> date | None:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) == 8 else None
    except ValueError:
        return None


def view_of(ds: Dataset) -> str:
    return _VIEW_POSITIONS.get(str(ds.get("ViewPosition", "") or "").strip().upper(), "unknown")


def laterality_of(ds: Dataset) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        side = str(ds.get(keyword, "") or "").strip().upper()
        if side in ("L", "R"):
            return side
    return "U"


def sex_of(ds: Dataset) -> str:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return sex if sex in ("M", "F", "O") else "U"


def grey_pixels(ds: Dataset, source: str) -> np.ndarray:
    """The first frame as a 2-D uint16 array, bone bright, scaled to the full 0–65535 range."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        log.info("%s: %d frames, using the first only", source, frames)
    pixels = pixel_array(ds, index=0)  # YBR colour comes back as RGB
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:
        pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    else:
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        raise ValueError("the image is blank (every pixel has the same value)")
    scaled = np.rint((pixels - low) * (65535.0 / (high - low))).astype(np.uint16)
    return 65535 - scaled if photometric == "MONOCHROME1" else scaled


def read_label_rows(path: Path) -> tuple[dict[str, LabelRow | None], list[Rejected]]:
    """Label rows by normalised file path; unusable and duplicate rows become rejects.

    A file whose row was rejected maps to None: that reject already accounts for it.
    """
    if not path.is_file():
        raise DataSourceError(f"{path}: labels CSV not found (dataset.labels_csv names it)")
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataSourceError(f"{path}: not a readable CSV ({err})") from err
    missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise DataSourceError(f"{path}: missing column(s) {', '.join(missing)}")
    rows: dict[str, LabelRow | None] = {}
    first_row: dict[str, str] = {}
    rejects: list[Rejected] = []
    for number, row in enumerate(frame.to_dict("records"), start=2):
        source = f"{path.name}:row {number}"
        file = _normalise_path(row["file"])
        if file is None:
            rejects.append(Rejected(source, f"file {row['file']!r} is not a path inside the data set root"))
            continue
        if file in first_row:
            rejects.append(Rejected(source, f"a second row for {file} (the first is {first_row[file]})"))
            continue
        first_row[file] = source
        try:
            boxes = json.loads(row["boxes"]) if row.get("boxes", "").strip() else []
            if not isinstance(boxes, list):
                raise ValueError("boxes must be a JSON list of [class, x, y, w, h]")
            rows[file] = LabelRow(source, ao.split_codes(row["ao_classification"]), parse_flag(row["fracture_visible"]),
                                  parse_flag(row.get("diagnosis_uncertain", "")), boxes)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            rejects.append(Rejected(source, f"bad value for {file}: {err}"))
            rows[file] = None
    return rows, rejects


def _normalise_path(text: str) -> str | None:
    """A CSV path as ``a/b.dcm`` relative to root; None when empty, absolute or escaping root."""
    path = PurePosixPath(text.strip().replace("\\", "/"))
    if not text.strip() or path.is_absolute() or ".." in path.parts:
        return None
    return path.as_posix()


def read_boxes(entries: list, width: int, height: int, source: str, image_id: str) -> tuple[list[Box], list[Rejected]]:
    """``[class, x, y, w, h]`` entries → clipped boxes; each unusable entry becomes a reject."""
    boxes: list[Box] = []
    rejects: list[Rejected] = []
    for number, entry in enumerate(entries, start=1):
        where = f"{source} box {number}"
        if not (isinstance(entry, list) and len(entry) == 5
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry[1:])):
            rejects.append(Rejected(where, f"expected [class, x, y, w, h] with numbers, got {entry!r}", image_id))
            continue
        cls = entry[0]
        if isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < len(YOLO_CLASSES):
            cls = YOLO_CLASSES[cls]
        if cls not in YOLO_CLASSES:
            rejects.append(Rejected(where, f"class {cls!r} is not a GRAZPEDWRI class ({', '.join(YOLO_CLASSES)})",
                                    image_id))
            continue
        box = fit_box(cls, *map(float, entry[1:]), width, height)
        if isinstance(box, str):
            rejects.append(Rejected(where, box, image_id))
        else:
            boxes.append(box)
    return boxes, rejects


def _read_header(path: Path, force: bool = True) -> Dataset:
    """The header only. pydicom's warnings are dropped here because they may quote header values;
    for a labelled file the full read logs them again, scrubbed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True, force=force)


def _study_ranks(root: Path, files: list[str], salt: str) -> dict[str, tuple[str, int]]:
    """file → (pseudonymous patient id, rank of its study among that patient's studies).

    Files without a PatientID (or an unreadable header) are left out: each becomes its own patient.

    Reads headers only; the dates and UIDs used for ordering stay inside this function.
    """
    keys: dict[str, tuple[str, tuple]] = {}
    studies: dict[str, set[tuple]] = defaultdict(set)
    for file in files:
        try:
            ds = _read_header(root / file)
        except Exception:  # noqa: BLE001 - reported when the full read fails again
            continue
        patient = str(ds.get("PatientID", "") or "").strip()
        if not patient:
            continue
        study_date = str(ds.get("StudyDate", "") or "").strip()
        study = (study_date == "", study_date, str(ds.get("StudyTime", "") or ""),
                 str(ds.get("StudyInstanceUID", "") or ""))  # undated studies sort last
        patient_id = pseudonym(salt, patient)
        keys[file] = (patient_id, study)
        studies[patient_id].add(study)
    order = {pid: {study: rank for rank, study in enumerate(sorted(found), start=1)} for pid, found in studies.items()}
    return {file: (pid, order[pid][study]) for file, (pid, study) in keys.items()}


def _convert(root: Path, file: str, label: LabelRow, patient: tuple[str, int] | None, salt: str,
             work_dir: Path, kept: dict[str, str]) -> tuple[ImageRecord | Rejected, list[Rejected]]:
    """One labelled file → its record (and box rejects), or one image-level reject."""
    with warnings.catch_warnings(record=True) as caught:  # pydicom's warnings may quote header values
        warnings.simplefilter("always")
        ds, result = _decode(root, file, salt, kept)
    for note in caught:
        log.debug("%s: pydicom: %s", file, scrub(str(note.message), ds, root))
    if isinstance(result, Rejected):
        return result, []
    image_id, pixels = result
    height, width = pixels.shape
    path = Path(work_dir) / "images" / f"{image_id}.png"
    with atomic_path(path) as tmp:
        write_gray16(tmp, pixels)
    kept[image_id] = file
    patient_id, study = patient or (image_id[:12], 1)
    boxes, box_rejects = read_boxes(label.boxes, width, height, label.source, image_id)
    record = ImageRecord(
        image_id=image_id, patient_id=patient_id, study=study, view=view_of(ds), laterality=laterality_of(ds),
        age=age_years(ds), sex=sex_of(ds), path=str(path), width=width, height=height, bit_depth=16,
        ao_codes=label.ao_codes, fracture_visible=label.fracture_visible,
        diagnosis_uncertain=label.diagnosis_uncertain, boxes=boxes, source=file,
    )
    return record, box_rejects


def _decode(root: Path, file: str, salt: str,
            kept: dict[str, str]) -> tuple[Dataset | None, tuple[str, np.ndarray] | Rejected]:
    """Read and decode one file: the dataset (when read) and either (image id, grey pixels) or a reject."""
    try:
        ds = pydicom.dcmread(root / file, force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        return None, Rejected(file, f"not a readable DICOM file: {_describe(err, None, root)}")
    if "PixelData" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", "")
        what = f" ({kind})" if kind and not _UID_OR_DATE.search(kind) else ""
        return ds, Rejected(file, f"no image: the file{what} has no DICOM pixel data")
    try:
        pixels = grey_pixels(ds, file)
    except Exception as err:  # noqa: BLE001 - decoders raise many types
        return ds, Rejected(file, f"pixel data cannot be decoded ({_syntax_name(ds)}): {_describe(err, ds, root)}")
    instance = str(ds.get("SOPInstanceUID", "") or "").strip()
    image_id = pseudonym(salt, instance or f"path:{file}", 16)
    if image_id in kept:
        return ds, Rejected(file, f"same image (SOP instance) as {kept[image_id]}, which is kept")
    return ds, (image_id, pixels)


def _syntax_name(ds: Dataset) -> str:
    syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    name = getattr(syntax, "name", "")
    return name if name and not _UID_OR_DATE.search(name) else "unknown transfer syntax"


def _is_dicom(path: Path) -> bool:
    """True when pydicom reads the file as DICOM without being forced (header only)."""
    try:
        _read_header(path, force=False)
    except Exception:  # noqa: BLE001 - InvalidDicomError for most, anything for odd bytes
        return False
    return True


def read(root: Path, cfg: dict, work_dir: Path) -> Iterator[ImageRecord | Rejected]:
    """Yield a record or a reject per labelled file, a reject per label row without a file and per DICOM
    file without a row, and rejects for unusable boxes of kept images."""
    root = Path(root)
    if not root.is_dir():
        raise DataSourceError(f"{root}: DICOM root is not a folder")
    labels_path = root / cfg.get("labels_csv", "labels.csv")
    rows, row_rejects = read_label_rows(labels_path)
    yield from row_rejects
    salt = salt_from(cfg)
    if not salt:
        log.warning("no pseudonym salt set (%s or dataset.pseudonym_salt): patient and image ids are plain "
                    "hashes that anyone holding the original IDs can recompute", SALT_ENV)

    files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                   if path.is_file() and path != labels_path)
    present = set(files)
    for file, label in rows.items():
        if label is not None and file not in present:
            yield Rejected(label.source, f"file {file} does not exist under the data set root")
    ignored = 0
    for file in files:
        if file not in rows:
            if _is_dicom(root / file):
                yield Rejected(file, f"DICOM file without a label row in {labels_path.name}")
            else:
                ignored += 1
    if ignored:
        log.info("ignored %d file(s) that are neither DICOM nor listed in %s", ignored, labels_path.name)

    labelled = [file for file in files if rows.get(file) is not None]
    patients = _study_ranks(root, labelled, salt)
    without_patient = 0
    kept: dict[str, str] = {}  # image id → the file kept for it
    for file in labelled:
        result, box_rejects = _convert(root, file, rows[file], patients.get(file), salt, work_dir, kept)
        if isinstance(result, ImageRecord) and file not in patients:
            without_patient += 1
        yield result
        yield from box_rejects
    if without_patient:
        log.warning("%d image(s) have no PatientID: each counts as its own patient, so splits cannot keep a "
                    "patient's images together", without_patient)
