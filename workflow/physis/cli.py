"""The ``physis`` command: list plugins, predict one film, write the phantom, convert.

``physis plugins [--json] [--params]`` lists the registered model plugins like ``timm.list_models``
(parameter counts from a cache; ``--params`` builds every network to count them);
``physis predict FILE --model results/models/NAME [--json]`` prints a fracture probability, calibrated
with the calibrator the evaluate stage saved in the model folder.
``physis fetch grazpedwri DIR`` downloads, verifies and unpacks GRAZPEDWRI-DX from figshare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


def _param_cache() -> Path:
    """Where ``physis plugins --params`` keeps the counts it built ($XDG_CACHE_HOME/physis)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "physis" / "parameter_counts.json"


def _param_key(plugin, shape: tuple) -> str:
    """A count stays valid while the plugin file, the input shape and the default parameters do."""
    digest = hashlib.sha256(Path(plugin.module.__file__).read_bytes())
    digest.update(json.dumps([list(shape), plugin.spec.params], sort_keys=True, default=str).encode())
    return f"{plugin.name}:{digest.hexdigest()[:16]}"


def _plugins(args) -> int:
    from physis import config as physis_config
    from physis import plugins
    from physis.io import write_json

    cfg = physis_config.load(args.config)
    presets = cfg["preprocess"]["presets"]
    cache_path = _param_cache()
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = []
    for name, plugin in plugins.discover(cfg["plugin_dirs"]).items():
        spec = plugin.spec
        size = presets.get(spec.preset, {})
        shape = (size.get("height"), size.get("width"), spec.channels)
        countable = spec.framework != "service" and None not in shape
        key = _param_key(plugin, shape) if countable else None
        if countable and args.params:  # builds the network: TensorFlow and minutes for the big ones
            from physis.plugins import ModelConfig
            from physis.train import count_params

            cache[key] = count_params(plugin.hook("build")(ModelConfig(name, spec, shape, dict(spec.params))))
        rows.append({"name": name, "kind": spec.kind, "framework": spec.framework, "preset": spec.preset,
                     "input_shape": list(shape), "params": cache.get(key) if countable else None,
                     "reference": spec.reference, "source": plugin.source})
    if args.params:
        write_json(cache, cache_path)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':22s} {'kind':10s} {'framework':9s} {'input':14s} {'preset':20s} {'parameters':>12s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        shape = "x".join(str(v) for v in row["input_shape"])
        params = f"{row['params']:,}" if row["params"] else "-"
        print(f"{row['name']:22s} {row['kind']:10s} {row['framework']:9s} {shape:14s} {row['preset']:20s} {params:>12s}")
    if any(row["params"] is None and row["framework"] != "service" for row in rows):
        print("\nparameters -: not counted yet for this plugin file and input; `physis plugins --params` builds "
              "each network once to count them (minutes)")
    return 0


def _predict(args) -> int:
    from physis.inference import predict_probability

    result = predict_probability(args.image, args.model)
    threshold = result.threshold["value"] if result.threshold else None
    positive = None if threshold is None else result.probability >= threshold
    if args.json:
        print(json.dumps({"image": str(args.image), "model": str(args.model),
                          "fracture_probability": result.probability, "calibrated": result.calibrated,
                          "calibration": result.calibration, "raw_score": result.raw, "threshold": threshold,
                          "positive": positive}))
        return 0
    text = (f"{args.image}: fracture probability {result.probability:.3f} ({Path(args.model).name}; "
            f"{'calibrated: ' if result.calibrated else ''}{result.calibration}; raw model score {result.raw:.3f})")
    if threshold is not None:
        text += (f"; {'at or above' if positive else 'below'} the operating threshold {threshold:.3f} chosen on "
                 "the validation split")
    print(text)
    return 0


def _phantom(args) -> int:
    from physis import phantom

    summary = phantom.generate(args.root, n_patients=args.patients, seed=args.seed,
                               physeal_rate=args.physeal_rate, size_scale=args.size_scale, workers=args.workers)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _convert(args) -> int:
    from physis import config as physis_config
    from physis import logs
    from physis.convert import convert

    logs.setup()
    cfg = physis_config.load(args.config)
    convert(cfg, Path(cfg["results"]) / "data")
    return 0


def _fetch(args) -> int:
    import yaml

    from physis import logs
    from physis.fetch import FIGSHARE_API, GRAZPEDWRI_ARTICLE, fetch

    logs.setup()
    root = args.root.resolve()
    done = fetch(root, api=args.api or FIGSHARE_API, article=args.article or GRAZPEDWRI_ARTICLE)
    print(f"{args.dataset} is complete in {root} (this run downloaded {len(done['downloaded'])} and unpacked "
          f"{len(done['unpacked'])} files). To use it, put this into config/config.yaml:\n")
    print(yaml.safe_dump({"dataset": {"format": args.dataset, "root": str(root), "phantom": {"enabled": False}}},
                         sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="physis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list the registered model plugins")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--params", action="store_true",
                   help="build each network to count its parameters (TensorFlow; minutes) and cache the counts")
    p.add_argument("--config", help="config file for the preset sizes (default: config/config.yaml)")
    p.set_defaults(func=_plugins)

    p = sub.add_parser("predict", help="fracture probability of one image or DICOM file")
    p.add_argument("image", type=Path)
    p.add_argument("--model", required=True, type=Path, help="a trained model folder: results/models/<name>")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_predict)

    p = sub.add_parser("phantom", help="write the procedural phantom data set (GRAZPEDWRI-DX layout)")
    p.add_argument("root", type=Path)
    p.add_argument("--patients", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--physeal-rate", type=float, default=0.3)
    p.add_argument("--size-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1, help="processes rendering films (same bytes either way)")
    p.set_defaults(func=_phantom)

    p = sub.add_parser("convert", help="run the convert stage outside Snakemake")
    p.add_argument("--config", help="config file (default: config/config.yaml)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("fetch", help="download, verify and unpack a public data set (GRAZPEDWRI-DX from figshare)")
    p.add_argument("dataset", choices=["grazpedwri"])
    p.add_argument("root", type=Path, help="folder to download and unpack into (created if missing)")
    p.add_argument("--api", help="figshare API base URL (default: figshare's public API)")
    p.add_argument("--article", type=int, help="figshare article id (default: the GRAZPEDWRI-DX release)")
    p.set_defaults(func=_fetch)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"physis: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
