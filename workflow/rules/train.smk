rule train:
    input:
        manifest=f"{DATA}/manifest.parquet",
        preprocessed=lambda w: f"{RESULTS}/preprocess/{model_preset(w.model)}/index.parquet",
    output:
        f"{RESULTS}/models/{{model}}/train_summary.json",
    params:
        model="{model}",
    log:
        f"{LOGS}/train/{{model}}.log",
    benchmark:
        f"{BENCH}/train/{{model}}.tsv"
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
