# physis: train and benchmark physeal-fracture detectors on pediatric wrist X-rays.
#
# DAG: phantom (optional) -> convert -> preprocess -> train (one job per model) -> evaluate -> aggregate
# Results layout (under config["results"], default results/):
#   data/        manifest.parquet, boxes.parquet, rejected.parquet|csv, summary.json, coco/, tfrecord/
#   logs/        one log per job;  benchmarks/  runtime and memory per job
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/convert.smk"


rule all:
    default_target: True
    input:
        rules.convert.output,
