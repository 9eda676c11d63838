"""The plugin hooks of an official.vision detector (``faster_rcnn``, ``retinanet_spinenet``).

This module imports no TensorFlow: Snakemake reads every plugin's SPEC each time it parses the
workflow, so the hooks import :mod:`physis.garden` (TF, the Model Garden) only when they run.
"""

from __future__ import annotations


def detector_hooks(family: str) -> tuple:
    """``build, train, predict, predict_boxes, explain, serving`` of the ``family`` detector (faster_rcnn,
    retinanet). A film's score is its highest fracture-box score, 0 without a box."""

    def build(cfg):
        from physis import garden

        return garden.build_detector(family, cfg)

    def train(model, data, cfg, callbacks):
        from physis import garden

        garden.train_detector(family, model, data, cfg)

    def predict_boxes(model, data, cfg):
        from physis import garden

        return garden.detector_boxes(family, model, data, cfg)

    def predict(model, data, cfg):
        from physis import garden

        return garden.image_scores(predict_boxes(model, data, cfg))

    def explain(model, image, cfg):
        from physis import garden

        return garden.explain_detector(family, model, image, cfg)

    def serving(model, cfg):
        from physis import garden

        return garden.detector_serving(family, model, cfg)

    return build, train, predict, predict_boxes, explain, serving
