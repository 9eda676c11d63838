"""Model Garden plugins: train-step time per image and peak memory, at the demo size and at 512×256.

Each (plugin, size) case runs in its own Python process, because peak RSS is per process and TF
keeps a built model's memory: the child builds the plugin's network through its ``build`` hook,
writes a few synthetic films with one fracture box each, traces one training step (reported as
``first_step``) and times ``steps`` more (``train_step_per_image`` = median step time / images
per step). The two-stage model reports its stages separately (stage 1: films per ShapeMask step;
stage 2: crops per classifier step). Measurements only: no targets.

Run alone: ``python -m physis.bench --only garden`` (``--quick``: 128×128, one timed step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PLUGINS = ("spinenet49", "faster_rcnn", "retinanet_spinenet", "shapemask_spinenet")
FULL_SIZE = (512, 256)
STEPS = 5


def cases(quick: bool) -> list[tuple[str, tuple[int, int]]]:
    """(plugin, (height, width)): each plugin at its preset's size and at 512×256."""
    if quick:
        return [(name, (128, 128)) for name in PLUGINS]
    from physis import config, plugins

    presets = config.load()["preprocess"]["presets"]
    registry = plugins.discover()
    found = []
    for name in PLUGINS:
        preset = presets[registry[name].spec.preset]
        for hw in dict.fromkeys([(preset["height"], preset["width"]), FULL_SIZE]):
            found.append((name, hw))
    return found


def run(out_dir: Path, quick: bool) -> pd.DataFrame:
    rows = []
    steps = 1 if quick else STEPS
    for name, hw in cases(quick):
        with tempfile.TemporaryDirectory() as folder:
            child = subprocess.run(
                [sys.executable, "-m", "physis.bench.garden", name, str(hw[0]), str(hw[1]), str(steps), folder],
                capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"garden bench {name} {hw}: exit {child.returncode}\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        case = f"{name} {hw[0]}x{hw[1]} {result['device']}"
        for stage, timing in result["stages"].items():
            label = case if stage == "train" else f"{case} {stage}"
            rows.append((label, "first_step", timing["first_step"], "s"))
            rows.append((label, "train_step_per_image", timing["per_image"], "s"))
        rows.append((case, "peak_rss", result["peak_rss_mb"], "MB"))
        rows.append((case, "params", result["params"], "count"))
    table = pd.DataFrame(rows, columns=["case", "metric", "value", "unit"])
    return table.assign(benchmark="garden", target=None, ok=None)[
        ["benchmark", "case", "metric", "value", "unit", "target", "ok"]]


# --------------------------------------------------------------------------- the child process


def synthetic_films(folder: Path, hw: tuple[int, int], count: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``count`` noise films with a bright square and its fracture box (labels alternate)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    height, width = hw
    side = max(16, min(hw) // 6)
    rows, boxes = [], []
    for i in range(count):
        film = (rng.random(hw) * 20000 + 10000).astype(np.uint16)
        y, x = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        film[y:y + side, x:x + side] = 60000
        path = folder / f"film{i}.png"
        Image.fromarray(film).save(path)
        rows.append({"image_id": f"film{i}", "path": str(path), "label": i % 2})
        boxes.append({"image_id": f"film{i}", "class": "fracture", "x": x, "y": y, "w": side, "h": side})
    return pd.DataFrame(rows), pd.DataFrame(boxes)


def _timed(step, batches, steps: int, images_per_step: int) -> dict[str, float]:
    start = time.perf_counter()
    step(next(batches))
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return {"first_step": round(first, 3), "per_image": round(float(np.median(times)) / images_per_step, 4)}


def measure(name: str, hw: tuple[int, int], steps: int, folder: Path) -> dict:
    """Build ``name`` at ``hw`` and time its training steps (in this process)."""
    import tensorflow as tf

    from physis import garden, pipeline, plugins
    from physis.plugins import ModelConfig, TrainData

    tf.random.set_seed(0)
    plugin = plugins.discover()[name]
    params = dict(plugin.spec.params)
    cfg = ModelConfig(name, plugin.spec, (*hw, plugin.spec.channels), params, seed=0, work_dir=folder / "model")
    model = plugin.hook("build")(cfg)
    frame, boxes = synthetic_films(folder, hw)
    data = TrainData(train=None, val=None, frames={"train": frame}, boxes=boxes, class_weight=None,
                     preset_dir=folder)
    batch = int(params["batch_size"])
    loop_args = dict(steps=steps, learning_rate=params.get("learning_rate", 1e-3), optimizer_name="adam",
                     clip_norm=1.0, train_boxes="all", seed=0)
    stages = {}
    if plugin.spec.kind == "classifier":
        labelled = pipeline.image_dataset(frame.assign(label=1), cfg.spec.channels, batch, training=False, seed=0)
        step = garden.classifier_step(model, garden.optimizer("adam", params["learning_rate"], 0))
        stages["train"] = _timed(step, iter(labelled.repeat()), steps, batch)
    elif plugin.spec.kind == "detector":
        family = plugin.module.FAMILY  # faster_rcnn, retinanet
        loop = garden.DetectorLoop(garden.VisionDetector(family, cfg.input_shape, params, model), data, folder,
                                   batch_size=batch, **loop_args)
        stages["train"] = _timed(loop.step, loop.iterator, steps, batch)
    else:
        stage1_batch = int(params["stage1_batch_size"])
        loop = garden.DetectorLoop(model.detector, data, folder, batch_size=stage1_batch, **loop_args)
        stages["stage1"] = _timed(loop.step, loop.iterator, steps, stage1_batch)
        size = int(params["crop_size"])
        crops = tf.data.Dataset.from_tensors((tf.random.uniform([batch, size, size, cfg.spec.channels]),
                                              tf.ones([batch]))).repeat()
        step = garden.classifier_step(model.classifier, garden.optimizer("adam", params["learning_rate"], 1.0))
        stages["stage2"] = _timed(step, iter(crops), steps, batch)
    return {
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
        "stages": stages,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": int(model.count_params()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one garden benchmark case (run by physis.bench)")
    parser.add_argument("plugin")
    parser.add_argument("height", type=int)
    parser.add_argument("width", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.plugin, (args.height, args.width), args.steps, args.folder)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
