"""Rule wsi_stain: the optical-density gain that brings a slide's tissue to the training
patches of its stain (stain.json)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import slide_stain

setup_logging(snakemake.log[0])
slide_stain(
    snakemake.input.slide,
    snakemake.input.mask,
    snakemake.input.info,
    snakemake.input.reference,
    snakemake.params.stain,
    snakemake.output.json,
    mpp=snakemake.params.mpp,
)
