from physis import logs
from physis.train import train_model

logs.setup(snakemake.log[0])
train_model(snakemake.params.model, snakemake.config, threads=snakemake.threads, fold=snakemake.params.fold)
