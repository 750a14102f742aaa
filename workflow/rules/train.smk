# Training: one job per method, or per method and tissue for multi-network methods.


rule train:
    input:
        patch_sets=get_train_patch_sets,
        tissues=config["tissues"],
    output:
        model="results/models/{method}/{scope}/model.pt",
        log_csv="results/models/{method}/{scope}/log.csv",
        curve=report(
            "results/models/{method}/{scope}/curve.png",
            caption="../report/training_curve.rst",
            category="Training",
            subcategory="{method}",
            labels={"method": "{method}", "network": "{scope}"},
        ),
    log:
        "logs/train/{method}/{scope}.log",
    benchmark:
        "benchmarks/train/{method}/{scope}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: train_threads
    resources:
        mem_mb=6000,
        runtime=24 * 60,
    params:
        training=training_config,
        # Resume state: deliberately not an output, Snakemake deletes a failed job's outputs.
        state_dir="results/state/{method}/{scope}",
    script:
        "../scripts/train.py"


rule train_omniseg:
    input:
        models_of("omniseg") if "omniseg" in METHODS else [],


rule train_all:
    input:
        [models_of(method) for method in METHODS],
