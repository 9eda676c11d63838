"""Benchmarks of the train stage: what each plugin costs on this machine.

1. Train-step throughput (films/s) of every local plugin at its preset's size, batch 8, after the
   first (tracing) step; median of the timed steps.
2. Efficiency of ResNet50 and the custom CNN: achieved FLOP/s of a train step (forward FLOPs from
   TensorFlow's graph profiler × 3 for forward + backward) divided by the FLOP/s of a dense float32
   matmul measured in the same run, at batch 8 and 32. Target ≥ 0.5.
3. Batch-1 predict latency p50/p95 (the ``physis predict`` path without the file reading).

Numbers depend on the machine and on what else runs on it: read them as indicative.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from physis import config, plugins
from physis.plugins import ModelConfig

COLUMNS = ["benchmark", "case", "metric", "value", "unit", "target", "ok"]
FLOP_MODELS = ("resnet50", "custom_cnn")


def _row(benchmark, case, metric, value, unit, target="", ok=""):
    return {"benchmark": benchmark, "case": case, "metric": metric, "value": value, "unit": unit,
            "target": target, "ok": ok}


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a dense n×n float32 matmul (best of ``repeats``)."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    matmul = tf.function(lambda: tf.linalg.matmul(a, b))
    matmul().numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul().numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def forward_flops(model, shape) -> float:
    """Forward FLOPs of one image from TensorFlow's graph profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *shape), tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)


def step_seconds(model, shape, batch: int, steps: int) -> list[float]:
    """Wall seconds of ``steps`` Keras train steps after one warm-up step."""
    import keras

    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    y = (np.arange(batch) % 2).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return times


def predict_latency(model, shape, repeats: int) -> list[float]:
    x = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    model.predict_on_batch(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - start)
    return times


def run(out_dir: Path, quick: bool) -> pd.DataFrame:
    cfg = config.load()
    presets = cfg["preprocess"]["presets"]
    batch, steps, repeats = (2, 2, 5) if quick else (8, 5, 30)
    rows = []
    peak = matmul_flops(1024 if quick else 2048)
    rows.append(_row("matmul", "float32 2048x2048", "throughput", peak / 1e9, "GFLOP/s"))
    for name, plugin in sorted(plugins.discover(cfg["plugin_dirs"]).items()):
        spec = plugin.spec
        if spec.framework != "keras":
            continue  # Model Garden plugins: bench/garden.py; services have no local step
        preset = presets[spec.preset]
        shape = (preset["height"], preset["width"], spec.channels)
        model = plugin.hook("build")(ModelConfig(name, spec, shape, dict(spec.params)))
        times = step_seconds(model, shape, batch, steps)
        step = float(np.median(times))
        case = f"{name} {shape[0]}x{shape[1]}x{shape[2]} batch {batch}"
        rows.append(_row("train step", case, "throughput", batch / step, "films/s"))
        if name in FLOP_MODELS:
            flops = 3 * forward_flops(model, shape)
            # a CPU's efficiency grows with the batch (the optimiser's per-step update is fixed)
            large = float(np.median(step_seconds(model, shape, 4 * batch, steps)))
            for size, seconds in ((batch, step), (4 * batch, large)):
                ratio = flops * size / seconds / peak
                rows.append(_row("train step", f"{name} {shape[0]}x{shape[1]}x{shape[2]} batch {size}",
                                 "achieved FLOP/s / matmul FLOP/s", ratio, "ratio", ">= 0.5", bool(ratio >= 0.5)))
        latency = predict_latency(model, shape, repeats)
        rows.append(_row("predict batch 1", case, "p50", 1000 * float(np.percentile(latency, 50)), "ms"))
        rows.append(_row("predict batch 1", case, "p95", 1000 * float(np.percentile(latency, 95)), "ms"))
    return pd.DataFrame(rows, columns=COLUMNS)
