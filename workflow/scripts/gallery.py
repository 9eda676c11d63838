from pathlib import Path

from physis import logs
from physis.evaluate import write_gallery

logs.setup(snakemake.log[0])
write_gallery(snakemake.input.predictions, Path(snakemake.input.summary).parent, Path(snakemake.input.index).parent,
              snakemake.output[0], snakemake.params.films, snakemake.wildcards.model)
