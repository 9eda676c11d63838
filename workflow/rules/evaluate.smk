rule predict:
    input:
        summary=f"{RESULTS}/models/{{model}}/train_summary.json",
        manifest=f"{DATA}/manifest.parquet",
        index=lambda w: f"{RESULTS}/preprocess/{model_preset(w.model)}/index.parquet",
    output:
        scores=f"{RESULTS}/scores/{{model}}.parquet",
        boxes=f"{RESULTS}/predictions/boxes/{{model}}.parquet",
        detection=f"{RESULTS}/metrics/detection/{{model}}.parquet",
    params:
        detects=lambda w: model_plugin(w.model).hook("predict_boxes") is not None,
    log:
        f"{LOGS}/predict/{{model}}.log",
    benchmark:
        f"{BENCH}/predict/{{model}}.tsv"
    threads: lambda w: train_resources(w.model)["cpus"]
    resources:
        mem_mb=lambda w: train_resources(w.model)["mem_mb"],
        runtime=lambda w: train_resources(w.model)["runtime"],
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/predict.py"


rule ensemble:
    input:
        scores=lambda w: expand(f"{RESULTS}/scores/{{m}}.parquet", m=ENSEMBLES[w.ensemble]),
        summaries=lambda w: expand(
            f"{RESULTS}/models/{{m}}/train_summary.json", m=ENSEMBLES[w.ensemble]
        ),
    output:
        scores=f"{RESULTS}/scores/{{ensemble}}.parquet",
        summary=f"{RESULTS}/models/{{ensemble}}/ensemble.json",
    params:
        spec=lambda w: config["ensembles"][w.ensemble],
    wildcard_constraints:
        ensemble="|".join(ENSEMBLES) or "no_ensembles_configured",
    log:
        f"{LOGS}/ensemble/{{ensemble}}.log",
    benchmark:
        f"{BENCH}/ensemble/{{ensemble}}.tsv"
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/ensemble.py"


rule evaluate:
    input:
        scores=f"{RESULTS}/scores/{{model}}.parquet",
        detection=lambda w: (
            [] if w.model in ENSEMBLES else f"{RESULTS}/metrics/detection/{w.model}.parquet"
        ),
        summary=lambda w: SUMMARIES[w.model],
        data=f"{DATA}/summary.json",
    output:
        predictions=f"{RESULTS}/predictions/{{model}}.parquet",
        metrics=f"{RESULTS}/metrics/{{model}}.parquet",
        calibrator=f"{RESULTS}/models/{{model}}/calibration.json",
        metrics_html=report(
            f"{RESULTS}/figures/{{model}}/metrics.html",
            caption="../report/metrics.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "metrics table"},
        ),
        subgroups_html=report(
            f"{RESULTS}/figures/{{model}}/subgroups.html",
            caption="../report/subgroups_table.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "subgroup table"},
        ),
        roc=report(
            f"{RESULTS}/figures/{{model}}/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "ROC curve"},
        ),
        pr=report(
            f"{RESULTS}/figures/{{model}}/pr.png",
            caption="../report/pr.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "precision-recall curve"},
        ),
        calibration=report(
            f"{RESULTS}/figures/{{model}}/calibration.png",
            caption="../report/calibration.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "calibration"},
        ),
        decision_curve=report(
            f"{RESULTS}/figures/{{model}}/decision_curve.png",
            caption="../report/decision_curve.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "decision curve"},
        ),
        confusion=report(
            f"{RESULTS}/figures/{{model}}/confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "confusion matrix"},
        ),
        subgroups=report(
            f"{RESULTS}/figures/{{model}}/subgroups.png",
            caption="../report/subgroups.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "subgroups"},
        ),
        curves=report(
            f"{RESULTS}/figures/{{model}}/training.png",
            caption="../report/training.rst",
            category="Training",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "training curves"},
        ),
        card=report(
            f"{RESULTS}/figures/{{model}}/model_card.html",
            caption="../report/model_card.rst",
            category="Training",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "model card"},
        ),
    params:
        evaluate=config["evaluate"],
        dataset=config["dataset"],
        target=config["target"],
    wildcard_constraints:
        model="|".join(EVALUATED) or "no_models_configured",
    log:
        f"{LOGS}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}.tsv"
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/evaluate.py"


rule gallery:
    input:
        predictions=f"{RESULTS}/predictions/{{model}}.parquet",
        summary=f"{RESULTS}/models/{{model}}/train_summary.json",
        index=lambda w: f"{RESULTS}/preprocess/{model_preset(w.model)}/index.parquet",
    output:
        report(
            f"{RESULTS}/figures/{{model}}/gallery.png",
            caption="../report/gallery.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "gallery"},
        ),
    params:
        films=config["evaluate"]["gallery_films"],
    log:
        f"{LOGS}/gallery/{{model}}.log",
    benchmark:
        f"{BENCH}/gallery/{{model}}.tsv"
    threads: lambda w: train_resources(w.model)["cpus"]
    resources:
        mem_mb=lambda w: train_resources(w.model)["mem_mb"],
        runtime=lambda w: train_resources(w.model)["runtime"],
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/gallery.py"
