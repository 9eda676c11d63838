"""MobileNetV2 (Sandler et al. 2018). The thesis stretched 2:1 films to 224×224 squares and
got 46.1%; physis's default letterboxes them instead (the fix). Configure a second model with
``plugin: mobilenetv2`` and ``preset: stretch_224`` to reproduce the thesis's setup.
"""

from physis.keras_models import classifier, explain_gradcam, predict_classifier, pretrained_backbone, scaled_input
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="letterbox_224",
    channels=3,
    params={
        "epochs": 8,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "patience": 3,
        "alpha": 1.0,  # width multiplier
        "weights": "none",  # none | imagenet (needs internet) | path to a local notop weights file
        "frozen_epochs": 2,
        "finetune_lr_factor": 0.1,
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=6000, runtime=120, cpus=4),
    reference="Sandler et al., CVPR 2018; thesis Table 5.1, 46.1% accuracy (stretched 224×224 input)",
)


def build(cfg):
    import keras

    inputs, x = scaled_input(cfg, "tf")
    base = pretrained_backbone(keras.applications.MobileNetV2, cfg, input_tensor=x, alpha=float(cfg.params["alpha"]))
    return classifier(inputs, base.output, cfg, "mobilenetv2", keras.layers.GlobalAveragePooling2D(name="head_pool"))


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
