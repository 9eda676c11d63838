# physis: train and benchmark physeal-fracture detectors on pediatric wrist X-rays.
#
# DAG: phantom (optional) -> convert -> preprocess (one job per preset) -> train (one job per model)
#      -> predict (-> ensemble) -> evaluate (+ gallery for models) -> aggregate;
#      then `snakemake --report results/report.html`.
# Results layout (under config["results"], default results/):
#   data/                 manifest, boxes, rejects, summary, coco/, tfrecord/      (convert)
#   preprocess/{preset}/  images/, index, boxes, rejected, recipe.json, steps.png (preprocess)
#   models/{model}/       saved model, recipe.json, params.json, history.parquet,
#                         tensorboard/, checkpoints/, train_summary.json          (train)
#                         with split.folds = k: fold0/ ... fold{k-1}/ (one model each) and the
#                         combined summary, history, recipe, params         (train, cross_validation)
#                         calibration.json: calibrator + threshold for `physis predict` (evaluate)
#   models/{ensemble}/    ensemble.json, calibration.json                         (ensemble, evaluate)
#   scores/{model}.parquet, predictions/{model}.parquet, metrics/{model}.parquet  (predict, evaluate)
#   figures/{model}/, figures/data/, figures/comparison/                          (evaluate, aggregate)
#   leaderboard.parquet|csv|html, comparisons.parquet|html                        (aggregate)
#   exports/{model}/      SavedModel (+ model.onnx), recipe, calibration, metadata (export_all)
#   logs/, benchmarks/    one log and one runtime/memory record per job
# Relative paths in the config (results, dataset.root) are relative to the working directory;
# plugin_dirs, scripts, envs and schemas are relative to this folder (so `module` use works too).
from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.current_basedir}/config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        rules.evaluate_all.input,


rule data_only:
    input:
        rules.convert.output,


rule train_only:
    input:
        expand(f"{RESULTS}/models/{{model}}/train_summary.json", model=MODELS),
