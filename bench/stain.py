"""What `wsi.stain_norm` costs a slide: reading tiles through the gain, and measuring the slide.

On a synthetic slide (JPEG pyramid, as the demo's), it times, variants interleaved, best of
``--repeats``:

* ``read``: every 256-px tile of the slide's tissue at each tissue scale (0.25, 1, 2 um/px), read
  and resampled as ``wsi_predict`` reads them, as decoded and through a stain gain (one lookup
  per pixel and channel before resampling), and the ratio;
* ``density``: the ``wsi_stain`` rule's measurement of the slide (:func:`slide_density`, 1 um/px
  over the tissue mask).

One JSON object; compare the ratio, not the seconds (these machines are noisy)::

    python bench/stain.py [--height 3072] [--width 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from omniseg.steps import slides as steps
from omniseg.tissues import load_tissues
from omniseg.wsi.slide import Slide
from omniseg.wsi.stain import slide_density

REPO = Path(__file__).resolve().parents[1]
TILE = 256
SCALES = (0.25, 1.0, 2.0)


def read_tiles(slide: Slide, mask, downsample: float) -> int:
    """Read every tile of ``TILE`` px at each scale whose centre is on the mask; tiles read."""
    n = 0
    w0, h0 = slide.dimensions
    for um in SCALES:
        edge0 = round(TILE * um / slide.mpp)
        for y in range(0, h0, edge0):
            for x in range(0, w0, edge0):
                r = min(int((y + edge0 / 2) / downsample), mask.shape[0] - 1)
                c = min(int((x + edge0 / 2) / downsample), mask.shape[1] - 1)
                if mask[r, c]:
                    slide.read_scaled(x, y, edge0, edge0, um, out_size=(TILE, TILE))
                    n += 1
    return n


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int, default=3072)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from omniseg.io import read_mask

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tissues = load_tissues(REPO / "config" / "tissues.tsv")
        slide = steps.synth_slide(tmp / "s.tif", tissues, seed=1, height=args.height,
                                  width=args.width)["slide"]  # fmt: skip
        info = steps.mask_slide(slide, tmp / "m.png", tmp / "m.json", min_area_um2=1000.0)
        mask, ds = read_mask(tmp / "m.png"), float(info["downsample"])
        gain = [0.87, 0.76, 0.64]  # the demo's synth_1, the most deeply stained demo slide
        with Slide(slide) as plain, Slide(slide, od_gain=gain) as normed:
            tiles = read_tiles(plain, mask, ds)
            t_plain, t_gain = [], []
            for _ in range(args.repeats):  # interleaved
                t_plain.append(best(lambda: read_tiles(plain, mask, ds), 1))
                t_gain.append(best(lambda: read_tiles(normed, mask, ds), 1))
            t_density = best(lambda: slide_density(plain, mask, ds), args.repeats)
    report = {
        "slide": {
            "height": args.height,
            "width": args.width,
            "tissue_mm2": info["tissue_area_mm2"],
        },
        "read": {
            "tiles": tiles,
            "as_decoded_s": round(min(t_plain), 3),
            "through_gain_s": round(min(t_gain), 3),
            "ratio": round(min(t_gain) / min(t_plain), 3),
        },
        "density_s": round(t_density, 3),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
