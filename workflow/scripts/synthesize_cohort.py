"""Rule synthesize_cohort: generate the synthetic renal cohort and its sample sheet."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import synth_cohort

setup_logging(snakemake.log[0])
synth_cohort(
    snakemake.output.sheet,
    snakemake.input.tissues,
    threads=snakemake.threads,
    **snakemake.params.synthetic,
)
