from pathlib import Path

from physis import logs
from physis.evaluate import evaluate_model, training_report

logs.setup(snakemake.log[0])
outputs = dict(snakemake.output.items())
evaluate_model(snakemake.input.scores, outputs, snakemake.params.evaluate, snakemake.wildcards.model,
               snakemake.input.detection)
training_report(Path(snakemake.input.summary).parent, outputs, snakemake.wildcards.model)
