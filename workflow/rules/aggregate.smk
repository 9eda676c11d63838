rule data_figures:
    input:
        manifest=f"{DATA}/manifest.parquet",
        boxes=f"{DATA}/boxes.parquet",
        rejected=f"{DATA}/rejected.parquet",
        summary=f"{DATA}/summary.json",
    output:
        balance=report(
            f"{RESULTS}/figures/data/class_balance.png",
            caption="../report/data_balance.rst",
            category="Data",
            subcategory="Data set",
            labels={"figure": "films per split"},
        ),
        patients=report(
            f"{RESULTS}/figures/data/patients.png",
            caption="../report/data_patients.rst",
            category="Data",
            subcategory="Data set",
            labels={"figure": "patients per split"},
        ),
        examples=report(
            f"{RESULTS}/figures/data/examples.png",
            caption="../report/data_examples.rst",
            category="Data",
            subcategory="Data set",
            labels={"figure": "example films"},
        ),
        rejects=report(
            f"{RESULTS}/figures/data/rejects.html",
            caption="../report/data_rejects.rst",
            category="Data",
            subcategory="Data set",
            labels={"figure": "rejected and excluded inputs"},
        ),
    params:
        examples=config["evaluate"]["data_examples"],
    log:
        f"{LOGS}/data_figures.log",
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/data_figures.py"


rule aggregate:
    input:
        metrics=expand(f"{RESULTS}/metrics/{{model}}.parquet", model=EVALUATED),
        predictions=expand(f"{RESULTS}/predictions/{{model}}.parquet", model=EVALUATED),
        summaries=list(SUMMARIES.values()),
    output:
        leaderboard=f"{RESULTS}/leaderboard.parquet",
        csv=f"{RESULTS}/leaderboard.csv",
        html=report(
            f"{RESULTS}/leaderboard.html",
            caption="../report/leaderboard.rst",
            category="Comparison",
            subcategory="Leaderboard",
            labels={"figure": "leaderboard"},
        ),
        comparisons=f"{RESULTS}/comparisons.parquet",
        comparisons_html=report(
            f"{RESULTS}/comparisons.html",
            caption="../report/comparisons.rst",
            category="Comparison",
            subcategory="Leaderboard",
            labels={"figure": "pairwise tests"},
        ),
        roc_overlay=report(
            f"{RESULTS}/figures/comparison/roc_overlay.png",
            caption="../report/roc_overlay.rst",
            category="Comparison",
            subcategory="Figures",
            labels={"figure": "ROC overlay"},
        ),
        forest=report(
            f"{RESULTS}/figures/comparison/auroc_forest.png",
            caption="../report/forest.rst",
            category="Comparison",
            subcategory="Figures",
            labels={"figure": "AUROC forest plot"},
        ),
        thesis=report(
            f"{RESULTS}/figures/comparison/accuracy_vs_thesis.png",
            caption="../report/thesis.rst",
            category="Comparison",
            subcategory="Figures",
            labels={"figure": "accuracy vs. thesis"},
        ),
        cost=report(
            f"{RESULTS}/figures/comparison/cost.png",
            caption="../report/cost.rst",
            category="Comparison",
            subcategory="Figures",
            labels={"figure": "cost vs. AUROC"},
        ),
        decision_curve=report(
            f"{RESULTS}/figures/comparison/decision_curve.png",
            caption="../report/decision_curve_overlay.rst",
            category="Comparison",
            subcategory="Figures",
            labels={"figure": "decision curves"},
        ),
    params:
        unavailable=UNAVAILABLE,
        evaluate=config["evaluate"],
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCH}/aggregate.tsv"
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/aggregate.py"


rule evaluate_all:
    input:
        rules.data_figures.output,
        rules.aggregate.output,
        expand(f"{RESULTS}/figures/{{model}}/gallery.png", model=MODELS),
        expand(rules.evaluate.output, model=EVALUATED),
