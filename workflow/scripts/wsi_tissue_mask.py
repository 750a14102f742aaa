"""Rule wsi_tissue_mask: a slide's low-resolution tissue mask and its geometry (JSON)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import mask_slide

setup_logging(snakemake.log[0])
mask_slide(
    snakemake.input.slide,
    snakemake.output.png,
    snakemake.output.info,
    mpp=snakemake.params.mpp,
    mask_image=snakemake.input.mask_image,
    **snakemake.params.mask,
)
