"""Rule import_release: the public release folder layout -> {tissue}.h5 patch sets."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))
from omniseg.pipeline import import_release, setup_logging  # noqa: E402

setup_logging(snakemake.log[0])
import_release(
    snakemake.input.release_dir,
    Path(snakemake.output.patch_sets[0]).parent,
    snakemake.input.tissues,
    fractions=snakemake.params.fractions,
    seed=snakemake.params.seed,
)
