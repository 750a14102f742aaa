"""Rule stain_reference: the training patches' mean optical density per stain."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import stain_reference

setup_logging(snakemake.log[0])
stain_reference(snakemake.input.patch_sets, snakemake.output.json)
