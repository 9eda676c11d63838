"""Run every benchmark module and write one CSV per module plus ``bench.csv`` (all rows)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pandas as pd

from physis.bench import MODULES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m physis.bench", description=__doc__)
    parser.add_argument("--out", default="results/bench", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not a measurement)")
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for name in MODULES:
        if args.only and name not in args.only:
            continue
        table = importlib.import_module(f"physis.bench.{name}").run(out, args.quick)
        table.to_csv(out / f"{name}.csv", index=False)
        print(table.to_string(index=False), flush=True)
        tables.append(table)
    if tables:
        pd.concat(tables).to_csv(out / "bench.csv", index=False)


if __name__ == "__main__":
    main()
