import re

PREPROCESS = f"{RESULTS}/preprocess/{{preset}}"


rule preprocess:
    input:
        manifest=f"{DATA}/manifest.parquet",
        boxes=f"{DATA}/boxes.parquet",
    output:
        index=f"{PREPROCESS}/index.parquet",
        boxes=f"{PREPROCESS}/boxes.parquet",
        rejected=f"{PREPROCESS}/rejected.parquet",
        rejected_csv=f"{PREPROCESS}/rejected.csv",
        recipe=f"{PREPROCESS}/recipe.json",
        images=directory(f"{PREPROCESS}/images"),
        steps=report(
            f"{PREPROCESS}/steps.png",
            caption="../report/preprocess_steps.rst",
            category="Preprocessing",
            subcategory="{preset}",
            labels={"preset": "{preset}", "figure": "preprocessing steps"},
        ),
    params:
        recipe=lambda wildcards: config["preprocess"]["presets"][wildcards.preset],
        figure_films=config["preprocess"]["figure_films"],
    wildcard_constraints:
        preset="|".join(map(re.escape, config["preprocess"]["presets"])),
    log:
        f"{LOGS}/preprocess/{{preset}}.log",
    benchmark:
        f"{BENCH}/preprocess/{{preset}}.tsv"
    threads: 2
    priority: 100  # cheap, and every model waits for its preset
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/preprocess.py"


rule preprocess_only:
    input:
        expand(rules.preprocess.output.index, preset=config["preprocess"]["presets"]),
