"""Rule synthesize_slide: a synthetic pyramidal slide at 40x and its full ground truth."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import synth_slide

setup_logging(snakemake.log[0])
synth_slide(
    snakemake.output.slide,
    snakemake.input.tissues,
    truth_h5=snakemake.output.truth,
    **snakemake.params.synthetic,
)
