"""Rule params_vs_dice: the paper's Figure 4, deployed parameters against mean Dice."""

from omniseg.steps import setup_logging
from omniseg.steps.rois import make_params_figure

setup_logging(snakemake.log[0])
make_params_figure(
    snakemake.input.models,
    snakemake.input.summaries,
    out_png=snakemake.output.png,
    out_svg=snakemake.output.svg,
    out_csv=snakemake.output.csv,
    paper_csv=snakemake.input.paper,
)
