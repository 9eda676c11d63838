"""physis: train and benchmark physeal-fracture detectors on pediatric wrist X-rays.

The package is the library behind the Snakemake workflow: every rule's script is a thin
wrapper around one function here, so the same code runs from Snakemake, the `physis`
command and the tests.
"""

__version__ = "0.1.0"

import os

# TensorFlow's C++ start-up chatter (no CUDA driver, oneDNN notes) buries the real log lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
