# One train job per model; with cross-validation (split.folds = k ≥ 2) one per model × fold, each
# fold's model in models/{model}/fold{fold}/, then `cross_validation` joins the folds' summaries.
rule train:
    input:
        manifest=f"{DATA}/manifest.parquet",
        preprocessed=lambda w: f"{RESULTS}/preprocess/{model_preset(w.model)}/index.parquet",
    output:
        f"{RESULTS}/models/{{model}}/{FOLD_DIR}train_summary.json",
    params:
        model="{model}",
        fold=lambda w: int(w.fold) if FOLDS else None,
    log:
        f"{LOGS}/train/{{model}}{FOLD_SUFFIX}.log",
    benchmark:
        f"{BENCH}/train/{{model}}{FOLD_SUFFIX}.tsv"
    threads: lambda w: train_resources(w.model)["cpus"]
    priority: lambda w: train_priority(w.model)
    retries: config["train"]["retries"]
    resources:
        mem_mb=lambda w: train_resources(w.model)["mem_mb"],
        runtime=lambda w: train_resources(w.model)["runtime"],
        cpus_per_task=lambda w: train_resources(w.model)["cpus"],
        gpu=lambda w: train_resources(w.model)["gpus"],
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/train.py"


if FOLDS:

    rule cross_validation:
        input:
            expand(
                f"{RESULTS}/models/{{{{model}}}}/fold{{fold}}/train_summary.json",
                fold=range(FOLDS),
            ),
        output:
            f"{RESULTS}/models/{{model}}/train_summary.json",
        params:
            folds=FOLDS,
        log:
            f"{LOGS}/train/{{model}}.log",
        conda:
            "../../envs/physis.yaml"
        script:
            "../scripts/cross_validation.py"
