"""Rule slide_table: every method's slide scores, pooled over slides (slides.csv and slides.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging  # noqa: E402
from omniseg.wsi.steps import make_slide_table  # noqa: E402

setup_logging(snakemake.log[0])
make_slide_table(
    snakemake.input.scores,
    snakemake.input.tissues,
    snakemake.output.csv,
    snakemake.output.markdown,
    methods=snakemake.params.methods,
)
