from physis import logs
from physis.evaluate import evaluate_model
from physis.model_card import training_report

logs.setup(snakemake.log[0])
outputs = dict(snakemake.output.items())
evaluation = evaluate_model(snakemake.input.scores, outputs, snakemake.params.evaluate, snakemake.wildcards.model,
                            snakemake.input.detection)
training_report(snakemake.input.summary, snakemake.input.data, evaluation, outputs,
                {"dataset": snakemake.params.dataset, "target": snakemake.params.target,
                 "evaluate": snakemake.params.evaluate}, snakemake.wildcards.model)
