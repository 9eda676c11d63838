"""The ``physis`` command: list plugins, predict one film, write the phantom, convert.

``physis plugins [--json] [--params]`` lists the registered model plugins like ``timm.list_models``
(parameter counts from a cache; ``--params`` builds every network to count them);
``physis predict FILM_OR_FOLDER... --model results/models/NAME [--csv FILE] [--json] [--overlay DIR]`` scores
films in batches: fracture probabilities calibrated with the calibrator the evaluate stage saved in the
model folder, and the decision at its validation-chosen threshold.
``physis fetch grazpedwri DIR`` downloads, verifies and unpacks GRAZPEDWRI-DX from figshare.
``physis export --model results/models/NAME --out DIR [--onnx]`` writes the model as a TensorFlow SavedModel
(and ONNX) with its recipe, calibrator and threshold, for use without physis.
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
    """Score the films; one stderr line per skipped input. Exit status: see ``physis predict --help``."""
    from dataclasses import asdict

    import pandas as pd

    from physis.inference import Predictor, find_films
    from physis.io import write_json

    inputs = find_films(args.inputs)
    if not inputs:
        raise ValueError(f"no files in {', '.join(map(str, args.inputs))}")
    predictor = Predictor(args.model)
    calibrator, _ = predictor.calibration
    as_text = not (args.csv or args.json or args.json_out)
    results = []
    for result in predictor.score(inputs, args.batch_size, args.overlay):
        results.append(result)
        if result.error:
            print(f"physis: error: {result.film}: {result.error}", file=sys.stderr)
        elif as_text:
            text = (f"{result.film}: fracture probability {result.score:.3f} ({args.model.name}; "
                    f"{'calibrated: ' if result.calibrated else ''}{calibrator.describe()}; "
                    f"raw model score {result.raw_score:.3f})")
            if result.threshold is not None:
                text += (f"; {'at or above' if result.positive else 'below'} the operating threshold "
                         f"{result.threshold:.3f} chosen on the validation split")
            print(text)
    if args.csv:
        pd.DataFrame([asdict(result) for result in results]).to_csv(args.csv, index=False)
    if args.json or args.json_out:
        document = {"calibration": calibrator.describe(),
                    "films": [{k: v for k, v in asdict(r).items() if k != "error"} for r in results if not r.error],
                    "skipped": [{"film": r.film, "error": r.error} for r in results if r.error]}
        if args.json_out:
            write_json(document, args.json_out)
        if args.json:
            print(json.dumps(document))
    scored = sum(not result.error for result in results)
    return 0 if scored == len(results) else 1 if scored else 2


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


def _export(args) -> int:
    from physis.serving import export

    metadata = export(args.model, args.out, onnx=args.onnx)
    threshold = metadata["threshold"]
    print(f"{args.out}: {metadata['model']} exported ({', '.join(metadata['files'])}); probabilities: "
          f"{metadata['calibration']['description']}; "
          + (f"threshold {threshold['value']:.3f} ({threshold['rule']})" if threshold else "no threshold"))
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

    p = sub.add_parser(
        "predict", help="fracture probability of films: image or DICOM files, folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score films with a trained model folder, loaded once; films go through the network in batches.\n"
                    "Folders are searched recursively for PNG, JPEG and TIFF files and DICOM files (by their\n"
                    "preamble, whatever their name); hidden files are left out. Each film is preprocessed with\n"
                    "the model's recipe (recipe.json), its score calibrated with the model's calibration.json and\n"
                    "compared with the operating threshold chosen on validation. Per film (CSV row, JSON entry):\n"
                    "film, score (calibrated probability), raw_score, positive (score >= threshold), threshold,\n"
                    "calibrated, model, recipe_hash, overlay, error. An input that is no readable film is skipped:\n"
                    "one stderr line 'physis: error: FILM: reason', a CSV row with only film and error, an entry\n"
                    "of the JSON's skipped list. Without --csv, --json or --json-out, one line per film on stdout.\n"
                    "DICOM header values never reach the outputs.",
        epilog="exit status: 0 every input scored; 1 some inputs skipped, the others scored; 2 nothing scored\n"
               "(every input skipped) or a usage error (no such file or folder, unusable model folder)")
    p.add_argument("inputs", nargs="+", type=Path, metavar="FILM_OR_FOLDER",
                   help="image (PNG, JPEG, TIFF) or DICOM files, folders of them")
    p.add_argument("--model", required=True, type=Path, help="a trained model folder: results/models/<name>")
    p.add_argument("--csv", type=Path, metavar="FILE", help="write one row per input to FILE")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document to stdout: calibration, films, skipped (instead of text lines)")
    p.add_argument("--json-out", type=Path, metavar="FILE", help="write that JSON document to FILE")
    p.add_argument("--overlay", type=Path, metavar="DIR",
                   help="write each scored film as the model saw it (8-bit PNG) with the model's explanation (heat "
                        "map or boxes) and its score and decision to DIR, named after the film")
    p.add_argument("--batch-size", type=int, default=16, help="films per network batch (default: 16)")
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

    p = sub.add_parser("export", help="write a trained model as a TensorFlow SavedModel (+ ONNX) to use without physis")
    p.add_argument("--model", required=True, type=Path, help="a trained model folder: results/models/<name>")
    p.add_argument("--out", required=True, type=Path, help="the export folder (replaced if it holds an earlier export)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (Keras classifiers)")
    p.set_defaults(func=_export)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"physis: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
