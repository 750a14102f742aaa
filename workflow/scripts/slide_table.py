"""Rule slide_table: every method's slide scores, pooled over slides (slides.csv and slides.md)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import make_slide_table

setup_logging(snakemake.log[0])
make_slide_table(
    snakemake.input.scores,
    snakemake.input.tissues,
    snakemake.output.csv,
    snakemake.output.markdown,
    methods=snakemake.params.methods,
)
