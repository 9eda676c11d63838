"""Initial checkpoints of the Model Garden models (``params.init_checkpoint``), loaded strictly.

``init_checkpoint`` is ``none``, a checkpoint prefix (``…/ckpt-28080``, the name before ``.index``)
or a folder holding one (its latest), on a path TensorFlow's file system reads: local, ``gs://``,
or another scheme a file-system plugin registers (TensorFlow itself has none for ``https://``; a
``.tar.gz`` download must be unpacked first). ``init_checkpoint_modules`` says what it initialises,
as the Model Garden's task configs name it: ``backbone`` or ``all``.

Strict means: every variable of what was asked gets a value of its own shape from the checkpoint,
or the load fails naming the variables that do not (missing ones, and shape mismatches such as a
91-class COCO head in a two-class model). Checkpoint entries the model does not use (optimizer
slots, a mask head) are ignored, as the Model Garden ignores them.

- Object-based (TF2) checkpoints are read the way the Model Garden tasks' ``initialize()`` read
  them: ``tf.train.Checkpoint(backbone=…)`` or ``tf.train.Checkpoint(model=…)``, i.e. the layout
  the Model Garden trainers write (top-level ``model``, ``backbone``, ``optimizer``, …). The legacy
  detection executor and physis's own loop checkpoints hold ``model`` only; a backbone is then read
  from inside it. :func:`restore` first matches each variable through the checkpoint's object
  graph, as TensorFlow's restore matches it, to name what is unmatched.
- Name-based (TF1) checkpoints are read by the legacy detection package's ``checkpoint_utils``
  (:func:`restore_by_name`, ShapeMask only), which gives a variable the checkpoint entry whose name
  ends in the variable's name. With tf_keras's unscoped names (``conv2d/kernel`` ends
  ``bottleneck_block/conv2d/kernel`` too) that matching is ambiguous for the legacy SpineNet, and
  the load fails saying so.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import tensorflow as tf

log = logging.getLogger(__name__)

MODULES = ("backbone", "all")
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"  # the object graph of a TF2 (object-based) checkpoint
SHOWN = 8  # unmatched variables listed per kind in an error


class CheckpointMismatch(ValueError):
    """An initial checkpoint that cannot initialise what was asked; the message names the variables."""


def requested(params: dict) -> tuple[str, str] | None:
    """``(init_checkpoint, init_checkpoint_modules)`` of a plugin's parameters; None for ``none``."""
    path = params.get("init_checkpoint", "none")
    if path in (None, "", "none"):
        return None
    modules = params.get("init_checkpoint_modules", "backbone")
    if modules not in MODULES:
        raise ValueError(f"init_checkpoint_modules {modules!r} is not one of {', '.join(MODULES)}")
    return str(path), modules


def resolve(path: str) -> str:
    """The checkpoint prefix at ``path``: the prefix itself or a folder's latest checkpoint."""
    try:
        if tf.io.gfile.isdir(path):
            latest = tf.train.latest_checkpoint(path)
            if latest is None:
                raise CheckpointMismatch(f"init_checkpoint {path}: a folder without a 'checkpoint' file naming "
                                         "its latest checkpoint; give the checkpoint prefix instead")
            return latest
        if tf.io.gfile.exists(path + ".index"):
            return path
    except tf.errors.OpError as error:  # e.g. "File system scheme 'https' not implemented"
        raise CheckpointMismatch(f"init_checkpoint {path}: TensorFlow's file system cannot read it "
                                 f"({error.message})") from None
    raise CheckpointMismatch(f"init_checkpoint {path}: no checkpoint there (no {path}.index, not a folder); "
                             "unpack a downloaded .tar.gz and give the prefix of its .index file")


def object_based(path: str) -> bool:
    """Whether the checkpoint at ``path`` is object-based (TF2) rather than name-based (TF1)."""
    return tf.train.load_checkpoint(resolve(path)).has_tensor(OBJECT_GRAPH)


def restore(path: str, modules: str, model, backbone, label: str) -> None:
    """Restore the built tf_keras ``model`` (``all``) or its ``backbone`` from the object-based
    checkpoint at ``path``; :class:`CheckpointMismatch` unless each of their variables gets a value
    of its own shape.

    The checkpoint holds the model as its top-level ``model`` (Model Garden trainers, the legacy
    detection executor, physis's own loop checkpoints) and, from the Model Garden trainers, the
    backbone as ``backbone`` too; a backbone is read from there, else from inside ``model``.
    """
    prefix = resolve(path)
    reader = tf.train.load_checkpoint(prefix)
    if not reader.has_tensor(OBJECT_GRAPH):
        raise CheckpointMismatch(f"init_checkpoint {path}: a name-based (TF1) checkpoint; {label} reads "
                                 "object-based (TF2) checkpoints such as the Model Garden trainers write")
    graph = _object_graph(reader)
    top = {ref.local_name: ref.node_id for ref in graph.nodes[0].children}
    if modules == "backbone" and "backbone" in top:
        root = {"backbone": backbone}
    elif modules == "backbone":
        root = {"model": _holding(model, backbone, graph.nodes[top["model"]] if "model" in top else None)}
    else:
        root = {"model": model}
    variables = _variables_with_paths(root, model if modules == "all" else backbone)
    bound = _bind(tf.train.Checkpoint(**root), graph)
    shapes = reader.get_variable_to_shape_map()
    missing = [(name, v) for name, v in variables if id(v) not in bound]
    mismatched = [(name, v, shapes[bound[id(v)]]) for name, v in variables
                  if id(v) in bound and tuple(shapes[bound[id(v)]]) != tuple(v.shape)]
    _fail_unless_complete(path, label, len(variables), missing, mismatched,
                          f"its top-level objects: {', '.join(sorted(top)) or 'none'}")
    tf.train.Checkpoint(**root).read(prefix).expect_partial().assert_existing_objects_matched()
    log.info("%s initialised from %s (%d variables)", label, prefix, len(variables))


def restore_by_name(target, path: str, label: str) -> None:
    """Restore the tf_keras model ``target`` from a name-based checkpoint with the legacy detection
    package's loader; :class:`CheckpointMismatch` unless every variable of it gets a value of its
    own shape."""
    from official.legacy.detection.modeling import checkpoint_utils

    prefix = resolve(path)
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    try:
        # the legacy loader's own name matching (make_restore_checkpoint_fn applies the same map)
        assignment = checkpoint_utils._build_assignment_map(target, var_to_shape_map=shapes)
    except AssertionError as error:  # a variable whose name ends several checkpoint names
        raise CheckpointMismatch(f"init_checkpoint {path} does not fit {label}: the legacy loader matches a "
                                 f"variable to the entry whose name ends in its name, and finds {error}") from None
    bound = {id(variable): name for name, variable in assignment.items()}
    variables = [(v.name, v) for v in target.variables]
    missing = [(name, v) for name, v in variables if id(v) not in bound]
    mismatched = [(name, v, shapes[bound[id(v)]]) for name, v in variables
                  if id(v) in bound and tuple(shapes[bound[id(v)]]) != tuple(v.shape)]
    _fail_unless_complete(path, label, len(variables), missing, mismatched,
                          f"it holds {len(shapes)} named tensors, e.g. {', '.join(sorted(shapes)[:3])}")
    checkpoint_utils.make_restore_checkpoint_fn(prefix)(target)
    log.info("%s initialised from %s (%d variables, by name)", label, prefix, len(variables))


# --------------------------------------------------------------------------- matching


def _object_graph(reader):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    return trackable_object_graph_pb2.TrackableObjectGraph.FromString(reader.get_tensor(OBJECT_GRAPH))


def _bind(root, graph) -> dict[int, str]:
    """``id(variable) → checkpoint key`` for each variable under ``root`` that the checkpoint holds,
    found by walking the checkpoint's object graph and ``root``'s dependencies by the same child
    names, as TensorFlow's restore does."""
    bound: dict[int, str] = {}
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, node_id = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        node = graph.nodes[node_id]
        if isinstance(obj, tf.Variable):
            keys = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
            if keys:
                bound[id(obj)] = keys[0]
        children = tf.train.TrackableView.children(obj)
        stack += [(children[ref.local_name], ref.node_id) for ref in node.children if ref.local_name in children]
    return bound


def _holding(model, backbone, model_node):
    """A stand-in for ``model`` that holds only ``backbone``, under the name by which the
    checkpoint's ``model`` node refers to it, so that reading it restores the backbone alone."""
    names = [name for name, child in tf.train.TrackableView.children(model).items() if child is backbone]
    saved = {ref.local_name for ref in model_node.children} if model_node is not None else set()
    name = next((n for n in names if n in saved), names[0])
    return tf.train.Checkpoint(**{name: backbone})


def _variables_with_paths(root: dict[str, Any], target) -> list[tuple[str, tf.Variable]]:
    """The variables of ``target``, each named by its object path under ``root``
    (``backbone/layer_with_weights-3/kernel``: the first found breadth-first, as checkpoint keys are
    named) and its variable name."""
    paths: dict[int, str] = {}
    queue = deque(root.items())
    while queue:
        path, obj = queue.popleft()
        if id(obj) in paths:
            continue
        paths[id(obj)] = path
        if not isinstance(obj, tf.Variable):
            queue.extend((f"{path}/{name}", child) for name, child in tf.train.TrackableView.children(obj).items())
    return [(f"{paths.get(id(v), '?')} ({v.name})", v) for v in target.variables]


def _fail_unless_complete(path: str, label: str, total: int, missing: list, mismatched: list, hint: str) -> None:
    if not missing and not mismatched:
        return
    lines = [f"init_checkpoint {path} does not fit {label}: {len(missing) + len(mismatched)} of {total} "
             "variables would not be restored"]
    if missing:
        shown = [f"{name} {tuple(v.shape)}" for name, v in missing[:SHOWN]]
        lines.append(f"  {len(missing)} not in the checkpoint: " + "; ".join(shown)
                     + (f"; … {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""))
    if mismatched:
        shown = [f"{name}: model {tuple(v.shape)}, checkpoint {tuple(shape)}" for name, v, shape in mismatched[:SHOWN]]
        lines.append(f"  {len(mismatched)} of another shape: " + "; ".join(shown)
                     + (f"; … {len(mismatched) - SHOWN} more" if len(mismatched) > SHOWN else ""))
    lines.append(f"  ({hint})")
    raise CheckpointMismatch("\n".join(lines))
