"""Rule wsi_export: OME-TIFF label pyramid, overlay, GeoJSON for QuPath and tissue areas."""

from omniseg.steps import setup_logging
from omniseg.steps.slides import export_slide

setup_logging(snakemake.log[0])
export_slide(
    snakemake.input.labels,
    snakemake.input.tissues,
    ome_tif=snakemake.output.ome_tif,
    overlay_png=snakemake.output.overlay,
    geojson=snakemake.output.geojson,
    areas_csv=snakemake.output.areas,
    slide=snakemake.input.slide,
    mpp=snakemake.params.mpp,
    object_type=snakemake.params.object_type,
)
