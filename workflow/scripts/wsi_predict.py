"""Rule wsi_predict: every tissue of one scale over a slide's tissue with one method's
network(s), tiled (prob_{scale}.h5)."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import predict_slide

setup_logging(snakemake.log[0])
predict_slide(
    snakemake.input.models,
    snakemake.input.slide,
    snakemake.input.mask,
    snakemake.input.info,
    snakemake.input.tissues,
    snakemake.wildcards.scale,
    snakemake.output.prob,
    mpp=snakemake.params.mpp,
    tile=snakemake.params.tile,
    overlap=snakemake.params.overlap,
    batch_size=snakemake.params.batch_size,
    adapt_norm=snakemake.params.adapt_norm,
    stain_json=snakemake.input.stain,
    threads=snakemake.threads,
)
