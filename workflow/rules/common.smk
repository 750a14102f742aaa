# Helper functions, config validation and wildcard constraints shared by every rule file.
import hashlib
import json
import os
from pathlib import Path

from snakemake.utils import validate

# The omniseg package is installed where Snakemake runs (`pip install -e .` in a clone, see the
# README) and, with `--sdm conda`, into each rule's env by workflow/envs/*.post-deploy.sh from
# this workflow's own source tree: the clone's root, or the tagged archive of a GitHub module.
from omniseg.data.sheet import load_sheet
from omniseg.deploy import package_source
from omniseg.steps.rois import check_training_configs, method_training_config
from omniseg.tissues import file_digest, load_tissues

try:
    os.environ.setdefault("OMNISEG_PACKAGE_SOURCE", package_source(workflow.basedir))
except ValueError:
    pass  # only conda envs need it; their post-deploy script then says what to set

validate(config, workflow.source_path("../schemas/config.schema.yaml"))

TISSUES = load_tissues(config["tissues"])
SOURCE = config["data"]["source"]
METHODS = config["methods"]
# The schema names the training keys; their values are checked here, by the trainer's own rules,
# for every method with its overrides (one rule set, before any job runs).
check_training_configs(config, len(TISSUES))


wildcard_constraints:
    tissue="|".join(TISSUES.keys),
    method="|".join(METHODS),
    scope="|".join(["all", *TISSUES.keys]),


def config_hash(*sections):
    """Short hash of config sections, stored in outputs so stale files can be recognised.

    The section "tissues" enters by the registry's contents (``file_digest``), not its path: an
    edited config/tissues.tsv changes the hash (the rules also declare it as an input).
    """
    values = [
        file_digest(config["tissues"]) if s == "tissues" else config.get(s)
        for s in sections
    ]
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def get_sheet():
    """The sample sheet of 40x ROIs: generated for the demo, the user's otherwise."""
    if SOURCE == "synthetic":
        return "results/cohort/rois.tsv"
    return config["data"]["sheet"]


def user_sheet():
    """The user's sheet, validated while the DAG is built (file existence only)."""
    return load_sheet(config["data"]["sheet"], TISSUES, check_files=True)


def release_tissues():
    """Tissue keys whose folder exists in the release layout (data.source: release)."""
    root = Path(config["data"]["release_dir"])
    if not root.is_dir():
        raise ValueError(f"data.release_dir {root} does not exist")
    found = {p.name for p in root.rglob("*") if p.is_dir()}
    return [t.key for t in TISSUES if t.release_folder in found]


def patch_tissues():
    """Tissue keys that get a patch set."""
    if SOURCE == "release":
        return release_tissues()
    if SOURCE == "sheet":
        return sorted(set(user_sheet()["tissue"]), key=TISSUES.keys.index)
    return TISSUES.keys


def get_roi_files(wildcards):
    """Images and masks of one tissue's ROIs (user data only: the synthetic ones come with the sheet)."""
    if SOURCE != "sheet":
        return []
    rows = user_sheet().query("tissue == @wildcards.tissue")
    return [*rows["image"], *rows["mask"]]


def get_patch_sets(wildcards=None):
    return expand("results/patches/{tissue}.h5", tissue=patch_tissues())


def method_scopes(method):
    """'all' for a single network, else one tissue key per independent network."""
    return patch_tissues() if METHODS[method].get("per_tissue", False) else ["all"]


def models_of(method):
    """Model files of one method: one, or one per tissue."""
    return expand(
        "results/models/{method}/{scope}/model.pt",
        method=method,
        scope=method_scopes(method),
    )


def get_models(wildcards):
    return models_of(wildcards.method)


def train_threads(wildcards):
    """One CPU thread per training job: jobs run side by side and fill the cores as well, and a
    network's weights then do not depend on how many cores the machine has (the floating-point
    order of a multi-threaded CPU step does: bench/robustness.py). A GPU job uses the GPU.
    """
    return 1


def get_train_patch_sets(wildcards):
    if wildcards.scope == "all":
        return get_patch_sets()
    return [f"results/patches/{wildcards.scope}.h5"]


def training_config(wildcards):
    """Shared training settings, the method's overrides, its model and loss strategy."""
    return method_training_config(
        config, wildcards.method, wildcards.scope, len(patch_tissues())
    )


def report_outputs():
    """Table 1 and the figures comparing the methods."""
    return [
        "results/tables/table1.csv",
        "results/tables/table1.md",
        "results/figures/params_vs_dice.png",
        *expand("results/figures/qualitative_{tissue}.png", tissue=patch_tissues()),
    ]


def wsi_outputs():
    """Whole-slide outputs; rules/wsi_common.smk redefines this when the config has `wsi`."""
    return []


def get_final_output():
    return [
        *get_patch_sets(),
        *expand("results/eval/{method}/summary.csv", method=METHODS),
        *report_outputs(),
        *wsi_outputs(),
    ]
