"""The DICOM source on the files pydicom ships: pixels, rejects, metadata and patient privacy."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import generate_uid

from physis.records import Box, ImageRecord, Rejected
from physis.sources import DataSourceError
from physis.sources.dicom import KEY_FILE, SALT_ENV, read, scrub

COLUMNS = ("file", "ao_classification", "fracture_visible", "boxes")


def sample(name: str) -> Path:
    """A file from pydicom's test data; skip (only the test that needs it) when it is not available offline."""
    try:
        path = get_testdata_file(name)
    except Exception as err:  # noqa: BLE001 - a failed download raises whatever the network layer raises
        pytest.skip(f"pydicom test file {name} is not available offline ({err})")
    if path is None:
        pytest.skip(f"pydicom test file {name} is not shipped with this pydicom and could not be downloaded")
    return Path(path)


def radiograph(name: str) -> Dataset:
    """A pydicom sample as an X-ray film: modality DX (pydicom ships no CR/DX image), same SOP instance."""
    ds = pydicom.dcmread(sample(name))
    ds.Modality = "DX"
    return ds


def dataset(name: str, **changes) -> Dataset:
    """A radiograph made from a sample, with header changes and a fresh SOP instance (a different image)."""
    ds = radiograph(name)
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def make_root(tmp_path: Path, files: dict[str, str | Dataset | bytes], rows: list[dict] | None = None) -> Path:
    """Put samples (by name, as radiographs), datasets or raw bytes under a root; write labels.csv (a row per
    file by default)."""
    root = tmp_path / "dicom"
    for rel, src in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            target.write_bytes(src)
        else:
            (radiograph(src) if isinstance(src, str) else src).save_as(target)
    root.mkdir(exist_ok=True)
    if rows is None:
        rows = [{"file": rel} for rel in files]
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return root


def private(root: Path) -> Path:
    """Where the tests keep the salt file and the alias key (outside root and the work folder)."""
    return root.parent / "private"


def run(root: Path, cfg: dict | None = None) -> tuple[dict[str, ImageRecord], list[Rejected]]:
    """Read ``root``; records by file path and rejects with the file path as source (mapped back through the
    private key: the source names files only by alias)."""
    cfg = {"pseudonym_salt_file": str(private(root) / "salt"), **(cfg or {})}
    items = list(read(root, cfg, root.parent / "work"))
    assert all(isinstance(item, (ImageRecord, Rejected)) for item in items)
    paths = key(Path(cfg["pseudonym_salt_file"]).parent)
    records = {paths[item.source]: item for item in items if isinstance(item, ImageRecord)}
    return records, [replace(item, source=paths.get(item.source, item.source)) for item in items
                     if isinstance(item, Rejected)]


def key(folder: Path) -> dict[str, str]:
    """The private key the source wrote next to the salt file: alias or image id → file path."""
    with open(folder / KEY_FILE, newline="") as handle:
        return {row["name"]: row["path"] for row in csv.DictReader(handle)}


def alias(root: Path, file: str) -> str:
    return next(name for name, path in key(private(root)).items() if path == file and name.startswith("file-"))


def png(record: ImageRecord) -> np.ndarray:
    with Image.open(record.path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "I;16", (record.width, record.height))
        return np.asarray(image)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def one(rejects: list[Rejected], source: str) -> Rejected:
    found = [reject for reject in rejects if reject.source == source]
    assert len(found) == 1, (source, rejects)
    return found[0]


def test_pydicom_samples_become_16_bit_pngs(tmp_path):
    root = make_root(tmp_path, {"ct.dcm": "CT_small.dcm", "mr/mr": "MR_small.dcm", "mr/truncated": "MR_truncated.dcm"})
    records, rejects = run(root)
    assert set(records) == {"ct.dcm", "mr/mr"}
    truncated = one(rejects, "mr/truncated")
    assert "pixel data cannot be decoded (Explicit VR Little Endian)" in truncated.reason
    assert "less than expected" in truncated.reason and truncated.image_id is None
    assert len(rejects) == 1

    for source, name in (("ct.dcm", "CT_small.dcm"), ("mr/mr", "MR_small.dcm")):
        record, ds = records[source], pydicom.dcmread(sample(name))
        out = png(record)
        assert record.bit_depth == 16 and (record.height, record.width) == ds.pixel_array.shape
        assert Path(record.path) == root.parent / "work" / "images" / f"{record.image_id}.png"
        assert (out.min(), out.max()) == (0, 65535)  # scaled to the full 16-bit range
        expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        assert correlation(out, expected) > 0.9999
        assert correlation(out, ds.pixel_array) > 0.9  # MR_small's window clips its brightest pixels
    assert correlation(png(records["ct.dcm"]), pydicom.dcmread(sample("CT_small.dcm")).pixel_array) > 0.9999


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"])
def test_encodings_decode_to_the_same_image(tmp_path, variant):
    if variant.endswith("jp2klossless.dcm"):
        try:
            pydicom.dcmread(sample(variant)).pixel_array
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"no JPEG 2000 decoder installed for pydicom ({type(err).__name__})")
    salt = {"pseudonym_salt_file": str(tmp_path / "salt")}  # one salt for both folders
    plain, _ = run(make_root(tmp_path / "plain", {"a.dcm": "MR_small.dcm"}), salt)
    encoded, rejects = run(make_root(tmp_path / "encoded", {"a.dcm": variant}), salt)
    assert not rejects
    assert np.array_equal(png(encoded["a.dcm"]), png(plain["a.dcm"]))
    assert encoded["a.dcm"].image_id == plain["a.dcm"].image_id  # same SOP instance, same pseudonym


def test_second_copy_of_an_instance_is_rejected(tmp_path):
    root = make_root(tmp_path, {"a.dcm": "MR_small.dcm", "b.dcm": "MR_small_RLE.dcm"})
    records, rejects = run(root)
    assert list(records) == ["a.dcm"]
    duplicate = one(rejects, "b.dcm")
    assert duplicate.reason == f"same image (SOP instance) as {alias(root, 'a.dcm')}, which is kept"
    assert duplicate.image_id is None  # convert must count it as an image, not as an annotation of a.dcm


def test_monochrome1_is_inverted(tmp_path):
    root = make_root(tmp_path, {"mono2.dcm": "MR_small.dcm",
                                "mono1.dcm": dataset("MR_small.dcm", PhotometricInterpretation="MONOCHROME1")})
    records, rejects = run(root)
    assert not rejects
    assert np.array_equal(png(records["mono1.dcm"]), 65535 - png(records["mono2.dcm"]))


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    raw = pydicom.dcmread(sample("CT_small.dcm")).pixel_array.astype(np.float64)
    values = raw * 2 - 1000  # what the rescale below turns stored values into
    center, width = float(np.median(values)), float(np.percentile(values, 90) - np.percentile(values, 10))
    ds = dataset("CT_small.dcm", RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=center, WindowWidth=width)
    records, _ = run(make_root(tmp_path, {"a.dcm": ds}))
    # DICOM PS3.3 C.11.2.1.2 linear window, evaluated on the rescaled values
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 65535
    out = png(records["a.dcm"]).astype(np.float64)
    assert np.abs(out - expected).max() <= 2
    assert (out == 0).sum() == (values <= center - 0.5 - (width - 1) / 2).sum() > 0


def test_colour_multiframe_rle_uses_the_first_frame_in_grey(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = make_root(tmp_path, {"rgb.dcm": "SC_rgb_rle_2frame.dcm"})
    records, rejects = run(root)
    assert not rejects
    rgb = pydicom.dcmread(sample("SC_rgb_rle_2frame.dcm")).pixel_array[0].astype(np.float64)
    assert correlation(png(records["rgb.dcm"]), rgb @ [0.299, 0.587, 0.114]) > 0.9999
    assert f"{alias(root, 'rgb.dcm')}: 2 frames, using the first only" in caplog.text


def test_undecodable_and_pixel_less_files_are_rejected(tmp_path):
    lossy = sample("JPEG-lossy.dcm")  # 12-bit JPEG Extended: Pillow cannot decode it
    try:
        pydicom.dcmread(lossy).pixel_array
        pytest.skip("this installation has a decoder for 12-bit JPEG Extended")
    except Exception:  # noqa: BLE001
        pass
    records, rejects = run(make_root(tmp_path, {"lossy.dcm": "JPEG-lossy.dcm", "plan.dcm": "rtplan.dcm"}))
    assert not records
    assert "pixel data cannot be decoded (JPEG Extended" in one(rejects, "lossy.dcm").reason
    assert one(rejects, "plan.dcm").reason == "no image: the file (RT Plan Storage) has no DICOM pixel data"


def test_no_identifier_leaves_the_source(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "pepper-123")
    birth = dataset("CT_small.dcm", PatientName="Doe^Jane", PatientID="PID-4711", PatientBirthDate="19950614",
                    AccessionNumber="ACC778899", PatientAge=None, StudyInstanceUID=generate_uid())
    no_patient = dataset("MR_small.dcm", PatientID=None)
    files = {"a.dcm": "CT_small.dcm", "b.dcm": "MR_small.dcm", "LEAKID0003/c.dcm": "MR_truncated.dcm",
             "d.dcm": "SC_rgb_rle_2frame.dcm", "e.dcm": birth, "f.dcm": "JPEG-lossy.dcm", "g.dcm": no_patient,
             "DOE_JANE/orphan.dcm": "rtplan.dcm", "PID-4711_ct.dcm": sample("CT_small.dcm").read_bytes()}
    rows = [{"file": rel} for rel in files if "orphan" not in rel] + [{"file": "LEAKID0004/gone.dcm"},
                                                                        {"file": "../LEAKID0005.dcm"}]
    root = make_root(tmp_path, files, rows)
    caplog.set_level(logging.DEBUG)
    records, rejects = run(root)
    assert len(records) == 5 and {r.source for r in rejects} == {
        "LEAKID0003/c.dcm", "f.dcm", "DOE_JANE/orphan.dcm", "PID-4711_ct.dcm", "labels.csv:row 10", "labels.csv:row 11"}
    assert "2 frames" in caplog.text and "no PatientID" in caplog.text  # those log lines are covered too

    secrets = {"pepper-123", "LEAKID", "DOE_JANE", "orphan", "gone.dcm"}
    for rel in files:
        ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
        name = str(ds.get("PatientName", ""))
        secrets |= {name, *(part for part in name.split("^") if len(part) >= 4)}  # "pre" is in ordinary words
        secrets |= {str(ds.get(k, "")) for k in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate",
                                                 "SeriesDate", "SOPInstanceUID", "StudyInstanceUID",
                                                 "SeriesInstanceUID")}
    ids = {str(pydicom.dcmread(root / rel, stop_before_pixels=True).get(k, "")) for rel in files
           for k in ("PatientID", "SOPInstanceUID")} - {""}
    unsalted = {hashlib.sha256(value.encode()).hexdigest()[:n] for value in ids for n in (12, 16)}
    secrets = {s for s in secrets if len(s) >= 3} | unsalted
    assert {"Doe^Jane", "Jane", "PID-4711", "19950614", "ACC778899", "CompressedSamples", "Lestrade"} <= secrets
    texts = {"records and rejects": repr(list(read(root, {"pseudonym_salt_file": str(private(root) / "salt")},
                                                    tmp_path / "work2"))),
             "log": caplog.text}
    texts |= {str(path): path.read_bytes().decode("latin-1") for path in (tmp_path / "work").rglob("*")
              if path.is_file()}
    assert len(texts) == 7  # five PNGs written
    for where, text in texts.items():
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{leaked} found in {where}"
    assert "not a radiograph: modality CT" in one(rejects, "PID-4711_ct.dcm").reason

    assert records["a.dcm"].patient_id == hashlib.sha256(b"pepper-1231CT1").hexdigest()[:12]  # env wins
    assert records["e.dcm"].age == 8.6  # 1995-06-14 → 2004-01-19, computed; the dates are gone
    assert (records["a.dcm"].sex, records["b.dcm"].sex, records["a.dcm"].age, records["b.dcm"].age) == (
        "O", "F", 0.0, None)
    assert stat.S_IMODE(os.stat(private(root) / KEY_FILE).st_mode) == 0o600  # the key to the aliases is private


def test_without_a_salt_a_private_random_one_is_made_once_and_reused(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(SALT_ENV, raising=False)
    root = make_root(tmp_path, {"a.dcm": "MR_small.dcm"})
    caplog.set_level(logging.INFO)
    records, _ = run(root)
    salt_file = private(root) / "salt"
    salt = salt_file.read_text().strip()
    assert len(salt) == 64 and stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(salt_file.parent).st_mode) == 0o700
    assert str(salt_file) in caplog.text and salt not in caplog.text  # says where, never what
    assert records["a.dcm"].patient_id == hashlib.sha256(f"{salt}4MR1".encode()).hexdigest()[:12]
    assert records["a.dcm"].patient_id != hashlib.sha256(b"4MR1").hexdigest()[:12]
    again, _ = run(root)  # a rerun keeps every pseudonym
    assert (again["a.dcm"].patient_id, again["a.dcm"].image_id) == (records["a.dcm"].patient_id,
                                                                     records["a.dcm"].image_id)
    assert salt_file.read_text().strip() == salt


def test_only_radiographs_are_films(tmp_path):
    files = {"ct.dcm": sample("CT_small.dcm").read_bytes(), "mr.dcm": sample("MR_small.dcm").read_bytes(),
             "nm.dcm": dataset("MR_small.dcm", Modality="NM"), "us.dcm": dataset("MR_small.dcm", Modality="US"),
             "sc_rgb.dcm": sample("SC_rgb_rle.dcm").read_bytes(),
             "cr.dcm": dataset("MR_small.dcm", Modality="CR"), "rg.dcm": dataset("MR_small.dcm", Modality="RG"),
             "digitised.dcm": dataset("MR_small.dcm", Modality="OT"), "none.dcm": dataset("MR_small.dcm", Modality=None)}
    records, rejects = run(make_root(tmp_path, files))
    assert set(records) == {"cr.dcm", "rg.dcm", "digitised.dcm", "none.dcm"}
    reasons = {reject.source: reject.reason for reject in rejects}
    for file, modality in (("ct.dcm", "CT"), ("mr.dcm", "MR"), ("nm.dcm", "NM"), ("us.dcm", "US"), ("sc_rgb.dcm", "OT")):
        assert reasons[file].startswith(f"not a radiograph: modality {modality}"), reasons[file]
    assert "colour secondary capture" in reasons["sc_rgb.dcm"] and "CT Image Storage" in reasons["ct.dcm"]


def test_scrub_removes_uids_dates_root_and_patient_values(tmp_path):
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Doe^Jane", "PID-4711", "ACC778899"
    message = (f"cannot read {tmp_path}/x/a.dcm:\n  element 1.2.840.113619.2.55.3 dated 20040119 "
               f"for Doe^Jane (PID-4711, ACC778899) at 8130 vs 8192 bytes")
    assert scrub(message, ds, tmp_path) == (
        "cannot read x/a.dcm: element [removed] dated [removed] for [removed] ([removed], [removed]) "
        "at 8130 vs 8192 bytes")


def test_studies_are_ranked_per_patient_and_header_fields_mapped(tmp_path):
    later, earlier = generate_uid(prefix="1.2.3.1."), generate_uid(prefix="1.2.3.9.")  # UID order ≠ date order
    files = {
        "p/later_pa.dcm": dataset("MR_small.dcm", PatientID="P1", StudyDate="20200105", StudyInstanceUID=later,
                                  ViewPosition="PA", ImageLaterality="R", PatientAge="006M", PatientSex="M"),
        "p/later_ll.dcm": dataset("MR_small.dcm", PatientID="P1", StudyDate="20200105", StudyInstanceUID=later,
                                  ViewPosition="LL", Laterality="L", PatientAge="012Y"),
        "p/earlier.dcm": dataset("MR_small.dcm", PatientID="P1", StudyDate="20190101", StudyInstanceUID=earlier,
                                 ViewPosition="XYZ"),
        "q.dcm": dataset("MR_small.dcm", PatientID="P2", StudyDate="20210101", StudyInstanceUID=generate_uid()),
    }
    records, rejects = run(make_root(tmp_path, files))
    assert not rejects
    ranks = {source: (r.patient_id, r.study) for source, r in records.items()}
    p1 = ranks["p/earlier.dcm"][0]
    assert ranks == {"p/earlier.dcm": (p1, 1), "p/later_pa.dcm": (p1, 2), "p/later_ll.dcm": (p1, 2),
                     "q.dcm": (ranks["q.dcm"][0], 1)}
    assert ranks["q.dcm"][0] != p1
    pa, ll, odd = records["p/later_pa.dcm"], records["p/later_ll.dcm"], records["p/earlier.dcm"]
    assert (pa.view, pa.laterality, pa.age, pa.sex) == ("ap", "R", 0.5, "M")
    assert (ll.view, ll.laterality, ll.age) == ("lat", "L", 12.0)
    assert (odd.view, odd.laterality) == ("unknown", "U")


def test_rows_and_files_must_meet(tmp_path, caplog):
    files = {"a.dcm": "CT_small.dcm", "orphan.dcm": "MR_small.dcm", "notes.txt": b"not an image\n",
             "bad_flag.dcm": "SC_rgb_rle.dcm", "text_with_row.txt": b"hello world\n" * 10}
    rows = [{"file": "a.dcm", "fracture_visible": "1", "ao_classification": "23r-E/2.1; 23u-E/7"},
            {"file": "gone.dcm"},
            {"file": "./a.dcm"},
            {"file": "bad_flag.dcm", "fracture_visible": "maybe"},
            {"file": "../outside.dcm"},
            {"file": "text_with_row.txt"}]
    caplog.set_level(logging.INFO)
    root = make_root(tmp_path, files, rows)
    records, rejects = run(root)
    assert list(records) == ["a.dcm"]
    assert records["a.dcm"].fracture_visible and records["a.dcm"].ao_codes == ["23r-E/2.1", "23u-E/7"]
    assert one(rejects, "orphan.dcm").reason == "DICOM file without a label row in labels.csv"
    assert one(rejects, "labels.csv:row 3").reason == (
        f"file {alias(root, 'gone.dcm')} does not exist under the data set root")
    assert one(rejects, "labels.csv:row 4").reason == (
        f"a second row for {alias(root, 'a.dcm')} (the first is labels.csv:row 2)")
    assert f"bad value for {alias(root, 'bad_flag.dcm')}: flag value 'maybe'" in one(rejects, "labels.csv:row 5").reason
    assert one(rejects, "labels.csv:row 6").reason == (
        f"file {alias(root, '../outside.dcm')} is not a path inside the data set root")
    assert "no DICOM pixel data" in one(rejects, "text_with_row.txt").reason
    assert len(rejects) == 6  # notes.txt is neither DICOM nor listed: ignored, and the log says so
    assert "ignored 1 file(s) that are neither DICOM nor listed in labels.csv" in caplog.text


def test_boxes_are_clipped_and_bad_ones_rejected(tmp_path):
    good = [["fracture", 10, 10, 20, 20], ["metal", 60, 60, 10, 10], [3, 0, 0, 5, 5], ["tumour", 1, 1, 2, 2],
            ["text", 100, 100, 5, 5], ["text", 1, 1, 0, 5], "junk"]
    rows = [{"file": "a.dcm", "boxes": json.dumps(good)}, {"file": "b.dcm", "boxes": "[[fracture, 1"}]
    root = make_root(tmp_path, {"a.dcm": "MR_small.dcm", "b.dcm": "CT_small.dcm"}, rows)
    records, rejects = run(root)
    record = records["a.dcm"]  # MR_small is 64×64
    assert record.boxes == [Box("fracture", 10, 10, 20, 20), Box("metal", 60, 60, 4, 4), Box("fracture", 0, 0, 5, 5)]
    boxes = {r.source: r for r in rejects if r.image_id == record.image_id}
    assert "'tumour' is not a GRAZPEDWRI class" in boxes["labels.csv:row 2 box 4"].reason
    assert "outside the 64×64 image" in boxes["labels.csv:row 2 box 5"].reason
    assert "degenerate" in boxes["labels.csv:row 2 box 6"].reason
    assert "expected [class, x, y, w, h]" in boxes["labels.csv:row 2 box 7"].reason
    assert len(boxes) == 4
    bad_json = one(rejects, "labels.csv:row 3")  # the whole row: its image is not kept without its boxes
    assert f"bad value for {alias(root, 'b.dcm')}" in bad_json.reason and bad_json.image_id is None and "b.dcm" not in records


def test_custom_labels_csv_name(tmp_path):
    root = make_root(tmp_path, {"a.dcm": "MR_small.dcm"})
    (root / "labels.csv").rename(root / "truth.csv")
    records, rejects = run(root, {"labels_csv": "truth.csv"})
    assert list(records) == ["a.dcm"] and not rejects


def test_unusable_input_raises_naming_the_file(tmp_path):
    with pytest.raises(DataSourceError, match="not a folder"):
        run(tmp_path / "nowhere")
    root = make_root(tmp_path, {"a.dcm": "MR_small.dcm"})
    (root / "labels.csv").write_text("file,ao_classification\na.dcm,\n")
    with pytest.raises(DataSourceError, match=r"labels.csv: missing column\(s\) fracture_visible"):
        run(root)
    (root / "labels.csv").unlink()
    with pytest.raises(DataSourceError, match="labels.csv: labels CSV not found"):
        run(root)
