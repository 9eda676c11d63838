from pathlib import Path

import pandas as pd

from physis import logs
from physis.preprocess import run

logs.setup(snakemake.log[0])
run(pd.read_parquet(snakemake.input.manifest), pd.read_parquet(snakemake.input.boxes), snakemake.wildcards.preset,
    snakemake.params.recipe, Path(snakemake.output.index).parent, threads=snakemake.threads,
    figure_films=snakemake.params.figure_films)
