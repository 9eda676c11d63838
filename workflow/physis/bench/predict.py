"""Benchmark of ``physis predict``: one model load and batched scoring against one film at a time.

A custom_cnn trained one epoch on a phantom (60 patients at 0.3× size, preset 128×64 as in
tests/test_predict_cli.py) scores N of the phantom's films (200; quick: 20), each way in a fresh
interpreter whose start (Python, TensorFlow) is measured apart:

1. batch: :class:`physis.inference.Predictor` over the folder, as ``physis predict FOLDER`` runs it (one
   model load, network batches of 16);
2. film by film: :func:`physis.inference.predict_file` per film (a model load and a batch of one each);
3. separate ``physis predict FILM`` processes for a few films: what a shell loop over files pays per film
   (interpreter, TensorFlow and model start every time).

Target: the batch is ≥ 10× faster than film by film. Wall-clock seconds: indicative on a shared machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from physis import config, phantom, preprocess
from physis.convert import convert

COLUMNS = ["benchmark", "case", "metric", "value", "unit", "target", "ok"]
PRESET = {"height": 128, "width": 64}

#: Runs in a fresh interpreter: the imports, then one way of scoring the listed films.
_CHILD = """
import json, sys, time
start = time.perf_counter()
from physis.inference import Predictor, find_films, predict_file
import tensorflow
imported = time.perf_counter()
way, model, paths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if way == "batch":
    results = list(Predictor(model).score(find_films(paths)))
    assert not any(result.error for result in results)
else:
    for path in paths:
        predict_file(path, model)
print(json.dumps({"import_s": imported - start, "score_s": time.perf_counter() - imported}))
"""


def _row(benchmark, case, metric, value, unit, target="", ok=""):
    return {"benchmark": benchmark, "case": case, "metric": metric, "value": value, "unit": unit,
            "target": target, "ok": ok}


def _model(work: Path) -> Path:
    """Phantom → convert → preprocess (128×64) → custom_cnn trained one epoch, in ``work``; its folder."""
    phantom.generate(work / "phantom", n_patients=60, seed=0, size_scale=0.3)
    cfg = config.load(overrides={
        "dataset": {"root": str(work / "phantom"), "phantom": {"enabled": False}}, "results": str(work),
        "convert": {"tfrecord": False}, "preprocess": {"presets": {"tiny": PRESET}},
        "models": {"custom_cnn": {"preset": "tiny", "params": {"epochs": 1, "batch_size": 8}}}})
    data = work / "data"
    convert(cfg, data)
    preprocess.run(pd.read_parquet(data / "manifest.parquet"), pd.read_parquet(data / "boxes.parquet"), "tiny",
                   cfg["preprocess"]["presets"]["tiny"], work / "preprocess" / "tiny", figure_films=1)
    (work / "config.json").write_text(json.dumps(cfg))
    code = ("import json; from physis.train import train_model; "
            f"train_model('custom_cnn', json.load(open({str(work / 'config.json')!r})))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=_env())
    return work / "models" / "custom_cnn"


def _env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _child(way: str, model: Path, paths: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, way, str(model), json.dumps(paths)], check=True,
                          capture_output=True, text=True, env=_env())
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out_dir: Path, quick: bool) -> pd.DataFrame:
    n, calls = (20, 2) if quick else (200, 5)
    with tempfile.TemporaryDirectory(prefix="physis-bench-") as tmp:
        model = _model(Path(tmp))
        folder = Path(tmp) / "films"
        folder.mkdir()
        for path in sorted((Path(tmp) / "phantom").glob("images_part*/*.png"))[:n]:
            (folder / path.name).symlink_to(path)
        paths = sorted(map(str, folder.iterdir()))
        batch, alone = _child("batch", model, [str(folder)]), _child("alone", model, paths)
        cli = []
        for path in paths[:calls]:
            start = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "physis"), "predict", path, "--model", str(model)],
                           check=True, capture_output=True, env=_env())
            cli.append(time.perf_counter() - start)
    case = f"custom_cnn 128x64x3, {len(paths)} phantom films"
    speedup = alone["score_s"] / batch["score_s"]
    per_call = sum(cli) / len(cli)
    return pd.DataFrame([
        _row("predict", case, "interpreter + TensorFlow start", batch["import_s"], "s"),
        _row("predict", f"{case}, batch (one model load)", "seconds", batch["score_s"], "s"),
        _row("predict", f"{case}, batch (one model load)", "throughput", len(paths) / batch["score_s"], "films/s"),
        _row("predict", f"{case}, film by film (predict_file)", "seconds", alone["score_s"], "s"),
        _row("predict", f"{case}, film by film (predict_file)", "throughput", len(paths) / alone["score_s"], "films/s"),
        _row("predict", case, "batch speed-up", speedup, "×", "≥ 10", bool(speedup >= 10)),
        _row("predict", f"separate physis predict FILM processes ({len(cli)} timed)", "seconds per film", per_call,
             "s"),
    ], columns=COLUMNS)
