"""Rule split_patients: patient-level train/val/test split of the sample sheet."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging, split_patients  # noqa: E402

setup_logging(snakemake.log[0])
split_patients(
    snakemake.input.sheet,
    snakemake.input.tissues,
    snakemake.output.splits,
    fractions=snakemake.params.fractions,
    seed=snakemake.params.seed,
)
