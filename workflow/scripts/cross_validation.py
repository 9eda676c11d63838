from pathlib import Path

from physis import logs
from physis.crossval import finish

logs.setup(snakemake.log[0])
finish(Path(snakemake.output[0]).parent, snakemake.params.folds)
