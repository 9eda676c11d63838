"""Export a trained model for use outside physis: a TensorFlow SavedModel, and ONNX for Keras classifiers.

A hospital's inference server should run the model without physis, its plugins or the Model Garden
code, and should not have to re-implement how physis turns the network's output into a decision. The
export therefore holds one self-contained function, the SavedModel signature ``serving_default``:
input ``images``, float32 [B, H, W, C] in [0, 1] (the preprocessed films exactly as the plugin's
``predict`` hook gets them from :func:`physis.pipeline.film_images`), outputs ``probability`` (the raw
score through the model folder's calibrator, computed with TF ops inside the signature), ``score``
(the raw model score) and, for detectors and the two-stage model, ``boxes`` [B, N, 5] (x, y, w, h,
score in preprocessed pixels, zero rows after ``num_boxes``) and ``num_boxes`` [B]. Beside it lie the
preprocessing recipe, the calibrator and validation-chosen threshold (``calibration.json``), a
metadata file, a README and ``score.py``, a TensorFlow-only scoring example (``docs/score_export.py``).

The network's part of the signature comes from the plugin's optional ``serving`` hook (detectors,
two-stage); a classifier without one is served by its model's output column 0, as
:func:`physis.keras_models.predict_classifier` scores it. Keras classifiers also export to ONNX
(tf2onnx): ONNX Runtime is what most PACS/hospital inference servers run. The Model Garden (tf_keras)
models stay SavedModel-only (their detection graphs, NMS and loops, are not what tf2onnx is tested on);
TF Serving and Triton load SavedModels.
Service plugins hold their model in a cloud service and cannot be exported.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import tensorflow as tf

from physis import __version__, calibration
from physis.calibration import EPS, Calibrator
from physis.io import atomic_dir, write_json
from physis.plugins import ROOT, ModelConfig, Plugin, PluginError

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT = "images"
SAVED_MODEL = "saved_model"
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
METADATA = "metadata.json"
#: The TensorFlow-only scoring example; every export carries a copy as ``score.py``.
EXAMPLE = ROOT / "docs" / "score_export.py"
OUTPUTS = {
    "probability": "fracture probability: score through the calibrator fitted on validation (= score when "
                   "the model folder had no calibration.json)",
    "score": "the model's raw fracture score in [0, 1]",
    "boxes": "[B, N, 5] x, y, w, h, score in preprocessed pixels, best first; rows after num_boxes are zero",
    "num_boxes": "[B] boxes per film",
}


def check_exportable(plugin: Plugin, cfg: ModelConfig) -> None:
    """A service plugin's model cannot be exported: an error naming the model and why."""
    if cfg.spec.framework == "service":
        raise PluginError(f"model {cfg.name!r} (plugin {plugin.name}) cannot be exported: it is a cloud service "
                          "(framework service) whose trained model lives in the service, not in the model folder")


def scores_function(plugin: Plugin, model, cfg: ModelConfig) -> Callable:
    """images -> {"score": [B], …}: the plugin's ``serving`` hook, or a classifier's output column 0."""
    check_exportable(plugin, cfg)
    hook = plugin.hook("serving")
    if hook is not None:
        return hook(model, cfg)
    if cfg.spec.kind != "classifier":
        raise PluginError(f"model {cfg.name!r}: plugin {plugin.name} ({cfg.spec.kind}) has no serving hook, "
                          "which a model other than a classifier needs to be exported")
    return lambda images: {"score": model(images, training=False)[:, 0]}


def calibrate(calibrator: Calibrator, score: tf.Tensor) -> tf.Tensor:
    """``calibrator(score)`` with TF ops, in float64 like the NumPy :class:`~physis.calibration.Calibrator`
    (in float32, 1 − EPS rounds to 1 and Platt's logit overflows). Isotonic interpolation finds each
    score's segment by comparison and sum, not ``searchsorted``, so that tf2onnx converts it."""
    s = tf.cast(score, tf.float64)
    if calibrator.method == "platt":
        s = tf.clip_by_value(s, EPS, 1 - EPS)
        return tf.sigmoid(calibrator.params["a"] * tf.math.log(s / (1 - s)) + calibrator.params["b"])
    if calibrator.method == "isotonic":
        knots_x, knots_y = calibrator.params["x"], calibrator.params["y"]
        if len(knots_x) == 1:  # one knot: a constant
            knots_x, knots_y = knots_x * 2, knots_y * 2
        x, y = tf.constant(knots_x, tf.float64), tf.constant(knots_y, tf.float64)
        s = tf.clip_by_value(s, x[0], x[-1])  # np.interp: the end values outside the knots
        below = tf.reduce_sum(tf.cast(x[None, :] <= s[:, None], tf.int32), axis=1)  # searchsorted(side="right")
        i = tf.clip_by_value(below - 1, 0, len(knots_x) - 2)
        x0, x1, y0, y1 = tf.gather(x, i), tf.gather(x, i + 1), tf.gather(y, i), tf.gather(y, i + 1)
        return y0 + tf.math.divide_no_nan(s - x0, x1 - x0) * (y1 - y0)
    return s


def serving_module(plugin: Plugin, model, cfg: ModelConfig, calibrator: Calibrator | None = None,
                   folds: Sequence[tuple[Plugin, object, ModelConfig]] = ()) -> tf.Module:
    """A tf.Module whose ``serve`` is the export's signature. It tracks every variable ``serve`` reads,
    whoever owns them (a Keras 3 model, tf_keras models, the two-stage model's two networks), so
    ``tf.saved_model.save`` stores them without saving the models' own Python objects. ``folds``: the
    other fold models of a cross-validated model, whose scores are averaged with ``model``'s (as the
    evaluate stage scored test films; boxes stay ``model``'s)."""
    scores = [scores_function(plugin, model, cfg)] + [scores_function(*network) for network in folds]
    calibrator = calibrator or Calibrator("none")

    @tf.function(input_signature=[tf.TensorSpec([None, *cfg.input_shape], tf.float32, name=INPUT)])
    def serve(images):
        outs = [dict(function(images)) for function in scores]
        out = outs[0]
        score = tf.add_n([tf.cast(o.pop("score"), tf.float32) for o in outs]) / len(outs)
        return {"probability": tf.cast(calibrate(calibrator, score), tf.float32), "score": score, **out}

    module = tf.Module()
    module.serve = serve
    module.captured = list(serve.get_concrete_function().variables)
    return module


def save_serving(plugin: Plugin, model, cfg: ModelConfig, folder: str | Path, calibrator: Calibrator | None = None,
                 onnx: bool = False, folds: Sequence[tuple[Plugin, object, ModelConfig]] = ()
                 ) -> tuple[list[str], list[str]]:
    """Write the SavedModel (and with ``onnx`` the ONNX file) of ``model`` (averaged with ``folds``:
    :func:`serving_module`) into ``folder``; the names of the files written and of the signature's outputs."""
    folder = Path(folder)
    if onnx and cfg.spec.framework != "keras":
        raise PluginError(f"model {cfg.name!r}: ONNX export is for Keras classifiers (framework keras); plugin "
                          f"{plugin.name} is {cfg.spec.framework} {cfg.spec.kind}: use its SavedModel")
    module = serving_module(plugin, model, cfg, calibrator, folds)
    tf.saved_model.save(module, str(folder / SAVED_MODEL), signatures={SIGNATURE: module.serve})
    order = list(OUTPUTS)
    outputs = sorted(module.serve.get_concrete_function().structured_outputs,
                     key=lambda name: order.index(name) if name in order else len(order))
    if not onnx:
        return [SAVED_MODEL], outputs
    write_onnx(module.serve, folder / ONNX_FILE)
    return [SAVED_MODEL, ONNX_FILE], outputs


def write_onnx(serve, path: Path) -> None:
    """``serve`` as an ONNX file with the signature's input and output names.

    Frozen here, not by ``tf2onnx.convert.from_function``, which takes captured constants (a Keras 3
    ``Normalization`` layer's mean: EfficientNetV2) for extra model inputs. Keras 3 runs grouped
    convolutions on CPU as XLA-compiled functions (ConvNeXt's depthwise layers), which stay opaque calls
    unless unmarked; TF's ``Erfc`` (exact GELU) has no tf2onnx converter and becomes 1 − Erf.
    """
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph = frozen.graph.as_graph_def(add_shapes=True)
    functions = graph.library.function
    for item in [*graph.node, *functions, *(node for function in functions for node in function.node_def)]:
        for key in ("_XlaMustCompile", "_noinline"):
            item.attr.pop(key, None)
    outputs = dict(zip((tensor.name for tensor in frozen.outputs), sorted(concrete.structured_outputs)))  # nest order
    image = frozen.inputs[0].name
    tf2onnx.convert.from_graph_def(graph, input_names=[image], output_names=list(outputs), opset=ONNX_OPSET,
                                   custom_op_handlers={"Erfc": (_erfc_as_erf, [])},
                                   tensors_to_rename={**outputs, image: INPUT}, output_path=str(path))


def _erfc_as_erf(ctx, node, name, args) -> None:
    """tf2onnx handler: Erfc(x) = 1 − Erf(x)."""
    import numpy as np
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    erf = ctx.make_node("Erf", [node.input[0]])
    one = ctx.make_const(utils.make_name("one"), np.array(1, dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


def export(model_dir: str | Path, out: str | Path, onnx: bool = False) -> dict:
    """Export a finished model folder into ``out`` (replaced atomically; an existing folder must be an
    earlier export or empty); return the metadata written to ``metadata.json``. A cross-validated model
    exports as its fold ensemble: one signature averaging the fold models' scores."""
    from physis import crossval
    from physis.inference import load_trained, model_config

    model_dir, out = Path(model_dir), Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file()):
        raise ValueError(f"{out}: exists and is not a physis export (no {METADATA}); give a new folder")
    if (model_dir / "params.json").is_file():  # before loading: a service's load needs its credentials
        check_exportable(*model_config(model_dir))
    networks = [load_trained(folder) for folder in crossval.fold_dirs(model_dir) or [model_dir]]
    plugin, model, cfg = networks[0]  # load_trained fails on ensembles and unfinished folders, naming them
    saved = calibration.load(model_dir)
    calibrator, threshold = saved if saved else (Calibrator("none", note="the model folder has no calibration.json "
                                                                          "(the evaluate stage writes it)"), None)
    recipe = json.loads((model_dir / "recipe.json").read_text())
    with atomic_dir(out) as tmp:
        files, outputs = save_serving(plugin, model, cfg, tmp, calibrator, onnx, networks[1:])
        shutil.copy(model_dir / "recipe.json", tmp / "recipe.json")
        files.append("recipe.json")
        if saved:
            shutil.copy(model_dir / "calibration.json", tmp / "calibration.json")
            files.append("calibration.json")
        shutil.copy(EXAMPLE, tmp / "score.py")
        metadata = {
            "model": cfg.name, "plugin": plugin.name, "kind": cfg.spec.kind, "framework": cfg.spec.framework,
            "signature": SIGNATURE,
            "input": {"name": INPUT, "shape": [None, *cfg.input_shape], "dtype": "float32", "range": [0.0, 1.0],
                      "preprocessing": f"recipe.json (preset {recipe['preset']}, hash {recipe['hash']}); "
                                       + ("grey films repeated to 3 channels" if cfg.input_shape[-1] == 3
                                          else "one grey channel")},
            "outputs": {name: OUTPUTS.get(name, "from the plugin's serving hook") for name in outputs},
            "calibration": {"method": calibrator.method, "description": calibrator.describe()},
            "threshold": threshold, "files": [*files, "score.py", METADATA, "README.md"],
            "folds": len(networks) if len(networks) > 1 else None,  # a cross-validated model's fold ensemble
            "onnx_opset": ONNX_OPSET if onnx else None,
            "versions": {"physis": __version__, "tensorflow": tf.__version__},
        }
        write_json(metadata, tmp / METADATA)
        (tmp / "README.md").write_text(readme(metadata))
    log.info("exported %s to %s: %s", cfg.name, out, ", ".join(metadata["files"]))
    return metadata


def readme(metadata: dict) -> str:
    """The export folder's README: what the files are and how to score a film without physis."""
    threshold = metadata["threshold"]
    decision = (f"Call a film positive when `probability >= {threshold['value']:.6g}` ({threshold['rule']}, chosen "
                "on the validation split)." if threshold else "No operating threshold: the model was not evaluated.")
    onnx = (f"\n- `{ONNX_FILE}`: the same function as ONNX (opset {metadata['onnx_opset']}), for ONNX Runtime."
            if metadata["onnx_opset"] else "")
    outputs = "\n".join(f"  - `{name}`: {text}" for name, text in metadata["outputs"].items())
    shape = ", ".join("B" if size is None else str(size) for size in metadata["input"]["shape"])
    calibrated = (f"`calibration.json`: the calibrator ({metadata['calibration']['description']}) and the threshold."
                  if threshold else f"Probabilities: {metadata['calibration']['description']}.")
    folds = (f"\nA fold ensemble: `score` is the mean of the {metadata['folds']} cross-validated fold models' scores.\n"
             if metadata.get("folds") else "")
    return f"""# {metadata['model']} ({metadata['kind']}, plugin {metadata['plugin']}), exported from physis
{folds}
- `{SAVED_MODEL}/`: TensorFlow SavedModel, signature `{SIGNATURE}`; input `{INPUT}`: float32 [{shape}] in [0, 1],
  films preprocessed with `recipe.json`; outputs:
{outputs}{onnx}
- `recipe.json`: the preprocessing recipe (physis.preprocess.preprocess_array is its reference implementation).
- {calibrated}
- `{METADATA}`: the above as data. `score.py`: scores one preprocessed 16-bit PNG with TensorFlow only:
  `python score.py . film.png`.

{decision}
"""
