"""Reruns that must do the right thing: fixed data reaches the results, a killed run recovers by itself,
and a config that cannot work fails while Snakemake parses it, naming the key.

Every test here runs the real Snakemake CLI on a small workflow of its own (the rule files of the
repository, a config in a temporary folder) over a copy of the tiny test phantom.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from physis import fingerprint, runlock

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
#: The flags of the README's `make demo` (Makefile: SNAKEMAKE), with one core.
README_FLAGS = ["--cores", "1", "--rerun-incomplete"]


def workflow(folder: Path, **config) -> Path:
    """A Snakefile that includes the repository's data stages, and its config; returns the folder."""
    base = {"results": "results", "plugin_dirs": [str(ROOT / "plugins")], "models": {},
            "convert": {"tfrecord": False},
            "preprocess": {"figure_films": 1, "presets": {"small": {"height": 32, "width": 16}}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
    (folder / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        + "".join(f'include: "{ROOT}/workflow/rules/{name}.smk"\n' for name in ("common", "convert", "preprocess")))
    return folder


def snakemake(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(SNAKEMAKE), *README_FLAGS, *args], cwd=folder, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def planned_rules(folder: Path) -> set[str]:
    """The rules a dry run of ``preprocess_only`` would run."""
    done = snakemake(folder, "--dry-run", "preprocess_only")
    return set(re.findall(r"^rule (\w+):", done.stdout + done.stderr, flags=re.M)) - {"preprocess_only"}


@pytest.mark.slow  # four real Snakemake runs over the tiny phantom (about a minute)
def test_fixing_the_data_reaches_the_results(phantom_root, tmp_path):
    data = Path(shutil.copytree(phantom_root, tmp_path / "data"))
    folder = workflow(tmp_path / "run", dataset={"root": str(data), "phantom": {"enabled": False}})
    film = sorted(data.glob("images_part*/*.png"))[5]
    intact = film.read_bytes()
    film.write_bytes(intact[:400])  # truncated
    snakemake(folder, "preprocess_only")
    rejected = pd.read_csv(folder / "results/data/rejected.csv")
    assert "unreadable image" in rejected.set_index("image_id").loc[film.stem, "reason"]
    assert planned_rules(folder) == set()  # nothing changed: nothing to do

    film.write_bytes(intact)  # the user restores the film
    assert planned_rules(folder) == {"convert", "preprocess"}
    snakemake(folder, "preprocess_only")
    rejected = pd.read_csv(folder / "results/data/rejected.csv")
    assert film.stem not in set(rejected.loc[rejected.level == "image", "image_id"])
    assert film.stem in set(pd.read_parquet(folder / "results/data/manifest.parquet")["image_id"])

    label = data / "folder_structure/yolov5/labels" / f"{film.stem}.txt"
    label.write_text(label.read_text() + "\n3 0.5 0.5 0.1 0.1")  # one more box in one label file
    assert planned_rules(folder) == {"convert", "preprocess"}  # convert and what depends on it, nothing else
    extra = data / "images_part4" / "0999_0000000000_01_WRI-L1_M010.png"
    snakemake(folder, "preprocess_only")
    shutil.copy(film, extra)  # an added file counts too
    assert planned_rules(folder) == {"convert", "preprocess"}


def test_fingerprint_sees_adds_removals_and_changes_and_rewrites_only_then(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"1")
    (root / "sub" / "b.txt").write_text("3 0.5 0.5 0.1 0.1")
    out = tmp_path / "fingerprint.json"
    assert fingerprint.update(root, out) and not fingerprint.update(root, out)
    stamp = out.stat().st_mtime_ns
    seen = {fingerprint.fingerprint(root)["sha256"]}
    for change in (lambda: (root / "sub" / "b.txt").write_text("3 0.5 0.5 0.1 0.2"),  # same size, new content
                   lambda: (root / "c.png").write_bytes(b"2"),
                   lambda: (root / "a.png").unlink(),
                   lambda: os.utime(root / "c.png", ns=(1, 1))):
        change()
        digest = fingerprint.fingerprint(root)["sha256"]
        assert digest not in seen
        seen.add(digest)
    assert fingerprint.update(root, out) and out.stat().st_mtime_ns >= stamp
    assert fingerprint.fingerprint(root)["files"] == 2


@pytest.mark.slow  # a real run killed with SIGKILL, then the same command again (about a minute)
def test_a_run_killed_during_convert_recovers_with_the_same_command(tmp_path):
    folder = workflow(tmp_path / "run", dataset={
        "root": "phantom", "phantom": {"enabled": True, "patients": 16, "seed": 1, "size_scale": 0.3}})
    command = [str(SNAKEMAKE), *README_FLAGS, "preprocess_only"]
    run = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    convert_log = folder / "results/logs/convert.log"
    deadline = time.monotonic() + 300
    while not (convert_log.exists() and convert_log.stat().st_size) and run.poll() is None:
        assert time.monotonic() < deadline, "convert never started"
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)  # Snakemake and its job, as an OOM kill or a lost login node would
    run.wait()
    assert list((folder / ".snakemake/locks").glob("*.lock")), "the killed run left no lock to recover from"

    again = snakemake(folder, "preprocess_only")
    assert "removed a stale Snakemake lock" in again.stdout + again.stderr
    assert (folder / "results/preprocess/small/index.parquet").exists()
    assert not list((folder / ".snakemake/locks").glob("*.lock"))


def test_a_live_run_keeps_its_lock(tmp_path):
    """A Snakemake process alive in the folder (or an orphaned job of one) keeps the lock; once it is gone
    the lock is cleared; a lock taken on another host is never cleared from here."""
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "snakemake", "--cores", "1"],
                            cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not runlock.live_snakemake(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        note = runlock.clear_stale_lock(tmp_path)
        assert f"pid {live.pid}" in note and "in use by a running Snakemake" in note
        assert (locks / "0.input.lock").exists()
    finally:
        live.kill()
        live.wait()
    (tmp_path / ".snakemake" / runlock.OWNER_FILE).write_text('{"host": "login-2", "pid": 4711}')
    note = runlock.clear_stale_lock(tmp_path)
    assert "taken by Snakemake pid 4711 on host login-2" in note and (locks / "0.input.lock").exists()
    (tmp_path / ".snakemake" / runlock.OWNER_FILE).write_text(f'{{"host": "{socket.gethostname()}", "pid": 4711}}')
    assert "removed a stale Snakemake lock" in runlock.clear_stale_lock(tmp_path)
    assert not (locks / "0.input.lock").exists()


@pytest.mark.parametrize("config, message", [
    ({"dataset": {"root": "users_data", "phantom": {"enabled": True}}},
     r"dataset.root and dataset.phantom.enabled: true do not fit together: users_data holds files the phantom "
     r"did not write"),
    ({"models": {"baseline_cnn": {"preset": "nope"}}},
     r"models.baseline_cnn.preset names preset 'nope', which preprocess.presets does not define \(known: small\)"),
    ({"split": {"fractions": {"train": 0.7, "val": 0.2, "test": 0.2}}},
     r"split.fractions must add up to 1: train 0.7 \+ val 0.2 \+ test 0.2 = 1.1"),
])
def test_a_config_that_cannot_work_fails_while_parsing(tmp_path, config, message):
    users = tmp_path / "run" / "users_data"
    users.mkdir(parents=True)
    (users / "dataset.csv").write_text("a user's own data\n")
    config = {"dataset": {"root": str(users), "phantom": {"enabled": False}}, **config}
    folder = workflow(tmp_path / "run", **config)
    done = snakemake(folder, "--dry-run", "preprocess_only", check=False)
    assert done.returncode != 0
    assert re.search(message, done.stdout + done.stderr), done.stdout[-2000:] + done.stderr[-2000:]
    assert (users / "dataset.csv").read_text() == "a user's own data\n"


@pytest.mark.slow  # one real Snakemake run that fails in convert (about 20 s)
def test_a_failed_convert_logs_its_cause_and_keeps_the_rejects(phantom_root, tmp_path):
    data = Path(shutil.copytree(phantom_root, tmp_path / "data"))
    missing = sorted(data.glob("images_part*/*.png"))[0]
    missing.unlink()
    folder = workflow(tmp_path / "run", dataset={"root": str(data), "phantom": {"enabled": False}},
                      convert={"tfrecord": False, "strict": True})
    done = snakemake(folder, "preprocess_only", check=False)
    assert done.returncode != 0
    log = (folder / "results/logs/convert.log").read_text()
    assert "ConvertError: convert.strict is true and 1 input(s) were rejected: 1 × CSV row without image" in log
    assert not (folder / "results/data/manifest.parquet").exists()
    kept = pd.read_csv(folder / "results/logs/convert_rejected.csv")
    assert missing.stem in set(kept["image_id"]) and "results/logs/convert_rejected.csv" in log


def test_predict_on_something_that_is_no_film_is_one_line_and_exit_2(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    from physis.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("not a film\n")
    fake_png = tmp_path / "film.png"
    fake_png.write_text("not a png either\n")
    plan = get_testdata_file("rtplan.dcm")
    ct = get_testdata_file("CT_small.dcm")
    cases = {text: "neither an image (PNG, JPEG, TIFF) nor a readable DICOM file",
             fake_png: "unreadable image", Path(plan): "no image: the DICOM file (RT Plan Storage) has no pixel data",
             Path(ct): "not a radiograph: modality CT", tmp_path / "missing.dcm": "no such file"}
    for path, reason in cases.items():
        assert main(["predict", str(path), "--model", str(tmp_path / "model")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"physis: error: {path}") and reason in err, err
    # a folder is searched: one line per file that is no film, and nothing scored is exit 2 as well
    assert main(["predict", str(tmp_path), "--model", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"physis: error: {fake_png}: unreadable image (cannot identify image file '{fake_png}')",
        f"physis: error: {text}: neither an image (PNG, JPEG, TIFF) nor a DICOM file"]
