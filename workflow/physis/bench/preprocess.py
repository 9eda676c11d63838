"""Benchmarks of the preprocess stage and the training input pipeline.

1. Throughput: the stage (one worker) on realistic-size 16-bit phantom films against the floor of
   only decoding the same PNGs with the same reader, in the same process, alternately and best of
   three. Target: ≤ 1.5× the floor.
2. Scaling: the stage on N and 4N films, each in a fresh process: time ratio (target 4 ± 0.4,
   linear) and peak resident memory (must not grow with N; target ≤ 1.1×).
3. tf.data: training films/s (augmented, default preset size) against what a train step consumes
   here, for a small Keras CNN and ResNet50. The pipeline must not be the bottleneck: ≥ 3×.

The time ratios of 1 and 2 use CPU seconds (the stage runs one worker): on a machine shared with
other jobs, wall-clock time measures the neighbours as well. Films/s are wall-clock.

Numbers depend on the machine and on whatever else runs on it: read them as indicative.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from physis import config, phantom

PRESET = "letterbox_256x128"
COLUMNS = ["benchmark", "case", "metric", "value", "unit", "target", "ok"]

REPEATS = 3  # best of: other jobs on a shared machine only ever slow a run down

#: Runs in a fresh interpreter: the decode floor and the stage, alternately (so both see the same
#: load), best of REPEATS each, in wall-clock and CPU seconds; then the process's peak memory.
_CHILD = """
import json, resource, sys, time
import pandas as pd
from physis.images import read_gray
from physis.preprocess import run
manifest_path, params, out, repeats = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
manifest = pd.read_parquet(manifest_path)
boxes = pd.DataFrame(columns=["image_id", "class", "x", "y", "w", "h"])
for path in manifest["path"].unique():  # warm the page cache: both timings then read from memory
    read_gray(path)
best = dict.fromkeys(["decode_s", "decode_cpu_s", "stage_s", "stage_cpu_s"], float("inf"))
for k in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    for path in manifest["path"]:
        read_gray(path)
    best["decode_s"] = min(best["decode_s"], time.perf_counter() - start)
    best["decode_cpu_s"] = min(best["decode_cpu_s"], time.process_time() - cpu)
    # a fresh folder each time, as in a workflow run (deleting the last run's films is not the stage's work)
    summary = run(manifest, boxes, "bench", params, f"{out}/{k}", threads=1, figure_films=1)
    best["stage_s"] = min(best["stage_s"], summary["seconds"])
    best["stage_cpu_s"] = min(best["stage_cpu_s"], summary["cpu_seconds"])
print(json.dumps({**best, "films": summary["kept"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _row(benchmark: str, case: str, metric: str, value: float, unit: str, target: str = "",
         ok: bool | None = None) -> dict:
    return dict(zip(COLUMNS, (benchmark, case, metric, round(float(value), 3), unit, target, ok)))


def _stage(manifest: pd.DataFrame, params: dict, work: Path, name: str) -> dict:
    manifest_path = work / f"{name}.parquet"
    manifest.to_parquet(manifest_path)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(manifest_path), json.dumps(params), str(work / name),
                           str(REPEATS)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train_step_rate(model, x: np.ndarray, y: np.ndarray, steps: int) -> float:
    """Films/s that ``model`` trains on (one warm-up step first: it builds the graph)."""
    model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * len(x) / (time.perf_counter() - start)


def _feed_rate(dataset) -> float:
    """Films/s of one epoch of ``dataset`` (after two warm-up batches: tracing, thread pools)."""
    for _ in dataset.take(2):
        pass
    start = time.perf_counter()
    films = sum(len(labels) for _, labels in dataset)
    return films / (time.perf_counter() - start)


def _pipeline_rows(images: list[str], params: dict, augment: dict, quick: bool) -> list[dict]:
    import keras

    from physis.pipeline import image_dataset

    frame = pd.DataFrame({"path": images, "label": np.arange(len(images)) % 2})
    frame = pd.concat([frame] * max(1, 512 // len(frame)), ignore_index=True)
    shape = (params["height"], params["width"])
    rows = []
    small = keras.Sequential([keras.Input((*shape, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Conv2D(32, 3, activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Conv2D(64, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    resnet = keras.applications.ResNet50(weights=None, input_shape=(*shape, 3), classes=1,
                                         classifier_activation="sigmoid")
    for name, model, channels, batch in (("small_cnn", small, 1, 32), ("resnet50", resnet, 3, 8)):
        feed = _feed_rate(image_dataset(frame, channels, batch, training=True, seed=0, augment=augment))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        x = np.random.default_rng(0).random((batch, *shape, channels), dtype=np.float32)
        consume = _train_step_rate(model, x, (np.arange(batch) % 2).astype(np.float32), 1 if quick else 3)
        case = f"{name}, {shape[0]}×{shape[1]}×{channels}, batch {batch}, augmented"
        rows += [_row("pipeline_vs_train_step", case, "tf.data films/s", feed, "films/s"),
                 _row("pipeline_vs_train_step", case, "train step films/s", consume, "films/s"),
                 _row("pipeline_vs_train_step", case, "tf.data / train step", feed / consume, "×", "≥ 3",
                      feed / consume >= 3)]
    return rows


def run(out_dir: Path, quick: bool) -> pd.DataFrame:
    cfg = config.load()
    params = cfg["preprocess"]["presets"][PRESET]
    films_n = 8 if quick else 60
    with tempfile.TemporaryDirectory(prefix="physis-bench-") as tmp:
        work = Path(tmp)
        phantom.generate(work / "phantom", n_patients=max(2, films_n // 4 + 1), seed=1, physeal_rate=0.3,
                         size_scale=0.5 if quick else 1.0)
        paths = sorted(str(p) for p in (work / "phantom").glob("images_part*/*.png"))[:films_n]
        manifest = pd.DataFrame({"image_id": [Path(p).stem for p in paths], "path": paths})
        # 4N: the same films four times under other names (same decode cost, four times the work)
        manifest_4n = pd.concat([manifest.assign(image_id=manifest["image_id"] + f"_{k}") for k in range(4)],
                                ignore_index=True)
        one, four = _stage(manifest, params, work, "n"), _stage(manifest_4n, params, work, "4n")
        sizes = pd.DataFrame([_size(p) for p in paths], columns=["width", "height"])
        case = (f"{PRESET}, {len(paths)} films {sizes['width'].min()}–{sizes['width'].max()} × "
                f"{sizes['height'].min()}–{sizes['height'].max()} px, 1 worker, best of {REPEATS}")
        # ratios in CPU seconds: wall-clock time on a shared machine measures the neighbours as well
        ratio = one["stage_cpu_s"] / one["decode_cpu_s"]
        time_ratio = four["stage_cpu_s"] / one["stage_cpu_s"]
        memory_ratio = four["peak_mb"] / one["peak_mb"]
        rows = [
            _row("preprocess_throughput", case, "stage films/s", one["films"] / one["stage_s"], "films/s"),
            _row("preprocess_throughput", case, "decode-only films/s", len(paths) / one["decode_s"], "films/s"),
            _row("preprocess_throughput", case, "stage / decode CPU time", ratio, "×", "≤ 1.5", ratio <= 1.5),
            _row("preprocess_scaling", f"N = {len(paths)} vs 4N", "CPU time ratio", time_ratio, "×", "4 ± 0.4",
                 abs(time_ratio - 4) <= 0.4),
            _row("preprocess_scaling", f"N = {len(paths)}", "peak RSS", one["peak_mb"], "MB"),
            _row("preprocess_scaling", f"4N = {4 * len(paths)}", "peak RSS", four["peak_mb"], "MB"),
            _row("preprocess_scaling", f"N = {len(paths)} vs 4N", "peak RSS ratio", memory_ratio, "×", "≤ 1.1",
                 memory_ratio <= 1.1),
        ]
        images = sorted(str(p) for p in (work / "n" / "0" / "images").glob("*.png"))
        rows += _pipeline_rows(images, params, cfg["preprocess"]["augment"], quick)
    return pd.DataFrame(rows, columns=COLUMNS)



def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size
