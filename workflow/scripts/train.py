"""Rule train: train one network of a method (all tissues, or one for multi-network methods)."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import train_model

setup_logging(snakemake.log[0])
train_model(
    snakemake.input.patch_sets,
    snakemake.input.tissues,
    snakemake.params.training,
    model_out=snakemake.output.model,
    log_csv=snakemake.output.log_csv,
    curve_png=snakemake.output.curve,
    state_dir=snakemake.params.state_dir,
    method=snakemake.wildcards.method,
    scope=snakemake.wildcards.scope,
    threads=snakemake.threads,
)
