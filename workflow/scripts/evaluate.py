"""Rule evaluate: a method's test-set metrics (Dice %, HD and MSD in micrometres)."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import evaluate_method

setup_logging(snakemake.log[0])
evaluate_method(
    snakemake.input.models,
    snakemake.input.patch_sets,
    snakemake.input.tissues,
    method=snakemake.wildcards.method,
    outputs={
        "per_patch": snakemake.output.per_patch,
        "summary": snakemake.output.summary,
        "summary_md": snakemake.output.markdown,
        "predictions": snakemake.output.predictions,
    },
    split=snakemake.params.split,
    batch_size=snakemake.params.batch_size,
    threads=snakemake.threads,
)
