from physis import logs
from physis.convert import convert

logs.setup(snakemake.log[0])
convert(snakemake.config, snakemake.config["results"] + "/data", failure_rejects=snakemake.params.failure_rejects)
