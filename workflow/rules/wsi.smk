# Whole-slide segmentation: tissue mask -> prediction per scale -> aggregation -> exports, and
# the aggregation's score on slides with ground truth. One rule per step, so a crash reruns
# only its step. The slides and the helper functions are in wsi_common.smk.


include: "wsi_common.smk"


wildcard_constraints:
    slide="|".join(re.escape(s) for s in SLIDES),
    scale="|".join(re.escape(s) for s in WSI_SCALES),


if WSI["slides"] == "synthetic":

    rule synthesize_slide:
        input:
            tissues=config["tissues"],
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


rule stain_reference:
    input:
        patch_sets=get_patch_sets,
    output:
        json="results/wsi/stain_reference.json",
    log:
        "logs/wsi/stain_reference.log",
    benchmark:
        "benchmarks/wsi/stain_reference.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    script:
        "../scripts/stain_reference.py"


rule wsi_stain:
    input:
        slide=get_wsi_slide,
        mask="results/wsi/{slide}/tissue_mask.png",
        info="results/wsi/{slide}/tissue_mask.json",
        reference="results/wsi/stain_reference.json",
    output:
        json="results/wsi/{slide}/stain.json",
    log:
        "logs/wsi/{slide}/stain.log",
    benchmark:
        "benchmarks/wsi/{slide}/stain.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        mpp=get_wsi_mpp,
        stain=get_wsi_stain_name,
    script:
        "../scripts/wsi_stain.py"


rule wsi_predict:
    input:
        models=get_wsi_models,
        slide=get_wsi_slide,
        mask="results/wsi/{slide}/tissue_mask.png",
        info="results/wsi/{slide}/tissue_mask.json",
        stain=get_wsi_stain_file,
        tissues=config["tissues"],
    output:
        prob="results/wsi/{slide}/{method}/prob_{scale}.h5",
    log:
        "logs/wsi/{slide}/{method}/predict_{scale}.log",
    benchmark:
        "benchmarks/wsi/{slide}/{method}/predict_{scale}.tsv"
    conda:
        "../envs/wsi.yaml"
    # one thread: the demo's jobs are mostly start-up (importing torch, loading the model), so
    # two jobs side by side finish sooner than one job on two threads; a single large slide on
    # a CPU: `--set-threads wsi_predict=N`
    threads: 1
    resources:
        mem_mb=4000,
        runtime=240,
    params:
        mpp=get_wsi_mpp,
        tile=WSI["tile"],
        overlap=WSI["overlap"],
        batch_size=WSI["batch_size"],
        adapt_norm=WSI["adapt_norm"],
    script:
        "../scripts/wsi_predict.py"


rule wsi_aggregate:
    input:
        probs=get_wsi_probs,
        info="results/wsi/{slide}/tissue_mask.json",
        mask="results/wsi/{slide}/tissue_mask.png",
        tissues=config["tissues"],
    output:
        labels="results/wsi/{slide}/{method}/labels.h5",
    log:
        "logs/wsi/{slide}/{method}/aggregate.log",
    benchmark:
        "benchmarks/wsi/{slide}/{method}/aggregate.tsv"
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        rules=wsi_rules(),
        threshold=WSI["aggregation"]["threshold"],
        mask_margin_um=WSI["aggregation"]["mask_margin_um"],
    script:
        "../scripts/wsi_aggregate.py"


rule wsi_export:
    input:
        labels=f"results/wsi/{{slide}}/{WSI_METHOD}/labels.h5",
        slide=get_wsi_slide,
        tissues=config["tissues"],
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
        mpp=get_wsi_mpp,
        object_type=WSI["geojson_object_type"],
    script:
        "../scripts/wsi_export.py"


rule wsi_score:
    input:
        labels="results/wsi/{slide}/{method}/labels.h5",
        probs=get_wsi_probs,
        truth=get_wsi_truth,
        info="results/wsi/{slide}/tissue_mask.json",
        mask="results/wsi/{slide}/tissue_mask.png",
        tissues=config["tissues"],
    output:
        scores="results/wsi/{slide}/{method}/scores.csv",
    log:
        "logs/wsi/{slide}/{method}/score.log",
    conda:
        "../envs/wsi.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        rules=wsi_rules(),
        threshold=WSI["aggregation"]["threshold"],
    script:
        "../scripts/wsi_score.py"


rule slide_table:
    input:
        scores=slide_scores(),
        tissues=config["tissues"],
    output:
        csv=report(
            "results/tables/slides.csv",
            caption="../report/slides.rst",
            category="Results",
            labels={"figure": "Slide table"},
        ),
        markdown="results/tables/slides.md",
    log:
        "logs/report/slide_table.log",
    conda:
        "../envs/data.yaml"
    params:
        methods=WSI_SCORED,
    script:
        "../scripts/slide_table.py"


rule wsi_all:
    input:
        wsi_outputs(),
