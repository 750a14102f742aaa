# The paper's results section: Table 1, Figure 4 (parameters vs Dice), Figure 3 (qualitative).


rule table1:
    input:
        summaries=expand("results/eval/{method}/summary.csv", method=METHODS),
        paper="config/paper_table1.csv",
        tissues=config["tissues"],
    output:
        csv=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Results",
            labels={"figure": "Table 1"},
        ),
        markdown="results/tables/table1.md",
    log:
        "logs/report/table1.log",
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/table1.py"


rule params_vs_dice:
    input:
        models=[models_of(method) for method in METHODS],
        summaries=expand("results/eval/{method}/summary.csv", method=METHODS),
        paper="config/paper_table1.csv",
    output:
        png=report(
            "results/figures/params_vs_dice.png",
            caption="../report/params_vs_dice.rst",
            category="Results",
            labels={"figure": "Figure 4: parameters vs Dice"},
        ),
        svg="results/figures/params_vs_dice.svg",
        csv="results/figures/params_vs_dice.csv",
    log:
        "logs/report/params_vs_dice.log",
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/params_vs_dice.py"


rule qualitative:
    input:
        per_patch=expand("results/eval/{method}/per_patch.csv", method=METHODS),
        predictions=expand("results/eval/{method}/predictions.h5", method=METHODS),
        patch_set="results/patches/{tissue}.h5",
        tissues=config["tissues"],
    output:
        png=report(
            "results/figures/qualitative_{tissue}.png",
            caption="../report/qualitative.rst",
            category="Results",
            subcategory="Figure 3: qualitative",
            labels={"tissue": "{tissue}"},
        ),
    log:
        "logs/report/qualitative_{tissue}.log",
    conda:
        "../envs/data.yaml"
    params:
        split=config["evaluate"]["split"],
    script:
        "../scripts/qualitative.py"


rule results:
    input:
        report_outputs(),
