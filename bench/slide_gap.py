"""Where does a method's slide map go wrong, and does the test split see it? Two views of a run.

1. The region of a demo slide where ``--method`` gets ``--tissue`` most wrong (false negatives
   plus false positives of its label map after aggregation, against the slide's ground truth),
   drawn as panels: the slide, the truth, then every ``--compare`` method's label map, each
   tissue in its colour (``tissues.tsv``). Written to ``--out``.
2. Mean test-patch Dice per method, tissue and stain (``results/eval/*/per_patch.csv``), beside
   the slide's stain: a stain the test split of a tissue does not hold cannot show its failure
   in Table 1.

Prints one JSON object (the region, each method's Dice of the tissue inside it, the stain
table)::

    python bench/slide_gap.py results --slide synth_1 --tissue dt [--method omniseg]
        [--compare omniseg multi_unet med3d] [--size 768] [--out slide_gap.png]

Needs a finished default run: ``results/slides/{slide}.tif`` and ``{slide}_truth.h5``, every
compared method's ``results/wsi/{slide}/{method}/labels.h5`` and the evaluation tables. The
slides of ``bench/more_slides.py`` keep their maps elsewhere::

    python bench/slide_gap.py bench_slides --slide synth_5 --tissue tuft
        --labels 'maps/{method}/{slide}/labels.h5' --eval results/eval
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from omniseg.metrics import dice
from omniseg.tissues import TissueTable
from omniseg.wsi.slide import Slide

#: Opacity of a label's colour over the slide.
ALPHA = 0.55


def worst_window(errors: np.ndarray, size: int, step: int) -> tuple[int, int, int]:
    """``(row, col, count)`` of the ``size`` x ``size`` window (moved by ``step``) holding the
    most ``True`` pixels of ``errors`` ``(H, W)`` bool; windows lie inside the image."""
    h, w = errors.shape
    size = min(size, h, w)
    total = np.zeros((h + 1, w + 1), np.int64)
    total[1:, 1:] = errors.cumsum(0, dtype=np.int64).cumsum(1)
    rows = sorted({*range(0, h - size + 1, step), h - size})
    cols = sorted({*range(0, w - size + 1, step), w - size})
    best = (0, 0, -1)
    for r in rows:
        for c in cols:
            n = total[r + size, c + size] - total[r, c + size] - total[r + size, c] + total[r, c]
            if n > best[2]:
                best = (r, c, int(n))
    return best


def paint(
    image: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]]
) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8 with each ``(mask, rgb)`` blended over it, in order."""
    out = image.astype(np.float32)
    for mask, rgb in masks:
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.asarray(rgb, np.float32)
    return out.round().astype(np.uint8)


def region_dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """:func:`omniseg.metrics.dice` (%) of two bool masks, rounded; None when both are empty (the
    tissue is not in the region: nothing to compare, where the metric says 100)."""
    return round(dice(pred, ref), 2) if pred.any() or ref.any() else None


#: Where a method's label map of a slide lies, relative to the results folder.
LABELS = "wsi/{slide}/{method}/labels.h5"


def stain_table(eval_dir: Path) -> dict:
    """``{method: {tissue: {stain: mean test Dice}}}`` from ``eval_dir/*/per_patch.csv``."""
    files = sorted(eval_dir.glob("*/per_patch.csv"))
    if not files:
        raise SystemExit(f"{eval_dir}: no */per_patch.csv (run the evaluation first)")
    df = pd.concat([pd.read_csv(f) for f in files])
    missing = {"method", "tissue", "stain", "dice"} - set(df.columns)
    if missing:
        raise SystemExit(f"{files[0]}: per_patch.csv lacks column(s) {', '.join(sorted(missing))}")
    out: dict = {}
    for (method, tissue, stain), d in df.groupby(["method", "tissue", "stain"]).dice:
        out.setdefault(method, {}).setdefault(tissue, {})[stain] = round(float(d.mean()), 1)
    return out


def run(
    results: Path,
    slide: str,
    tissue: str,
    method: str,
    compare: Sequence[str],
    size: int,
    out: Path,
    labels_at: str = LABELS,
    eval_dir: Path | None = None,
) -> dict:
    """Find, draw and score the worst region (module docstring); returns the report.
    ``labels_at``: where the label maps lie (:data:`LABELS`); ``eval_dir``: the evaluation
    folder (None: ``results/eval``)."""
    slide_file, truth_file = (
        results / "slides" / f"{slide}.tif",
        results / "slides" / f"{slide}_truth.h5",
    )
    label_files = {
        m: results / labels_at.format(slide=slide, method=m)
        for m in dict.fromkeys([method, *compare])
    }
    for f in [slide_file, truth_file, *label_files.values()]:
        if not f.is_file():
            raise SystemExit(
                f"{f}: not found (run the default pipeline first: snakemake --cores all)"
            )
    with h5py.File(label_files[method], "r") as h:
        tissues = TissueTable.from_records(json.loads(h["labels"].attrs["tissues"]))
    if tissue not in tissues:
        raise SystemExit(
            f"--tissue {tissue!r}: not a tissue of {slide}; known: {', '.join(tissues.keys)}"
        )
    labels = {}
    for m, f in label_files.items():
        with h5py.File(f, "r") as h:
            labels[m] = h["labels"][:]
    with h5py.File(truth_file, "r") as h:
        truth = {key: h[key][:] > 0 for key in tissues.keys if key in h}
        stain = h.attrs.get("stain")
    if tissue not in truth:
        raise SystemExit(f"{truth_file}: no ground truth for {tissue!r}")
    ref = truth[tissue]
    if ref.shape != labels[method].shape:
        raise SystemExit(
            f"{label_files[method]}: label map {labels[method].shape} is not the truth's {ref.shape}"
        )
    label = tissues[tissue].label
    errors = (labels[method] == label) != ref
    row, col, n_err = worst_window(errors, size, max(1, size // 3))
    size = min(size, *ref.shape)
    win = np.s_[row : row + size, col : col + size]
    with Slide(slide_file) as s:
        image = s.read_region(col, row, size, size)[..., :3]
    order = sorted(tissues, key=lambda t: t.key != "pt")  # large tubules first, the rest on top
    panels = [image, paint(image, [(truth[t.key][win], t.rgb) for t in order if t.key in truth])]
    panels += [paint(image, [(labels[m][win] == t.label, t.rgb) for t in order]) for m in compare]
    gap = np.full((size, max(4, size // 64), 3), 255, np.uint8)
    strip = [p for panel in panels for p in (panel, gap)][:-1]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strip, axis=1)).save(out)
    return {
        "slide": slide,
        "slide_stain": None if stain is None else str(stain),
        "tissue": tissue,
        "method": method,
        "region": {"row": row, "col": col, "size": size, "errors_px": n_err},
        "panels": ["slide", "truth", *compare],
        "dice_in_region": {m: region_dice(labels[m][win] == label, ref[win]) for m in compare},
        "out": str(out),
        "test_dice_by_stain": stain_table(results / "eval" if eval_dir is None else eval_dir),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="?", default=Path("results"))
    ap.add_argument("--slide", default="synth_0")
    ap.add_argument("--tissue", default="dt")
    ap.add_argument("--method", default="omniseg", help="whose errors pick the region")
    ap.add_argument("--compare", nargs="+", default=["omniseg", "multi_unet", "med3d"])
    ap.add_argument("--size", type=int, default=768, help="region edge, level-0 pixels")
    ap.add_argument("--out", type=Path, default=Path("slide_gap.png"))
    ap.add_argument("--labels", default=LABELS, help="label maps, relative to RESULTS")
    ap.add_argument("--eval", type=Path, default=None, help="default: RESULTS/eval")
    args = ap.parse_args(argv)
    if args.size < 16:
        ap.error(f"--size must be >= 16, got {args.size}")
    report = run(
        args.results, args.slide, args.tissue, args.method, args.compare, args.size, args.out,
        args.labels, args.eval,
    )  # fmt: skip
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
