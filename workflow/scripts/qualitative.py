"""Rule qualitative: the paper's Figure 3 for one tissue (best, median, worst test patch)."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import make_qualitative

setup_logging(snakemake.log[0])
make_qualitative(
    snakemake.wildcards.tissue,
    snakemake.input.per_patch,
    snakemake.input.predictions,
    snakemake.input.patch_set,
    snakemake.input.tissues,
    out_png=snakemake.output.png,
    split=snakemake.params.split,
)
