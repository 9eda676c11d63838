"""Benchmarks (``make bench``): speed and memory targets live here, not in timed tests.

Each module in this package defines ``run(out_dir: Path, quick: bool) -> pandas.DataFrame``
(one row per measurement: benchmark, case, metric, value, unit, target, ok) and is listed in
:data:`MODULES`; ``python -m physis.bench`` runs them all and writes ``results/bench/*.csv``.
"""

MODULES: list[str] = ["preprocess", "train", "garden", "predict"]
