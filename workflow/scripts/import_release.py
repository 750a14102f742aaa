"""Rule import_release: the public release folder layout -> one patch set per tissue."""

from pathlib import Path

from omniseg.steps import setup_logging
from omniseg.steps.rois import import_release

setup_logging(snakemake.log[0])
import_release(
    snakemake.input.release_dir,
    Path(snakemake.output.patch_sets[0]).parent,
    snakemake.input.tissues,
    fractions=snakemake.params.fractions,
    seed=snakemake.params.seed,
    outputs=dict(zip(snakemake.params.tissue_keys, snakemake.output.patch_sets, strict=True)),
)
