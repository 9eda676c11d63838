"""EfficientNetV2-B0 (Tan & Le, ICML 2021) from keras.applications — a modern ImageNet backbone beyond
the thesis. Global average pooling and one sigmoid unit; ``supervision: boxes`` trains a map head on
the fracture boxes instead (physis.heatmap).
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
        "learning_rate": 1e-3,
        "patience": 3,
        "weights": "none",  # none | imagenet (needs internet) | path to a local notop weights file
        "frozen_epochs": 2,
        "finetune_lr_factor": 0.1,
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=8000, runtime=180, cpus=4),
    reference="Tan & Le, EfficientNetV2: Smaller Models and Faster Training, ICML 2021 (keras.applications)",
)


def build(cfg):
    import keras

    inputs, pixels = scaled_input(cfg, "pixels")
    base = pretrained_backbone(keras.applications.EfficientNetV2B0, cfg, input_tensor=pixels)
    return classifier(inputs, base.output, cfg, "efficientnetv2",
                      keras.layers.GlobalAveragePooling2D(name="head_pool"))


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
