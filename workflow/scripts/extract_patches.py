"""Rule extract_patches: one tissue's ROIs -> scaled patches -> {tissue}.h5."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import extract_tissue

setup_logging(snakemake.log[0])
extract_tissue(
    snakemake.input.sheet,
    snakemake.input.splits,
    snakemake.input.tissues,
    snakemake.wildcards.tissue,
    snakemake.output.patch_set,
    size=snakemake.params.size,
    counts=snakemake.params.counts,
    object_fraction=snakemake.params.object_fraction,
    absent_fraction=snakemake.params.absent_fraction,
    seed=snakemake.params.seed,
    config_hash=snakemake.params.config_hash,
)
