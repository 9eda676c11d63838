"""A folder of DICOM files plus a labels CSV, read as a physis data source.

Layout: DICOM files anywhere under ``root`` (any name or extension; a file is DICOM when pydicom
reads it) and ``root/{dataset.labels_csv}`` with columns ``file`` (path relative to root),
``ao_classification``, ``fracture_visible`` (1, 0 or empty), optional ``diagnosis_uncertain`` and
optional ``boxes`` (a JSON list of ``[class, x, y, w, h]`` in pixels). A row and a file meet by
path; either one alone is rejected, and so is a second file holding the same SOP instance.

Pixels go through pydicom's own helpers (modality LUT, then VOI LUT or window, MONOCHROME1
inverted so bone is bright), are scaled linearly to 0–65535 and written as a 16-bit PNG.

Only radiographs are films: modality CR, DX, DR or RG, or a monochrome image with no modality, OT or
SC (a digitised film); CT, MR, NM, US, colour secondary captures and the rest are rejected, the
modality named in the reason.

Privacy: nothing that identifies a patient leaves this module. ``patient_id`` is
``sha256(salt + PatientID)[:12]``, ``image_id`` a salted hash of the SOP Instance UID, ``study``
the rank of the study among the patient's studies, and age is computed, never the dates behind
it. File paths are never written either (PACS exports name folders after the patient): rejects and
log lines name a file by its alias ``file-<salted hash of its path>``, and the table that maps
aliases and image ids back to paths is written next to the salt, outside the results. The salt
comes from ``PHYSIS_PSEUDONYM_SALT``, else from the salt file (``dataset.pseudonym_salt_file``),
which is created with a random salt and owner-only permissions on the first run; it is never
logged. Reject reasons and log lines also have dates, UIDs and the file's patient identifiers
removed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import secrets
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from physis import ao
from physis.images import write_gray16
from physis.io import atomic_path
from physis.records import YOLO_CLASSES, Box, ImageRecord, Rejected
from physis.sources import DataSourceError
from physis.sources import fit_box, parse_flag, read_table

log = logging.getLogger(__name__)

SALT_ENV = "PHYSIS_PSEUDONYM_SALT"
#: Where the aliases of the files are mapped back to their paths, next to the salt file.
KEY_FILE = "dicom_paths.csv"
#: Modalities of projection radiographs (CR computed, DX digital, DR legacy digital, RG film).
XRAY_MODALITIES = ("CR", "DX", "DR", "RG")
#: Modalities that may hold a digitised radiograph (other, secondary capture, none): kept when monochrome.
UNSPECIFIC_MODALITIES = ("", "OT", "SC")
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


def salt_file(cfg: dict) -> Path:
    return Path(cfg.get("pseudonym_salt_file") or ".physis/pseudonym_salt")


def salt_from(cfg: dict) -> str:
    """The pseudonym salt: the environment variable, else the salt file, else a new random salt saved there.

    The file is created owner-only (0600, in a 0700 folder): anyone holding it and the original IDs can
    recompute the pseudonyms. Copy it to another site to give the same patient the same pseudonym there.
    """
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = salt_file(cfg)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    salt = secrets.token_hex(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(salt + "\n")
    log.warning("no pseudonym salt was set (%s): generated a random one in %s (owner-only). Keep it: the same "
                "salt gives the same pseudonyms on every rerun; copy it to other sites to pool their data",
                SALT_ENV, path)
    return salt


class Aliases:
    """File paths → ``file-<salted hash>`` names for rejects and logs; remembers them for the key file."""

    def __init__(self, salt: str):
        self.salt = salt
        self.paths: dict[str, str] = {}  # alias → path
        self.images: dict[str, str] = {}  # image id → path

    def __call__(self, file: str) -> str:
        alias = f"file-{pseudonym(self.salt, 'path:' + file, 12)}"
        self.paths[alias] = file
        return alias

    def write(self, path: Path) -> None:
        """The private key: alias or image id → path, owner-only, never under the results folder."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "path"])
            writer.writerows(sorted({**self.paths, **self.images}.items()))


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


def _describe(err: BaseException, ds: Dataset | None, root: Path, file: str, name: str) -> str:
    """An exception's message, fit for a reject: the file's path replaced by its alias, then scrubbed."""
    return scrub(str(err).replace(str(root / file), name).replace(file, name), ds, root) or type(err).__name__


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


def read_label_rows(path: Path, alias: Aliases, encoding: str = "utf-8-sig"
                    ) -> tuple[dict[str, LabelRow | None], list[Rejected]]:
    """Label rows by normalised file path; unusable and duplicate rows become rejects (naming files by alias).

    A file whose row was rejected maps to None: that reject already accounts for it.
    """
    if not path.is_file():
        raise DataSourceError(f"{path}: labels CSV not found (dataset.labels_csv names it)")
    frame = read_table(path, encoding, REQUIRED_COLUMNS)
    rows: dict[str, LabelRow | None] = {}
    first_row: dict[str, str] = {}
    rejects: list[Rejected] = []
    for number, row in enumerate(frame.to_dict("records"), start=2):
        source = f"{path.name}:row {number}"
        file = _normalise_path(row["file"])
        if file is None:
            rejects.append(Rejected(source, f"file {alias(row['file'])} is not a path inside the data set root"))
            continue
        if file in first_row:
            rejects.append(Rejected(source, f"a second row for {alias(file)} (the first is {first_row[file]})"))
            continue
        first_row[file] = source
        try:
            boxes = json.loads(row["boxes"]) if row.get("boxes", "").strip() else []
            if not isinstance(boxes, list):
                raise ValueError("boxes must be a JSON list of [class, x, y, w, h]")
            rows[file] = LabelRow(source, ao.split_codes(row["ao_classification"]), parse_flag(row["fracture_visible"]),
                                  parse_flag(row.get("diagnosis_uncertain", "")), boxes)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            rejects.append(Rejected(source, f"bad value for {alias(file)}: {err}"))
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


def _convert(root: Path, file: str, label: LabelRow, patient: tuple[str, int] | None, alias: Aliases,
             work_dir: Path, kept: dict[str, str]) -> tuple[ImageRecord | Rejected, list[Rejected]]:
    """One labelled file → its record (and box rejects), or one image-level reject."""
    with warnings.catch_warnings(record=True) as caught:  # pydicom's warnings may quote header values
        warnings.simplefilter("always")
        ds, result = _decode(root, file, alias, kept)
    for note in caught:
        log.debug("%s: pydicom: %s", alias(file), scrub(str(note.message), ds, root))
    if isinstance(result, Rejected):
        return result, []
    image_id, pixels = result
    height, width = pixels.shape
    path = Path(work_dir) / "images" / f"{image_id}.png"
    with atomic_path(path) as tmp:
        write_gray16(tmp, pixels)
    kept[image_id] = alias(file)
    alias.images[image_id] = file
    patient_id, study = patient or (image_id[:12], 1)
    boxes, box_rejects = read_boxes(label.boxes, width, height, label.source, image_id)
    record = ImageRecord(
        image_id=image_id, patient_id=patient_id, study=study, view=view_of(ds), laterality=laterality_of(ds),
        age=age_years(ds), sex=sex_of(ds), path=str(path), width=width, height=height, bit_depth=16,
        ao_codes=label.ao_codes, fracture_visible=label.fracture_visible,
        diagnosis_uncertain=label.diagnosis_uncertain, boxes=boxes, source=alias(file),
    )
    return record, box_rejects


def _decode(root: Path, file: str, alias: Aliases,
            kept: dict[str, str]) -> tuple[Dataset | None, tuple[str, np.ndarray] | Rejected]:
    """Read and decode one file: the dataset (when read) and either (image id, grey pixels) or a reject."""
    name = alias(file)
    try:
        ds = pydicom.dcmread(root / file, force=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for broken files
        return None, Rejected(name, f"not a readable DICOM file: {_describe(err, None, root, file, name)}")
    if "PixelData" not in ds:
        return ds, Rejected(name, f"no image: the file{_sop_class(ds)} has no DICOM pixel data")
    not_a_film = _not_a_radiograph(ds)
    if not_a_film:
        return ds, Rejected(name, not_a_film)
    try:
        pixels = grey_pixels(ds, name)
    except Exception as err:  # noqa: BLE001 - decoders raise many types
        return ds, Rejected(name, f"pixel data cannot be decoded ({_syntax_name(ds)}): "
                                  f"{_describe(err, ds, root, file, name)}")
    instance = str(ds.get("SOPInstanceUID", "") or "").strip()
    image_id = pseudonym(alias.salt, instance or f"path:{file}", 16)
    if image_id in kept:
        return ds, Rejected(name, f"same image (SOP instance) as {kept[image_id]}, which is kept")
    return ds, (image_id, pixels)


def _sop_class(ds: Dataset) -> str:
    """`` (CT Image Storage)``: the SOP class's name for a reason, or nothing."""
    kind = getattr(ds.get("SOPClassUID"), "name", "")
    return f" ({kind})" if kind and not _UID_OR_DATE.search(kind) else ""


def _not_a_radiograph(ds: Dataset) -> str | None:
    """Why the image is not an X-ray film (see the module docstring), or None when it is one."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in XRAY_MODALITIES:
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if modality in UNSPECIFIC_MODALITIES and photometric.startswith("MONOCHROME"):
        return None
    what = f"modality {modality}" if modality else "no modality"
    if modality in UNSPECIFIC_MODALITIES:
        what += f", {photometric or 'colour'} pixels (a colour secondary capture)"
    return (f"not a radiograph: {what}{_sop_class(ds)}; physis takes X-ray films "
            f"(modality {', '.join(XRAY_MODALITIES)}, or a monochrome digitised film)")


def read_film(path: Path) -> np.ndarray:
    """One DICOM radiograph's grey pixels (as convert writes them); a ValueError naming the reason otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - InvalidDicomError for other files, anything for odd bytes
        raise ValueError(f"{path}: neither an image (PNG, JPEG, TIFF) nor a readable DICOM file "
                         f"({type(err).__name__})") from None
    if "PixelData" not in ds:
        raise ValueError(f"{path}: no image: the DICOM file{_sop_class(ds)} has no pixel data")
    not_a_film = _not_a_radiograph(ds)
    if not_a_film:
        raise ValueError(f"{path}: {not_a_film}")
    try:
        return grey_pixels(ds, path.name)
    except Exception as err:  # noqa: BLE001 - decoders raise many types
        raise ValueError(f"{path}: pixel data cannot be decoded ({_syntax_name(ds)}): "
                         f"{scrub(str(err), ds)}") from None


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
    alias = Aliases(salt_from(cfg))
    rows, row_rejects = read_label_rows(labels_path, alias, cfg.get("csv_encoding", "utf-8-sig"))
    yield from row_rejects

    files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                   if path.is_file() and path != labels_path)
    present = set(files)
    for file, label in rows.items():
        if label is not None and file not in present:
            yield Rejected(label.source, f"file {alias(file)} does not exist under the data set root")
    ignored = 0
    for file in files:
        if file not in rows:
            if _is_dicom(root / file):
                yield Rejected(alias(file), f"DICOM file without a label row in {labels_path.name}")
            else:
                ignored += 1
    if ignored:
        log.info("ignored %d file(s) that are neither DICOM nor listed in %s", ignored, labels_path.name)

    labelled = [file for file in files if rows.get(file) is not None]
    patients = _study_ranks(root, labelled, alias.salt)
    without_patient = 0
    kept: dict[str, str] = {}  # image id → the file kept for it
    for file in labelled:
        result, box_rejects = _convert(root, file, rows[file], patients.get(file), alias, work_dir, kept)
        if isinstance(result, ImageRecord) and file not in patients:
            without_patient += 1
        yield result
        yield from box_rejects
    if without_patient:
        log.warning("%d image(s) have no PatientID: each counts as its own patient, so splits cannot keep a "
                    "patient's images together", without_patient)
    key = salt_file(cfg).parent / KEY_FILE
    alias.write(key)
    log.info("files are named by alias in rejects and logs; %s maps them back to paths (owner-only)", key)
