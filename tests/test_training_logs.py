"""What a custom training loop (the Model Garden plugins') shows while it runs: TensorBoard scalars
laid out like the Keras models' and a progress line every few steps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tensorflow as tf


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files of ``folder``."""
    found: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return found


def test_custom_loop_writes_tensorboard_scalars_like_keras(tmp_path):
    from physis.plugins import ModelConfig, ModelSpec
    from physis.train import run_epochs

    cfg = ModelConfig("loop", ModelSpec(kind="detector", framework="tf_keras", preset="p"), (8, 8, 3), {},
                      work_dir=tmp_path)
    weight = tf.Variable(0.0)

    def train_epoch(epoch):
        weight.assign_add(1.0)
        return {"loss": 1.0 / (epoch + 1)}

    run_epochs(cfg, trackables={"model": tf.train.Checkpoint(w=weight)}, train_epoch=train_epoch,
               evaluate=lambda: {"val_auroc": 0.5 + 0.1 * float(weight.numpy()), "val_boxes_per_image": 2.0},
               epochs=2, patience=5)
    train = scalars(tmp_path / "tensorboard" / "train")
    validation = scalars(tmp_path / "tensorboard" / "validation")
    assert train == {"epoch_loss": {0: 1.0, 1: 0.5}}
    assert validation["epoch_auroc"] == pytest.approx({0: 0.6, 1: 0.7})
    assert validation["epoch_boxes_per_image"] == {0: 2.0, 1: 2.0}


def test_training_steps_log_a_progress_line_every_few_steps(caplog):
    from physis import garden

    caplog.set_level(logging.INFO, logger="physis.garden")
    losses = iter([0.9, 0.7] * 20)
    mean = garden.run_steps(lambda batch: next(losses), iter(range(25)), steps=25, every=10)
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 10/25", "step 20/25", "step 25/25"]
    assert "loss=0.8000" in lines[0] and "s/step" in lines[0]
    assert mean == pytest.approx((0.9 * 13 + 0.7 * 12) / 25)
