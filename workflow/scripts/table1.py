"""Rule table1: the paper's Table 1 for every method, the published one beside it."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import make_table1

setup_logging(snakemake.log[0])
make_table1(
    snakemake.input.summaries,
    snakemake.input.tissues,
    out_csv=snakemake.output.csv,
    out_md=snakemake.output.markdown,
    paper_csv=snakemake.input.paper,
)
