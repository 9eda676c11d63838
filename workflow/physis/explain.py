"""Grad-CAM for any Keras 3 or tf_keras classifier, and the choice of explanation per plugin.

:func:`gradcam` (Selvaraju et al., ICCV 2017) weights a convolutional feature map by the mean
gradient of the class score over its positions. It works on Sequential, functional, nested
(a backbone model inside the classifier) and subclassed models alike: instead of rebuilding a
"gradient model" from the graph, which fails for nested and subclassed models, the target
layer's ``call`` is wrapped for one forward pass so its output is recorded and watched by the
gradient tape. Plugins with a model Grad-CAM cannot handle (detectors, services) provide their
own ``explain`` hook; :func:`explainer` picks the hook or this fallback. :func:`overlay` draws an
explanation on the film itself (``physis predict --overlay``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from physis.plugins import Explanation, ModelConfig, Plugin

#: Predicted boxes, as in the gallery (matplotlib's orange).
ORANGE = (255, 165, 0)


def _layers(model) -> list:
    # Keras 3 and tf_keras both expose this (private) walk over nested models and composite layers.
    return list(model._flatten_layers(include_self=False, recursive=True))


def gradcam(model, image: np.ndarray, layer_name: str | None = None, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM heat map of ``image`` (H×W or H×W×C) for ``model``, as an H×W array in [0, 1].

    ``layer_name``: the feature map to explain (searched in nested models too); default: the
    last layer of the forward pass, pooling layers aside, whose output is a 4-D tensor with more
    than one position and which the score depends on (the last convolutional feature map).
    ``class_index``: the output unit to explain; default: the single sigmoid unit, or the
    predicted class of a softmax head.
    """
    import tensorflow as tf

    pixels = np.asarray(image, dtype="float32")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    batch = tf.convert_to_tensor(pixels[None])
    if layer_name is None:  # a pooling head after the last convolution would only blur the map
        layers = [layer for layer in _layers(model) if "Pooling" not in type(layer).__name__]
    else:
        layers = [layer for layer in _layers(model) if layer.name == layer_name]
        if not layers:
            raise ValueError(f"gradcam: model {model.name!r} has no layer named {layer_name!r}")
    recorded: list[tuple[str, object]] = []
    saved = {id(layer): layer.__dict__.get("call") for layer in layers}

    def recording(layer, original: Callable) -> Callable:
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            if tf.is_tensor(out) and out.shape.rank == 4 and out.shape[1] * out.shape[2] > 1:
                tape.watch(out)
                recorded.append((layer.name, out))
            return out
        return call

    try:
        with tf.GradientTape() as tape:
            for layer in layers:
                object.__setattr__(layer, "call", recording(layer, layer.call))
            output = model(batch, training=False)
            if not tf.is_tensor(output):
                raise ValueError(f"gradcam: model {model.name!r} does not return one score tensor")
            output = tf.reshape(output, (1, -1))
            index = class_index if class_index is not None else (
                0 if output.shape[-1] == 1 else int(tf.argmax(output[0])))
            score = output[:, index]
    finally:
        for layer in layers:
            if saved[id(layer)] is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", saved[id(layer)])
    if not recorded:
        raise ValueError(f"gradcam: no 4-D feature map found in model {model.name!r}"
                         + (f" at layer {layer_name!r}" if layer_name else ""))
    # The last map the score depends on: multi-scale backbones (SpineNet) compute feature levels
    # after the one their head reads.
    every = tape.gradient(score, [activations for _, activations in recorded])
    found = [(activations, gradients) for (_, activations), gradients in zip(recorded, every) if gradients is not None]
    if not found:
        raise ValueError(f"gradcam: the score of model {model.name!r} does not depend on "
                         + (f"layer {layer_name!r}" if layer_name else "any 4-D feature map"))
    activations, gradients = found[-1]
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))[0]
    cam = tf.image.resize(cam[..., None], pixels.shape[:2], method="bilinear")[..., 0].numpy()
    peak = cam.max()
    return (cam / peak if peak > 0 else np.zeros_like(cam)).astype("float32")


Explainer = Callable[[object, np.ndarray, ModelConfig], Explanation]


def explainer(plugin: Plugin, cfg: ModelConfig) -> tuple[Explainer | None, str]:
    """The explanation to draw for a plugin's films and a phrase describing it for the legend."""
    hook = plugin.hook("explain")
    if hook is not None:
        return hook, f"the {plugin.name} plugin's explain hook"
    if cfg.spec.kind == "classifier" and cfg.spec.framework in ("keras", "tf_keras"):
        return (lambda model, image, _cfg: Explanation(heatmap=gradcam(model, image)),
                "Grad-CAM on the last convolutional feature map")
    return None, f"none (plugin {plugin.name} has no explain hook)"


def overlay(image: np.ndarray, explanation: Explanation | None, text: Sequence[str]) -> np.ndarray:
    """A film as the model saw it (H×W in [0, 1], as 8-bit grey, no windowing) with its explanation drawn
    in the gallery's colours (:func:`physis.figures.draw_film`: jet heat map where ≥ 0.1 at 40 %, orange
    boxes with their scores) and ``text`` lines at the top left: an RGB uint8 array of the film's size, so
    that a pixel of the overlay is a pixel of the network's input."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    rgb = np.repeat(np.round(np.clip(image, 0, 1) * 255)[..., None], 3, axis=-1)
    if explanation is not None and explanation.heatmap is not None:
        heat = np.asarray(explanation.heatmap, dtype=float)
        rgb = np.where((heat >= 0.1)[..., None], 0.6 * rgb + 0.4 * 255 * colormaps["jet"](heat)[..., :3], rgb)
    picture = Image.fromarray(np.round(rgb).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(8, min(picture.size) // 12))
    if explanation is not None and explanation.boxes is not None:
        for x, y, w, h, score in np.asarray(explanation.boxes, dtype=float).reshape(-1, 5):
            draw.rectangle((x, y, x + w - 1, y + h - 1), outline=ORANGE)
            draw.text((x, y), f"{score:.2f}", fill=ORANGE, font=font, anchor="lb")
    lines = "\n".join(text)
    draw.rectangle(draw.multiline_textbbox((2, 2), lines, font=font), fill="black")
    draw.multiline_text((2, 2), lines, fill="white", font=font)
    return np.asarray(picture)
