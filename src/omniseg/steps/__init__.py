"""The step layer: one function per pipeline step, shared by the Snakemake scripts and the
``omniseg`` CLI.

Each step takes paths and plain values (what a rule has in ``input``/``output``/``params``),
loads what it needs and calls the package function that does the work, so a rule and the
matching CLI subcommand always do the same thing. A step's keyword defaults are declared once,
in its signature: the CLI reads them, and the config schema's defaults are tested against them.

- :mod:`omniseg.steps.rois`: synthetic cohort, split, patch sets, training, evaluation, Table 1
  and the figures;
- :mod:`omniseg.steps.slides`: whole slides (synthetic slide, tissue mask, prediction per
  scale, aggregation, exports, scoring, the slide table, QuPath import).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(log_file: str | Path | None = None) -> None:
    """Send logging, warnings and stderr (progress bars) to ``log_file``, or to the terminal."""
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
        sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.captureWarnings(True)
