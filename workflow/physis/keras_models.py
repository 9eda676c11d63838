"""Building blocks shared by the Keras 3 classifier plugins, so each plugin stays one short file.

Inputs arrive as float32 in [0, 1]. ImageNet-style backbones expect their own input scaling;
it is done with weight-free ``Rescaling`` layers so the saved model carries it and the
parameter counts stay those of the published architectures. Layers named ``head_*`` form the
classification head; everything else is the backbone (frozen in the first fine-tuning phase).
"""

from __future__ import annotations

import numpy as np

from physis.plugins import Explanation, ModelConfig, PluginError

# Per-channel (scale, offset) that maps [0, 1] to each family's ImageNet input convention.
_IMAGENET_SCALING = {
    "caffe": (255.0, [-103.939, -116.779, -123.68]),  # ResNet50: BGR means (grey: channel order moot)
    "tf": (2.0, -1.0),  # MobileNetV2: [-1, 1]
    "torch": ([1 / 0.229, 1 / 0.224, 1 / 0.225], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]),  # DenseNet
}


def backbone_weights(cfg: ModelConfig):
    """``weights`` parameter → keras.applications argument: None, "imagenet" or a local file."""
    weights = cfg.params.get("weights", "none")
    if weights in (None, "none"):
        return None
    if weights != "imagenet" and cfg.input_shape[-1] != 3:
        raise PluginError(f"model {cfg.name!r}: pretrained weights need 3 input channels")
    return weights


def scaled_input(cfg: ModelConfig, style: str | None):
    """The model input and the tensor after the backbone family's input scaling."""
    import keras

    inputs = keras.Input(shape=cfg.input_shape, name="image")
    if style is None:
        return inputs, inputs
    scale, offset = _IMAGENET_SCALING[style]
    return inputs, keras.layers.Rescaling(scale, offset, name="imagenet_scaling")(inputs)


def binary_head(inputs, features, name: str, outputs: int = 1):
    """A sigmoid fracture score (float32 even under mixed precision) on top of ``features``."""
    import keras

    activation = "sigmoid" if outputs == 1 else "softmax"
    score = keras.layers.Dense(outputs, activation=activation, dtype="float32", name="head_score")(features)
    return keras.Model(inputs, score, name=name)


def predict_classifier(model, data, cfg: ModelConfig) -> np.ndarray:
    """Fracture probability per image: the model's single sigmoid output."""
    return np.asarray(model.predict(data.images, verbose=0))[:, 0]


def explain_gradcam(model, image, cfg: ModelConfig) -> Explanation:
    """Grad-CAM heat map of the fracture score over one preprocessed image."""
    from physis.explain import gradcam

    return Explanation(heatmap=gradcam(model, image))
