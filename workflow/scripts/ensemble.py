from physis import logs
from physis.ensemble import build

logs.setup(snakemake.log[0])
build(snakemake.input.scores, snakemake.input.summaries, snakemake.params.spec, snakemake.wildcards.ensemble,
      dict(snakemake.output.items()))
