"""Rule wsi_export: OME-TIFF label pyramid, overlay, GeoJSON for QuPath and tissue areas."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging  # noqa: E402
from omniseg.wsi.steps import export_slide  # noqa: E402

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
