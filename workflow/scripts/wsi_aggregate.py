"""Rule wsi_aggregate: the per-scale probability maps -> one level-0 label map (labels.h5)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import aggregate_slide

setup_logging(snakemake.log[0])
aggregate_slide(
    snakemake.input.probs,
    snakemake.input.info,
    snakemake.input.tissues,
    snakemake.output.labels,
    mask_png=snakemake.input.mask,
    rules=snakemake.params.rules,
    threshold=snakemake.params.threshold,
    mask_margin_um=snakemake.params.mask_margin_um,
)
