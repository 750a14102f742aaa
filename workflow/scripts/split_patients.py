"""Rule split_patients: patient-level train/val/test split of the sample sheet."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import split_patients

setup_logging(snakemake.log[0])
split_patients(
    snakemake.input.sheet,
    snakemake.input.tissues,
    snakemake.output.splits,
    fractions=snakemake.params.fractions,
    seed=snakemake.params.seed,
)
