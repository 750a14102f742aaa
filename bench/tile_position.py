"""Does a head's output depend on where the slide's tiles fall? Same objects, two paths.

For every object of a tissue's ground truth on the demo slides (a connected component of the
truth, area-averaged to the tissue's scale), this compares the share of its pixels that the
head claims (probability >= 0.5)

* ``tiled``: in the slide run's own prediction (``results/wsi/{slide}/{method}/prob_{scale}.h5``,
  the tiling the pipeline used: tiles on a fixed grid, blended where they overlap), and
* ``centred``: in one tile of the training patch size centred on the object, read from the
  same slide at the same scale and sent through the same model.

A head whose parameters do not depend on the image (Med3D's, a per-tissue U-Net's) gives about
the same recall both ways; a head generated from each tile's pooled features (Omni-Seg's with
128-px tiles, before each block pooled the training-sized window around it) lost objects that
a tile edge cut. Prints one JSON object: per method, tissue and slide, the
object count and the pixel-weighted recall of both paths, and their ratio::

    python bench/tile_position.py results [--methods omniseg med3d] [--tissues tuft dt ptc]

Needs a finished default run (``results/slides/*_truth.h5``, every method's ``prob_*.h5`` and
models). One thread; a few seconds per method and tissue.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy import ndimage

from omniseg.resample import area_mean
from omniseg.steps.slides import load_tissue_models, scale_key
from omniseg.tissues import load_tissues
from omniseg.wsi.slide import Slide

REPO = Path(__file__).resolve().parents[1]


def object_recall(
    image: np.ndarray, truth: np.ndarray, tiled: np.ndarray, predict, tile: int, min_px: int
) -> dict:
    """Pixel-weighted recall of ``truth``'s objects in ``tiled`` and in tiles centred on each.

    Args:
        image: ``(H, W, 3)`` uint8 slide at the tissue's scale.
        truth: ``(H, W)`` bool truth at that scale.
        tiled: ``(H, W)`` bool prediction of the slide run.
        predict: ``(1, 3, tile, tile)`` float tensor in [0, 1] -> ``(tile, tile)`` bool.
        tile: edge of the centred tile (the training patch size).
        min_px: objects smaller than this are left out.
    """
    h, w = truth.shape
    if h < tile or w < tile:
        raise ValueError(f"slide of {h}x{w} px at this scale is smaller than a {tile} px tile")
    labels, n = ndimage.label(truth)
    total = hit_tiled = hit_centred = 0.0
    count = 0
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[box] == k)  # the object's pixels, within its bounding box
        if len(ys) < min_px:
            continue
        ys, xs = ys + box[0].start, xs + box[1].start
        y0 = min(max(int(ys.mean()) - tile // 2, 0), h - tile)
        x0 = min(max(int(xs.mean()) - tile // 2, 0), w - tile)
        x = torch.from_numpy(np.ascontiguousarray(image[y0 : y0 + tile, x0 : x0 + tile]))
        pred = predict(x.permute(2, 0, 1)[None].float().div_(255.0))
        inside = (ys >= y0) & (ys < y0 + tile) & (xs >= x0) & (xs < x0 + tile)
        total += len(ys)
        hit_tiled += float(tiled[ys, xs].sum())
        # object pixels outside the centred tile count as missed
        hit_centred += float(pred[ys[inside] - y0, xs[inside] - x0].sum())
        count += 1
    if not count:
        return {"objects": 0}
    tiled_r, centred_r = hit_tiled / total, hit_centred / total
    return {
        "objects": count,
        "pixels": int(total),
        "tiled_recall": round(tiled_r, 3),
        "centred_recall": round(centred_r, 3),
        "centred_over_tiled": round(centred_r / tiled_r, 2) if tiled_r else None,
    }


def head_of(models, tissue_id: int):
    """``x`` ``(1, 3, H, W)`` -> ``(H, W)`` bool: ``models``' head of ``tissue_id`` at 0.5."""

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return models.predict_proba(x, [tissue_id])[0, 0].numpy() >= 0.5

    return predict


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("--methods", nargs="+", default=["omniseg", "med3d"])
    p.add_argument("--tissues", nargs="+", default=["dt", "cap", "tuft", "ptc"])
    p.add_argument("--tissue-table", default=str(REPO / "config" / "tissues.tsv"))
    p.add_argument("--min-px", type=int, default=20, help="smallest object (px at its scale)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = load_tissues(args.tissue_table)
    slides = sorted(args.results.glob("slides/*_truth.h5"))
    if not slides:
        p.error(f"no slides with ground truth in {args.results / 'slides'}")
    models = {}  # method -> (its tissue models, training patch size)
    for method in args.methods:
        files = sorted((args.results / "models" / method).glob("*/model.pt"))
        if not files:
            p.error(f"no models of method {method!r} in {args.results / 'models' / method}")
        loaded, metas = load_tissue_models(files, table, "cpu")
        models[method] = (loaded, int(metas[0].get("patch_size") or 128))
    report: dict = {}
    for key in args.tissues:
        tissue = table[key]
        for truth_h5 in slides:  # the slide and its truth read once for every method
            slide = truth_h5.name.removesuffix("_truth.h5")
            with Slide(args.results / "slides" / f"{slide}.tif") as s:
                image = s.read_scaled_whole(tissue.um_per_px)
            with h5py.File(truth_h5) as f:
                truth = area_mean(f[key][:] > 0, *image.shape[:2]) >= 0.5
            for method, (loaded, tile) in models.items():
                prob_h5 = (
                    args.results / "wsi" / slide / method / f"prob_{scale_key(tissue.um_per_px)}.h5"
                )
                with h5py.File(prob_h5) as f:
                    tiled = f[f"prob/{key}"][:] >= 128  # uint8 round(255 p): p >= 0.5
                if tiled.shape != image.shape[:2]:
                    raise ValueError(
                        f"{prob_h5}: {tiled.shape} px, the slide at its scale {image.shape[:2]}"
                    )
                row = object_recall(
                    image, truth, tiled, head_of(loaded, tissue.id), tile, args.min_px
                )
                report.setdefault(method, {}).setdefault(key, {})[slide] = row
                print(json.dumps({"method": method, "tissue": key, "slide": slide, **row}))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
