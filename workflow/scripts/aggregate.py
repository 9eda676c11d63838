from physis import logs
from physis.aggregate import aggregate

logs.setup(snakemake.log[0])
aggregate(snakemake.input.metrics, snakemake.input.predictions, snakemake.input.summaries,
          dict(snakemake.output.items()), snakemake.params.unavailable, snakemake.params.evaluate)
