"""Rule synthesize_cohort: generate the synthetic renal cohort and its sample sheet."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging, synth_cohort  # noqa: E402

setup_logging(snakemake.log[0])
synth_cohort(
    snakemake.output.sheet,
    snakemake.input.tissues,
    threads=snakemake.threads,
    **snakemake.params.synthetic,
)
