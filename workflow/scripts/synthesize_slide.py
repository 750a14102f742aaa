"""Rule synthesize_slide: a synthetic pyramidal slide at 40x and its full ground truth."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import setup_logging  # noqa: E402
from omniseg.wsi.steps import synth_slide  # noqa: E402

setup_logging(snakemake.log[0])
synth_slide(snakemake.output.slide, snakemake.input.tissues, **snakemake.params.synthetic)
