"""ConvNeXt-Tiny (Liu et al., CVPR 2022) from keras.applications — a modern ImageNet backbone beyond
the thesis. Global average pooling, layer normalisation and one sigmoid unit, as ConvNeXt's own head;
``supervision: boxes`` trains a map head on the fracture boxes instead (physis.heatmap).
"""

from physis.keras_models import classifier, explain_gradcam, predict_classifier, pretrained_backbone, scaled_input
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="letterbox_256x128",
    channels=3,
    params={
        "epochs": 8,
        "batch_size": 16,
        "learning_rate": 1e-4,  # the paper: AdamW at 4e-3 for batches of 4096; physis batches 16 films
        "patience": 3,
        "weights": "none",  # none | imagenet (needs internet) | path to a local notop weights file
        "frozen_epochs": 2,
        "finetune_lr_factor": 0.1,
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=10000, runtime=240, cpus=4),
    reference="Liu et al., A ConvNet for the 2020s, CVPR 2022 (keras.applications ConvNeXtTiny)",
)


def build(cfg):
    import keras

    inputs, pixels = scaled_input(cfg, "pixels")
    base = pretrained_backbone(keras.applications.ConvNeXtTiny, cfg, input_tensor=pixels)

    def head(features):
        pooled = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
        return keras.layers.LayerNormalization(epsilon=1e-6, name="head_norm")(pooled)

    return classifier(inputs, base.output, cfg, "convnext", head)


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
