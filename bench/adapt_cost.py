"""What does ``wsi.adapt_norm`` cost? One slide's prediction with and without it, timed in turn.

Runs :func:`omniseg.steps.slides.predict_slide` for every scale of the tissue table on one slide
of a finished run with a method's trained networks, alternating ``adapt_norm=0`` and
``adapt_norm=N`` ``--repeats`` times (the machine's noise falls on both), and prints one JSON
object: the seconds of each repeat and variant (all scales), their medians and
``ratio`` = median with adaptation / median without::

    python bench/adapt_cost.py results [--slide synth_0] [--method omniseg] [--adapt-norm 2]
        [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from omniseg.steps.slides import predict_slide, scale_keys
from omniseg.tissues import load_tissues

REPO = Path(__file__).resolve().parents[1]


def time_slide(models, slide: Path, wsi_dir: Path, tissues, adapt: int, threads: int, out: Path):
    """Seconds to predict every scale of ``slide`` with ``adapt_norm=adapt``."""
    t0 = time.perf_counter()
    for key in scale_keys(tissues):
        predict_slide(
            models, slide, wsi_dir / "tissue_mask.png", wsi_dir / "tissue_mask.json", tissues,
            key, out / f"prob_{key}_{adapt}.h5", tile=256, threads=threads, adapt_norm=adapt,
            progress=False,
        )  # fmt: skip
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="?", default=Path("results"))
    ap.add_argument("--slide", default="synth_0")
    ap.add_argument("--method", default="omniseg")
    ap.add_argument("--adapt-norm", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tissues", type=Path, default=REPO / "config" / "tissues.tsv")
    args = ap.parse_args(argv)
    if args.adapt_norm < 1 or args.repeats < 1:
        ap.error("--adapt-norm and --repeats must be >= 1")
    slide = args.results / "slides" / f"{args.slide}.tif"
    wsi_dir = args.results / "wsi" / args.slide
    models = sorted((args.results / "models" / args.method).glob("*/model.pt"))
    missing = [str(p) for p in (slide, wsi_dir / "tissue_mask.json") if not p.is_file()]
    if missing or not models:
        raise SystemExit(
            f"{args.results}: missing {', '.join(missing) or f'models/{args.method}/*/model.pt'} "
            "(run the default pipeline first: snakemake --cores all)"
        )
    tissues = load_tissues(args.tissues)
    seconds: dict[str, list[float]] = {"plain": [], "adapted": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, adapt in (("plain", 0), ("adapted", args.adapt_norm)):
                s = time_slide(models, slide, wsi_dir, tissues, adapt, args.threads, Path(tmp))
                seconds[name].append(round(s, 2))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    report = {
        "slide": args.slide,
        "method": args.method,
        "adapt_norm": args.adapt_norm,
        "threads": args.threads,
        "seconds": seconds,
        "median_s": med,
        "ratio": round(med["adapted"] / med["plain"], 3),
    }
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
