"""Rule split_patients: patient-level train/val/test split of the sample sheet."""

from omniseg.pipeline import setup_logging, split_patients

setup_logging(snakemake.log[0])
split_patients(
    snakemake.input.sheet,
    snakemake.input.tissues,
    snakemake.output.splits,
    fractions=snakemake.params.fractions,
    seed=snakemake.params.seed,
)
