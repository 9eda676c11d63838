"""Building blocks shared by the Keras 3 classifier plugins, so each plugin stays one short file.

Inputs arrive as float32 in [0, 1]. ImageNet-style backbones expect their own input scaling;
it is done with weight-free ``Rescaling`` layers so the saved model carries it and the
parameter counts stay those of the published architectures. Layers named ``head_*`` form the
classification head; everything else is the backbone (frozen in the first fine-tuning phase).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from physis.plugins import Explanation, ModelConfig, PluginError

if TYPE_CHECKING:  # plugin files import this module while Snakemake parses: NumPy only where used
    import numpy as np

# Per-channel (scale, offset) that maps [0, 1] to each family's ImageNet input convention.
_IMAGENET_SCALING = {
    "caffe": (255.0, [-103.939, -116.779, -123.68]),  # ResNet50: BGR means (grey: channel order moot)
    "tf": (2.0, -1.0),  # MobileNetV2: [-1, 1]
    "torch": ([1 / 0.229, 1 / 0.224, 1 / 0.225], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]),  # DenseNet
    "pixels": (255.0, 0.0),  # EfficientNetV2, ConvNeXt: [0, 255], the network normalises itself
}


def backbone_weights(cfg: ModelConfig):
    """``weights`` parameter → keras.applications argument: None, "imagenet" or a local file."""
    weights = cfg.params.get("weights", "none")
    if weights in (None, "none"):
        return None
    if weights != "imagenet" and cfg.input_shape[-1] != 3:
        raise PluginError(f"model {cfg.name!r}: pretrained weights need 3 input channels")
    return weights


def pretrained_backbone(application, cfg: ModelConfig, **kwargs):
    """``application(include_top=False, …)`` (a keras.applications constructor) with the ``weights``
    parameter applied: none, imagenet (keras.applications downloads them) or a local weights file of
    the backbone (what the download would be, or a ``save_weights`` of the same backbone), loaded by
    :func:`load_weights_file`."""
    weights = backbone_weights(cfg)
    if weights in (None, "imagenet"):
        return application(include_top=False, weights=weights, **kwargs)
    base = application(include_top=False, weights=None, **kwargs)
    load_weights_file(base, weights, f"model {cfg.name!r}")
    return base


def load_weights_file(model, path, label: str) -> None:
    """``model.load_weights(path)``, failing with a :class:`PluginError` that names the file and the
    first layers that do not fit (Keras's own message carries whole weight arrays)."""
    import re
    import warnings
    from pathlib import Path

    if not Path(path).is_file():
        raise PluginError(f"{label}: weights file {path} does not exist")
    try:
        with warnings.catch_warnings():  # one per weightless container of a .weights.h5 file
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as error:
        message = str(error)
        layers = list(dict.fromkeys(re.findall(r"<\w+ name=([^,>]+)", message)))
        shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", message)
        counts = re.search(r"expected (\d+) variables, but received (\d+)", message)
        total = re.match(r"A total of (\d+) objects could not be loaded", message)
        detail = [f"{total.group(1)} layers do not fit" if total else message.splitlines()[0][:300]]
        if layers:
            detail.append("first: " + ", ".join(layers[:5]))
        first = layers[0] if layers else "a layer"
        if shapes:
            detail.append(f"{first}: model {shapes.group(1)}, file {shapes.group(2)}")
        elif counts:
            detail.append(f"{first}: {counts.group(1)} variables in the model, {counts.group(2)} in the file")
        raise PluginError(f"{label}: weights file {path} does not fit {model.name}: {'; '.join(detail)}") from None


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


def classifier(inputs, feature_map, cfg: ModelConfig, name: str, head: Callable, outputs: int = 1):
    """The plugin's network: ``head`` (its pooling/flatten layers) and :func:`binary_head` on the backbone's
    last ``feature_map``, or with the parameter ``supervision: boxes`` the box-supervised map head of
    :mod:`physis.heatmap` on the same feature map (trained by :func:`physis.train.fit_classifier`, explained
    by :func:`explain_gradcam`, both of which then hand over to :mod:`physis.heatmap`)."""
    from physis import heatmap

    if heatmap.box_supervised(cfg):
        return heatmap.map_head(inputs, feature_map, f"{name}_boxes")
    return binary_head(inputs, head(feature_map), name, outputs)


def predict_classifier(model, data, cfg: ModelConfig) -> np.ndarray:
    """Fracture probability per image: the model's single sigmoid output."""
    import numpy as np

    return np.asarray(model.predict(data.images, verbose=0))[:, 0]


def explain_gradcam(model, image, cfg: ModelConfig) -> Explanation:
    """Grad-CAM heat map of the fracture score over one preprocessed image; a box-supervised model's own map."""
    from physis import heatmap
    from physis.explain import gradcam

    if heatmap.box_supervised(cfg):
        return heatmap.explain(model, image, cfg)

    return Explanation(heatmap=gradcam(model, image))
