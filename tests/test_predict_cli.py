"""``physis predict`` on folders: one model load, batched scores equal to film-by-film ones, skipped inputs
with reasons and exit codes, calibrated probabilities and decisions, overlays, DICOM without patient data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_config
from PIL import Image
from privacy import assert_no_phi

from physis import calibration, cli, preprocess
from physis.convert import convert
from physis.images import read_gray
from physis.inference import Predictor, predict_file

PRESET = {"height": 128, "width": 64}
PHI = ["Doe^Jane", "PID-4711", "19950614", "St Elsewhere Hospital", "CompressedSamples^CT1"]


@pytest.fixture(scope="module")
def model(phantom_root, tmp_path_factory) -> Path:
    """A custom_cnn trained one epoch on the tiny phantom (128×64): a real model folder, not yet evaluated."""
    base = tmp_path_factory.mktemp("predict_model")
    cfg = make_config(phantom_root, base, preprocess={"presets": {"tiny": PRESET}},
                      models={"custom_cnn": {"preset": "tiny", "params": {"epochs": 1, "batch_size": 8}}})
    data = base / "data"
    convert(cfg, data)
    preprocess.run(pd.read_parquet(data / "manifest.parquet"), pd.read_parquet(data / "boxes.parquet"), "tiny",
                   cfg["preprocess"]["presets"]["tiny"], base / "preprocess" / "tiny", figure_films=1)
    (base / "config.json").write_text(json.dumps(cfg))
    code = ("import json; from physis.train import train_model; "
            f"train_model('custom_cnn', json.load(open({str(base / 'config.json')!r})), threads=1)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "models" / "custom_cnn"


@pytest.fixture(scope="module")
def films(phantom_root) -> list[Path]:
    return sorted(phantom_root.rglob("images_part*/*.png"))[:4]


def evaluated(model: Path, folder: Path, calibrator: calibration.Calibrator, threshold: float) -> Path:
    """The model folder as the evaluate stage leaves it: its files (linked) plus a calibration.json."""
    folder.mkdir()
    for entry in model.iterdir():
        (folder / entry.name).symlink_to(entry)
    calibration.save(calibrator, {"value": threshold, "rule": "youden", "note": ""}, folder / "calibration.json")
    return folder


def dx_dicom(pixels: np.ndarray, path: Path) -> None:
    """A DX radiograph of ``pixels`` with patient data in its header (the DICOM preamble, no file extension)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.InstitutionName = (
        "DX", "Doe^Jane", "PID-4711", "19950614", "St Elsewhere Hospital")
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_folder_is_scored_like_film_by_film_and_unreadable_files_are_listed(model, films, tmp_path):
    folder = tmp_path / "films"
    (folder / "sub").mkdir(parents=True)
    for film, name in zip(films, ["a.png", "b.png", "sub/c.png"]):
        shutil.copy(film, folder / name)
    (folder / "broken.png").write_bytes(films[3].read_bytes()[:300])
    (folder / "notes.txt").write_text("not a film\n")
    (folder / ".DS_Store").write_bytes(b"\0" * 64)  # hidden: left out, not skipped
    (tmp_path / "results" / "models").mkdir(parents=True)
    (tmp_path / "results" / "models" / "custom_cnn").symlink_to(model)
    # the README's command line, through the console script
    out = subprocess.run([str(Path(sys.executable).parent / "physis"), "predict", "films", "--model",
                          "results/models/custom_cnn", "--csv", "scores.csv", "--overlay", "overlays"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]  # some inputs skipped, the others scored
    errors = [line for line in out.stderr.splitlines() if line.startswith("physis:")]
    assert len(errors) == 2 and errors[0].startswith("physis: error: films/broken.png: unreadable image (")
    assert errors[1] == "physis: error: films/notes.txt: neither an image (PNG, JPEG, TIFF) nor a DICOM file"
    table = pd.read_csv(tmp_path / "scores.csv")
    assert table["film"].tolist() == ["films/a.png", "films/b.png", "films/broken.png", "films/notes.txt",
                                      "films/sub/c.png"]
    skipped = table[table["error"].notna()]
    assert skipped["film"].tolist() == ["films/broken.png", "films/notes.txt"]
    assert skipped.drop(columns=["film", "error"]).isna().all().all()
    scored = table[table["error"].isna()]
    alone = [predict_file(tmp_path / film, model) for film in scored["film"]]  # one model load per film
    np.testing.assert_allclose(scored["raw_score"], alone, rtol=0, atol=1e-6)
    # not evaluated yet: no calibration.json, so the raw score, no threshold and no decision
    assert (scored["score"] == scored["raw_score"]).all() and not scored["calibrated"].any()
    assert scored["threshold"].isna().all() and scored["positive"].isna().all()
    recipe_hash = json.loads((model / "recipe.json").read_text())["hash"]
    assert (scored["model"] == "custom_cnn").all() and (scored["recipe_hash"] == recipe_hash).all()

    assert scored["overlay"].tolist() == ["overlays/a.png", "overlays/b.png", "overlays/sub/c.png"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "overlays").rglob("*.png")) == sorted(
        scored["overlay"])
    predictor = Predictor(model)
    for film, drawn in zip(scored["film"], scored["overlay"]):
        seen = predictor.prepare(read_gray(tmp_path / film))  # the film as the model saw it
        with Image.open(tmp_path / drawn) as picture:
            assert (picture.format, picture.mode, picture.size) == ("PNG", "RGB", (PRESET["width"], PRESET["height"]))
            pixels = np.asarray(picture)
        plain = np.repeat(np.round(seen / 65535 * 255).astype(np.uint8)[..., None], 3, axis=-1)
        assert pixels.shape == plain.shape and (pixels != plain).any()


def test_calibrated_probability_and_decision_at_the_threshold(model, films, tmp_path, capsys):
    raw = [predict_file(film, model) for film in films[:3]]
    calibrator = calibration.Calibrator("platt", {"a": 3.0, "b": 0.2}, n=100, n_positive=30)
    threshold = float(calibrator([raw[1]])[0])  # film 1 alone sits exactly at the threshold: positive (>=)
    folder = evaluated(model, tmp_path / "evaluated", calibrator, threshold)
    inputs = [str(film) for film in films[:3]]
    assert cli.main(["predict", *inputs, "--model", str(folder), "--json", "--json-out",
                     str(tmp_path / "scores.json")]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == json.loads((tmp_path / "scores.json").read_text())
    assert document["calibration"].startswith("Platt scaling fitted on 100 validation films")
    assert not document["skipped"]
    rows = document["films"]
    assert [row["film"] for row in rows] == inputs
    np.testing.assert_allclose([row["raw_score"] for row in rows], raw, rtol=0, atol=1e-6)
    np.testing.assert_allclose([row["score"] for row in rows], calibrator([row["raw_score"] for row in rows]),
                               rtol=0, atol=1e-12)
    assert all(row["calibrated"] and row["threshold"] == threshold for row in rows)
    assert [row["positive"] for row in rows] == [row["score"] >= threshold for row in rows]

    assert cli.main(["predict", inputs[1], "--model", str(folder)]) == 0  # one film, as text
    text = capsys.readouterr().out
    assert text.startswith(f"{inputs[1]}: fracture probability {threshold:.3f} (evaluated; calibrated: Platt scaling")
    assert f"at or above the operating threshold {threshold:.3f} chosen on the validation split" in text


def test_dicom_films_are_scored_and_no_patient_data_reaches_the_outputs(model, films, tmp_path, capsys):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "export" / "study"
    folder.mkdir(parents=True)
    dx_dicom(read_gray(films[0]), folder / "IM0001")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "IM0002")  # a CT: not a radiograph
    out = tmp_path / "out"
    assert cli.main(["predict", str(tmp_path / "export"), "--model", str(model), "--csv", str(out / "scores.csv"),
                     "--json-out", str(out / "scores.json"), "--overlay", str(out / "overlays")]) == 1
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [f"physis: error: {folder / 'IM0002'}: not a radiograph: modality CT (CT Image "
                                        "Storage); physis takes X-ray films (modality CR, DX, DR, RG, or a monochrome "
                                        "digitised film)"]
    table = pd.read_csv(out / "scores.csv").set_index("film")
    assert table.loc[str(folder / "IM0001"), "raw_score"] == pytest.approx(predict_file(folder / "IM0001", model),
                                                                           abs=1e-6)
    assert table.loc[str(folder / "IM0001"), "overlay"] == str(out / "overlays" / "study" / "IM0001.png")
    (out / "console.txt").write_text(printed.out + printed.err)
    assert_no_phi(out, PHI)


def test_nothing_scored_is_exit_2(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--model", str(model)]) == 2
    assert capsys.readouterr().err == f"physis: error: no files in {tmp_path / 'empty'}\n"
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    assert cli.main(["predict", str(tmp_path / "junk"), "--model", str(model), "--csv", str(tmp_path / "s.csv")]) == 2
    assert capsys.readouterr().err.startswith(f"physis: error: {tmp_path / 'junk' / 'a.txt'}: neither an image")
    assert pd.read_csv(tmp_path / "s.csv")["error"].notna().all()
