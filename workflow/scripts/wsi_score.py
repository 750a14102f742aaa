"""Rule wsi_score: per-tissue Dice of the label map against the aggregated ground truth, and of
the raw heads before aggregation (over the tissue mask grown by the margin the label map
records)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import score_slide

setup_logging(snakemake.log[0])
score_slide(
    snakemake.input.labels,
    snakemake.input.truth,
    snakemake.input.tissues,
    snakemake.output.scores,
    rules=snakemake.params.rules,
    prob_h5s=snakemake.input.probs,
    mask_png=snakemake.input.mask,
    mask_json=snakemake.input.info,
    threshold=snakemake.params.threshold,
    method=snakemake.wildcards.method,
    slide=snakemake.wildcards.slide,
)
