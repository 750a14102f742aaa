# Data stages: synthetic cohort, patient-level split, per-tissue HDF5 patch sets.


rule synthesize_cohort:
    input:
        tissues=config["tissues"],
    output:
        sheet="results/cohort/rois.tsv",
        images=directory("results/cohort/images"),
        masks=directory("results/cohort/masks"),
        truth=directory("results/cohort/truth"),
    log:
        "logs/synthesize_cohort.log",
    benchmark:
        "benchmarks/synthesize_cohort.tsv"
    conda:
        "../envs/data.yaml"
    threads: 2
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        synthetic=config["data"].get("synthetic", {}),
    script:
        "../scripts/synthesize_cohort.py"


rule split_patients:
    input:
        sheet=get_sheet(),
        tissues=config["tissues"],
    output:
        splits="results/split/patients.tsv",
    log:
        "logs/split_patients.log",
    conda:
        "../envs/data.yaml"
    params:
        fractions=config["split"]["fractions"],
        seed=config["split"]["seed"],
    script:
        "../scripts/split_patients.py"


if SOURCE == "release":

    rule import_release:
        input:
            release_dir=config["data"]["release_dir"],
            tissues=config["tissues"],
        output:
            patch_sets=expand("results/patches/{tissue}.h5", tissue=patch_tissues()),
        log:
            "logs/import_release.log",
        benchmark:
            "benchmarks/import_release.tsv"
        conda:
            "../envs/data.yaml"
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            fractions=config["split"]["fractions"],
            seed=config["split"]["seed"],
            tissue_keys=patch_tissues(),
        script:
            "../scripts/import_release.py"

else:

    rule extract_patches:
        input:
            sheet=get_sheet(),
            splits="results/split/patients.tsv",
            rois=get_roi_files,
            tissues=config["tissues"],
        output:
            patch_set="results/patches/{tissue}.h5",
        log:
            "logs/patches/{tissue}.log",
        benchmark:
            "benchmarks/patches/{tissue}.tsv"
        conda:
            "../envs/data.yaml"
        resources:
            mem_mb=3000,
            runtime=60,
        params:
            size=config["patches"]["size"],
            counts=config["patches"]["counts"],
            object_fraction=config["patches"]["object_fraction"],
            absent_fraction=config["patches"]["absent_fraction"],
            seed=config["patches"]["seed"],
            config_hash=config_hash("data", "split", "patches", "tissues"),
        script:
            "../scripts/extract_patches.py"


rule patches:
    input:
        get_patch_sets(),
