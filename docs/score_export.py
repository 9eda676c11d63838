"""Score one preprocessed film with a physis export, with TensorFlow only: python score.py EXPORT_DIR FILM.png"""
import json
import sys
from pathlib import Path

import tensorflow as tf

export, png = Path(sys.argv[1]), sys.argv[2]
meta = json.loads((export / "metadata.json").read_text())
recipe = json.loads((export / "recipe.json").read_text())  # the film must be preprocessed with this recipe
image = tf.image.convert_image_dtype(tf.io.decode_png(tf.io.read_file(png), channels=1, dtype=tf.uint16), tf.float32)
images = tf.repeat(image, meta["input"]["shape"][-1], axis=-1)[None]  # grey to the model's channels, batch of 1
out = tf.saved_model.load(str(export / "saved_model")).signatures["serving_default"](images=images)
probability, threshold = float(out["probability"][0]), (meta["threshold"] or {}).get("value")
print(json.dumps({"preset": recipe["preset"], "probability": probability, "score": float(out["score"][0]),
                  "threshold": threshold, "positive": None if threshold is None else probability >= threshold}))
