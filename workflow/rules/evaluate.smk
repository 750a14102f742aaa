# Test-set evaluation: Dice, Hausdorff and mean surface distance in micrometres.


rule evaluate:
    input:
        models=get_models,
        patch_sets=get_patch_sets(),
        tissues=config["tissues"],
    output:
        per_patch="results/eval/{method}/per_patch.csv",
        summary=report(
            "results/eval/{method}/summary.csv",
            caption="../report/summary.rst",
            category="Evaluation",
            labels={"method": "{method}", "table": "summary"},
        ),
        markdown="results/eval/{method}/summary.md",
        predictions="results/eval/{method}/predictions.h5",
    log:
        "logs/evaluate/{method}.log",
    benchmark:
        "benchmarks/evaluate/{method}.tsv"
    conda:
        "../envs/torch.yaml"
    # one thread, like wsi_predict: jobs side by side fill the cores (`--set-threads evaluate=N`)
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        split=config["evaluate"]["split"],
        batch_size=config["evaluate"]["batch_size"],
    script:
        "../scripts/evaluate.py"


rule evaluate_all:
    input:
        expand("results/eval/{method}/summary.csv", method=METHODS),
