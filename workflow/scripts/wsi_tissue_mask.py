"""Rule wsi_tissue_mask: a slide's low-resolution tissue mask and its geometry (JSON)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging  # noqa: E402
from omniseg.wsi.steps import mask_slide  # noqa: E402

setup_logging(snakemake.log[0])
mask_slide(
    snakemake.input.slide,
    snakemake.output.png,
    snakemake.output.info,
    mpp=snakemake.params.mpp,
    mask_image=snakemake.input.mask_image,
    **snakemake.params.mask,
)
