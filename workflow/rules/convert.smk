if PHANTOM:

    rule phantom:
        output:
            f"{config['dataset']['root']}/dataset.csv",
        params:
            phantom=config["dataset"]["phantom"],
        log:
            f"{LOGS}/phantom.log",
        threads: 2
        conda:
            "../../envs/physis.yaml"
        script:
            "../scripts/phantom.py"


rule convert:
    input:
        convert_inputs(),
    output:
        manifest=f"{DATA}/manifest.parquet",
        boxes=f"{DATA}/boxes.parquet",
        rejected=f"{DATA}/rejected.parquet",
        summary=f"{DATA}/summary.json",
        coco=directory(f"{DATA}/coco"),
        tfrecord=directory(f"{DATA}/tfrecord"),
    params:
        failure_rejects=f"{LOGS}/convert_rejected.csv",
    log:
        f"{LOGS}/convert.log",
    benchmark:
        f"{BENCH}/convert.tsv"
    conda:
        "../../envs/physis.yaml"
    script:
        "../scripts/convert.py"
