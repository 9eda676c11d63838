"""Grad-CAM on tiny Keras 3 and tf_keras models, and the per-plugin choice of explanation."""

import types

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

from physis.explain import explainer, gradcam  # noqa: E402
from physis.plugins import Explanation, ModelConfig, ModelSpec, Plugin  # noqa: E402


def _blob_image(size=24):
    image = np.zeros((size, size, 1), "float32")
    image[3:8, 4:9] = 1.0  # bright square in the top-left corner
    return image


def _identity_classifier(size=24):
    """Score = sigmoid(mean(relu(conv1x1(image)))): Grad-CAM must reproduce the image itself."""
    model = keras.Sequential([
        keras.Input((size, size, 1)),
        keras.layers.Conv2D(1, 1, activation="relu", name="features"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.get_layer("features").set_weights([np.ones((1, 1, 1, 1), "float32"), np.zeros(1, "float32")])
    model.layers[-1].set_weights([np.ones((1, 1), "float32"), np.zeros(1, "float32")])
    return model


def test_gradcam_highlights_what_drives_the_score():
    image = _blob_image()
    heat = gradcam(_identity_classifier(), image)
    assert heat.shape == (24, 24) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    np.testing.assert_allclose(heat, image[..., 0], atol=1e-5)
    assert gradcam(_identity_classifier(), image[..., 0]).shape == (24, 24)  # 2-D input accepted


def _nested_keras3():
    backbone = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, name="c1"),
                                 keras.layers.Conv2D(6, 3, activation="relu", name="c2")], name="backbone")
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside keras' model.save
def test_gradcam_nested_keras3_model_and_named_layer_and_restores_model(tmp_path):
    model = _nested_keras3()
    model.save(tmp_path / "m.keras")
    model = keras.models.load_model(tmp_path / "m.keras", compile=False)
    image = np.random.default_rng(0).random((32, 32, 3)).astype("float32")
    before = model(image[None]).numpy()
    heat = gradcam(model, image)
    named = gradcam(model, image, layer_name="c1")
    assert heat.shape == named.shape == (32, 32)
    assert 0 <= heat.min() and heat.max() <= 1 and 0 <= named.min() and named.max() <= 1
    np.testing.assert_allclose(model(image[None]).numpy(), before)
    assert all("call" not in vars(layer) for layer in model._flatten_layers())


def test_gradcam_tf_keras_sequential_and_subclassed_softmax():
    image = np.random.default_rng(1).random((20, 20, 3)).astype("float32")
    sequential = tf_keras.Sequential([tf_keras.layers.Conv2D(4, 3, activation="relu", input_shape=(20, 20, 3)),
                                      tf_keras.layers.GlobalAveragePooling2D(),
                                      tf_keras.layers.Dense(1, activation="sigmoid")])

    class Subclassed(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = tf_keras.layers.Conv2D(4, 3, activation="relu")
            self.pool = tf_keras.layers.GlobalAveragePooling2D()
            self.head = tf_keras.layers.Dense(2, activation="softmax")

        def call(self, x, training=False):
            return self.head(self.pool(self.conv(x)))

    subclassed = Subclassed()
    subclassed(image[None])
    for model in (sequential, subclassed):
        heat = gradcam(model, image)
        assert heat.shape == (20, 20) and 0 <= heat.min() and heat.max() <= 1
    assert gradcam(subclassed, image, class_index=1).shape == (20, 20)


def test_gradcam_default_layer_is_the_last_convolution_not_a_pooling_head():
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
                              keras.layers.AveragePooling2D(2), keras.layers.Flatten(), keras.layers.Dense(1)])
    image = np.random.default_rng(2).random((16, 16, 1)).astype("float32")
    np.testing.assert_allclose(gradcam(model, image), gradcam(model, image, layer_name="conv"))


def test_gradcam_skips_feature_maps_the_score_does_not_depend_on():
    """Like SpineNet, which computes pyramid levels after the one its head reads."""

    class SideBranch(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.used = tf_keras.layers.Conv2D(3, 3, activation="relu", name="used")
            self.unused = tf_keras.layers.Conv2D(2, 3, name="unused")
            self.pool = tf_keras.layers.GlobalAveragePooling2D()
            self.head = tf_keras.layers.Dense(1, activation="sigmoid")

        def call(self, x, training=False):
            features = self.used(x)
            self.unused(features)  # computed last, never read by the head
            return self.head(self.pool(features))

    model = SideBranch()
    image = np.random.default_rng(3).random((16, 16, 1)).astype("float32")
    model(image[None])
    np.testing.assert_allclose(gradcam(model, image), gradcam(model, image, layer_name="used"))
    with pytest.raises(ValueError, match="does not depend on layer 'unused'"):
        gradcam(model, image, layer_name="unused")


def test_gradcam_errors_name_the_problem():
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        gradcam(_identity_classifier(), _blob_image(), layer_name="nope")
    dense_only = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no 4-D feature map"):
        gradcam(dense_only, np.zeros((4, 4, 1), "float32"))


def _plugin(kind, framework, **hooks):
    spec = ModelSpec(kind=kind, framework=framework, preset="p")
    module = types.SimpleNamespace(SPEC=spec, **hooks)
    return Plugin("toy", module, "test"), ModelConfig("toy", spec, (24, 24, 1), {})


def test_explainer_prefers_the_plugins_hook_then_gradcam():
    def hook(model, image, cfg):
        return Explanation(boxes=np.array([[1, 2, 3, 4, 0.9]]))

    fn, how = explainer(*_plugin("detector", "tf_keras", explain=hook))
    assert fn is hook and "explain hook" in how
    fn, how = explainer(*_plugin("classifier", "keras"))
    explanation = fn(_identity_classifier(), _blob_image(), None)
    assert explanation.heatmap.shape == (24, 24) and "Grad-CAM" in how
    fn, how = explainer(*_plugin("service", "service"))
    assert fn is None and "no explain hook" in how
