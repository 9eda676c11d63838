from physis import logs
from physis.datafigures import data_figures

logs.setup(snakemake.log[0])
data_figures(snakemake.input.manifest, snakemake.input.boxes, snakemake.input.rejected, snakemake.input.summary,
             dict(snakemake.output.items()), snakemake.params.examples)
