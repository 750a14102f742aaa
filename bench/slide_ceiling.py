"""How high can Dice after aggregation go when each tissue is segmented at its own scale?

A perfect head at a coarse scale still loses what its pixels cannot hold: the capsule ring of a
glomerulus (Bowman's capsule and space, 5-15 um) is 2-7 pixels wide at 5x (2 um/px). This
bench feeds each slide's ground truth, area-averaged down to every tissue's scale
(``tissues.tsv``: its ``um_per_px``), as probability maps in the format the slide rules write
(``prob_{scale}.h5``), through the pipeline's own aggregation and scoring (same rules,
threshold, tissue mask and margin as the run in ``results``). The Dice after aggregation it
prints is the ceiling of any model predicting at those scales; ``--scale level0`` runs every
tissue at the slide's level 0 instead (the check of the path itself: ~100 except what the
tissue mask cuts).

Prints one JSON object: per slide and pooled over the slides, per tissue the ceiling Dice (%)
after aggregation and the floors of ``bench/demo_checks.py``::

    python bench/slide_ceiling.py results [--scale tissue|level0] [--config config/config.yaml]

Needs a finished default run (``results/slides/*_truth.h5``, ``results/wsi/{slide}/tissue_mask.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

from omniseg.steps.slides import aggregate_slide, scale_key, score_slide
from omniseg.tissues import load_tissues

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from demo_checks import SLIDE_FLOORS  # noqa: E402


def area_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``mask`` over ``factor x factor`` blocks (edge blocks padded with 0, as the slide
    grid is padded), float32 in 0..1."""
    h, w = mask.shape
    hs, ws = math.ceil(h / factor), math.ceil(w / factor)
    pad = np.zeros((hs * factor, ws * factor), np.float32)
    pad[:h, :w] = mask
    return pad.reshape(hs, factor, ws, factor).mean(axis=(1, 3))


def write_truth_probs(truth_h5: Path, tissues, out_dir: Path, level0: bool) -> list[Path]:
    """One ``prob_{scale}.h5`` per scale from the truth masks (uint8 ``round(255 p)``)."""
    paths = []
    with h5py.File(truth_h5, "r") as tf:
        mpp = float(tf.attrs["mpp"])
        for um in tissues.scales:
            factor = 1 if level0 else round(um / mpp)
            if not level0 and not math.isclose(factor * mpp, um):
                raise ValueError(f"{truth_h5}: scale {um} um/px is not a whole multiple of {mpp}")
            path = out_dir / f"prob_{scale_key(um)}.h5"
            with h5py.File(path, "w") as fh:
                keys = [t.key for t in tissues.at_scale(um)]
                shape0 = tf[keys[0]].shape
                fh.attrs.update(factor=float(factor), level0_shape=np.asarray(shape0), mpp=mpp)
                for key in keys:
                    p = area_mean(tf[key][:] > 0, factor)
                    fh.create_dataset(f"prob/{key}", data=np.round(255 * p).astype(np.uint8))
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--scale", choices=["tissue", "level0"], default="tissue")
    args = p.parse_args(argv)
    results = Path(args.results)
    config = yaml.safe_load(Path(args.config).read_text())
    tissues = load_tissues(REPO / config["tissues"] if not Path(config["tissues"]).is_absolute()
                           else config["tissues"])  # fmt: skip
    agg = config["wsi"]["aggregation"]
    rules = {"nested": agg["nested"], "conflict": agg["conflict"]}
    truths = sorted((results / "slides").glob("*_truth.h5"))
    if not truths:
        p.error(f"no slide truth (*_truth.h5) under {results / 'slides'}: run the pipeline first")
    counts = {t.key: np.zeros(3, np.int64) for t in tissues}  # tp, pred px, ref px
    report: dict = {"scale": args.scale, "rules": rules, "slides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for truth in truths:
            slide = truth.name.removesuffix("_truth.h5")
            wsi = results / "wsi" / slide
            work = Path(tmp) / slide
            work.mkdir()
            probs = write_truth_probs(truth, tissues, work, args.scale == "level0")
            labels = aggregate_slide(
                probs, wsi / "tissue_mask.json", tissues, work / "labels.h5",
                mask_png=wsi / "tissue_mask.png", rules=rules,
                threshold=float(agg["threshold"]), mask_margin_um=float(agg["mask_margin_um"]),
            )  # fmt: skip
            df = score_slide(
                labels, truth, tissues, work / "scores.csv", rules=rules, prob_h5s=probs,
                mask_png=wsi / "tissue_mask.png", mask_json=wsi / "tissue_mask.json",
                threshold=float(agg["threshold"]), method="truth", slide=slide,
            )  # fmt: skip
            report["slides"][slide] = {r.tissue: round(float(r.dice), 2) for r in df.itertuples()}
            for r in df.itertuples():
                counts[r.tissue] += [int(r.tp), int(r.pred_px), int(r.ref_px)]
    pooled = {}
    for key, (tp, pred, ref) in counts.items():
        dice = 100.0 if pred + ref == 0 else 200.0 * tp / (pred + ref)
        floor = SLIDE_FLOORS.get(key)
        pooled[key] = {"ceiling_dice": round(dice, 2), "floor": floor,
                       "floor_reachable": None if floor is None else bool(dice >= floor)}  # fmt: skip
    report["pooled"] = pooled
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
