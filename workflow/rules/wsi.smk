# Whole-slide segmentation: tissue mask -> prediction per scale -> aggregation -> exports, and
# the aggregation's score on slides with ground truth. One rule per step, so a crash reruns
# only its step. The slides and the helper functions are in wsi_common.smk.


include: "wsi_common.smk"


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES),
    scale="|".join(re.escape(s) for s in WSI_SCALES),


if WSI["slides"] == "synthetic":

    rule synthesize_slide:
        output:
            slide="results/slides/{slide}.tif",
            truth="results/slides/{slide}_truth.h5",
        log:
            "logs/wsi/{slide}/synthesize_slide.log",
        benchmark:
            "benchmarks/wsi/{slide}/synthesize_slide.tsv"
        conda:
            "../envs/wsi.yaml"
        resources:
            mem_mb=3000,
            runtime=30,
        params:
            tissues=config["tissues"],
            synthetic=get_synthetic_slide,
        script:
            "../scripts/synthesize_slide.py"


rule wsi_tissue_mask:
    input:
        slide=get_wsi_slide,
        mask_image=get_wsi_mask_image,
    output:
        png="results/wsi/{slide}/tissue_mask.png",
        info="results/wsi/{slide}/tissue_mask.json",
    log:
        "logs/wsi/{slide}/tissue_mask.log",
    benchmark:
        "benchmarks/wsi/{slide}/tissue_mask.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        mpp=get_wsi_mpp,
        mask=WSI["mask"],
    script:
        "../scripts/wsi_tissue_mask.py"


rule wsi_predict:
    input:
        model=wsi_models(),
        slide=get_wsi_slide,
        mask="results/wsi/{slide}/tissue_mask.png",
        info="results/wsi/{slide}/tissue_mask.json",
    output:
        prob="results/wsi/{slide}/prob_{scale}.h5",
    log:
        "logs/wsi/{slide}/predict_{scale}.log",
    benchmark:
        "benchmarks/wsi/{slide}/predict_{scale}.tsv"
    conda:
        "../envs/wsi.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        tissues=config["tissues"],
        mpp=get_wsi_mpp,
        tile=WSI["tile"],
        overlap=WSI["overlap"],
        batch_size=WSI["batch_size"],
    script:
        "../scripts/wsi_predict.py"


rule wsi_aggregate:
    input:
        probs=expand("results/wsi/{{slide}}/prob_{scale}.h5", scale=WSI_SCALES),
        info="results/wsi/{slide}/tissue_mask.json",
        mask="results/wsi/{slide}/tissue_mask.png",
    output:
        labels="results/wsi/{slide}/labels.h5",
    log:
        "logs/wsi/{slide}/aggregate.log",
    benchmark:
        "benchmarks/wsi/{slide}/aggregate.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        tissues=config["tissues"],
        rules=wsi_rules(),
        threshold=WSI["aggregation"]["threshold"],
    script:
        "../scripts/wsi_aggregate.py"


rule wsi_export:
    input:
        labels="results/wsi/{slide}/labels.h5",
        slide=get_wsi_slide,
    output:
        ome_tif="results/wsi/{slide}/labels.ome.tif",
        overlay=report(
            "results/wsi/{slide}/overlay.png",
            caption="../report/wsi_overlay.rst",
            category="Whole slides",
            subcategory="{slide}",
            labels={"slide": "{slide}", "output": "overlay"},
        ),
        geojson="results/wsi/{slide}/tissues.geojson",
        areas=report(
            "results/wsi/{slide}/areas.csv",
            caption="../report/wsi_areas.rst",
            category="Whole slides",
            subcategory="{slide}",
            labels={"slide": "{slide}", "output": "tissue areas"},
        ),
    log:
        "logs/wsi/{slide}/export.log",
    benchmark:
        "benchmarks/wsi/{slide}/export.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=3000,
        runtime=60,
    params:
        tissues=config["tissues"],
        mpp=get_wsi_mpp,
    script:
        "../scripts/wsi_export.py"


rule wsi_score:
    input:
        labels="results/wsi/{slide}/labels.h5",
        truth=get_wsi_truth,
    output:
        scores=report(
            "results/wsi/{slide}/aggregation_scores.csv",
            caption="../report/wsi_scores.rst",
            category="Whole slides",
            subcategory="{slide}",
            labels={"slide": "{slide}", "output": "aggregation Dice"},
        ),
    log:
        "logs/wsi/{slide}/score.log",
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        tissues=config["tissues"],
        rules=wsi_rules(),
    script:
        "../scripts/wsi_score.py"


rule wsi_all:
    input:
        wsi_outputs(),
