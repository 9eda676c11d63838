from pathlib import Path

from physis import logs, phantom

logs.setup(snakemake.log[0])
settings = snakemake.params.phantom
phantom.generate(Path(snakemake.output[0]).parent, n_patients=settings["patients"], seed=settings["seed"],
                 physeal_rate=settings["physeal_rate"], size_scale=settings["size_scale"],
                 workers=snakemake.threads)
