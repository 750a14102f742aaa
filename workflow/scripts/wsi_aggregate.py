"""Rule wsi_aggregate: the per-scale probability maps -> one level-0 label map (labels.h5)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging  # noqa: E402
from omniseg.wsi.steps import aggregate_slide  # noqa: E402

setup_logging(snakemake.log[0])
aggregate_slide(
    snakemake.input.probs,
    snakemake.input.info,
    snakemake.input.tissues,
    snakemake.output.labels,
    mask_png=snakemake.input.mask,
    rules=snakemake.params.rules,
    threshold=snakemake.params.threshold,
)
