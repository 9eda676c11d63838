# Every trained network as a SavedModel (+ ONNX for Keras classifiers) with its recipe, calibrator and
# threshold, for use without physis (physis.serving). Not part of `all`: `snakemake export_all`.
EXPORTABLE = [name for name in MODELS if model_plugin(name).spec.framework != "service"]


rule export:
    input:
        summary=f"{RESULTS}/models/{{model}}/train_summary.json",
        calibration=f"{RESULTS}/models/{{model}}/calibration.json",
    output:
        directory(f"{RESULTS}/exports/{{model}}"),
    params:
        onnx=lambda w: model_plugin(w.model).spec.framework == "keras",
    wildcard_constraints:
        model="|".join(EXPORTABLE) or "no_models_configured",
    log:
        f"{LOGS}/export/{{model}}.log",
    benchmark:
        f"{BENCH}/export/{{model}}.tsv"
    threads: lambda w: train_resources(w.model)["cpus"]
    resources:
        mem_mb=lambda w: train_resources(w.model)["mem_mb"],
        runtime=lambda w: train_resources(w.model)["runtime"],
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/export.py"


rule export_all:
    input:
        expand(rules.export.output, model=EXPORTABLE),
