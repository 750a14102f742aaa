"""Does weighting the boundary ring keep a head off the interstitium? One tissue, several weights.

The cross-entropy of the training loss weighs the ring of ``ring_width`` pixels just outside each
object by ``loss.boundary_weight`` (the paper: 1.2). Between touching tubules that ring is the
interstitium, the gap a head fills with its label on a slide. This bench trains one tissue's
network of a per-tissue method (Multi U-Net by default; one network, so each weight costs
seconds) with the default config at each ``--weights`` value, otherwise unchanged, and scores:

* the test patches (Dice per patch, averaged; and over all test pixels pooled);
* the demo slides with ground truth, each downscaled to the tissue's scale and sent through the
  network in one piece (the same pixels for every weight; no tiling, no aggregation): the raw
  head's Dice over both slides pooled, and the share of its foreground that the truth does not
  hold.

Prints one JSON object, one entry per weight::

    python bench/boundary_weight.py [--results results] [--tissue pt] [--weights 1.2 3 10]
        [--method multi_unet] [--seed 0] [--threads 1]

It needs a finished default run (``results/patches``, ``results/slides``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from omniseg.checkpoint import load_model
from omniseg.data.patches import downscale_image, scale_factor
from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch, dice_from_counts
from omniseg.steps.rois import method_training_config
from omniseg.tissues import load_tissues
from omniseg.train import train
from omniseg.wsi.slide import Slide

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def _foreground(model: torch.nn.Module, images: np.ndarray, tissue_id: int) -> np.ndarray:
    """``images`` ``(N, H, W, 3)`` uint8 -> ``(N, H, W)`` bool, the head's p > 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return model.predict_proba(x, [tissue_id])[:, 0].numpy() > 0.5


def slide_pairs(results: Path, key: str, um_per_px: float, multiple: int):
    """Yield ``(image, truth)`` of each demo slide at the tissue's scale (read as the slide path
    reads it), cropped to a multiple of the network's size step; a pixel's truth is more than
    half of the level-0 pixels under it (a tight head loses more where half counts)."""
    for truth_path in sorted((results / "slides").glob("*_truth.h5")):
        with h5py.File(truth_path, "r") as h5:
            slide_path = results / "slides" / str(h5.attrs["slide"])
            truth = h5[key][:] > 0
            factor = scale_factor(float(h5.attrs["mpp"]), um_per_px)
        with Slide(slide_path) as slide:
            image = slide.read_scaled_whole(um_per_px)
        mask = downscale_image(truth.astype(np.uint8) * 255, factor) > 128  # over half
        h = min(image.shape[0], mask.shape[0]) // multiple * multiple
        w = min(image.shape[1], mask.shape[1]) // multiple * multiple
        yield image[:h, :w], mask[:h, :w]


def run(args: argparse.Namespace) -> dict:
    results = Path(args.results)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    tissues = load_tissues(REPO / "config" / "tissues.tsv")
    tissue = tissues[args.tissue]
    sets = sorted(str(p) for p in (results / "patches").glob("*.h5"))
    test = read_patch_set(results / "patches" / f"{args.tissue}.h5", split="test")
    test_truth = test["masks"] > 0
    report: dict = {"method": args.method, "tissue": args.tissue, "seed": args.seed, "runs": []}
    for weight in args.weights:
        cfg = method_training_config(config, args.method, args.tissue, len(tissues))
        cfg["seed"] = args.seed
        cfg["loss"] = {**cfg.get("loss", {}), "boundary_weight": float(weight)}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            train(sets, tissues, cfg, model_out=out / "model.pt", log_csv=out / "log.csv",
                  curve_png=out / "curve.png", state_dir=out / "state", method=args.method,
                  select=[args.tissue], threads=args.threads, progress=False)  # fmt: skip
            model, _ = load_model(out / "model.pt", tissues)
        pred = _foreground(model, test["images"], tissue.id)
        tp = fp = fn = 0
        multiple = int(getattr(model, "size_multiple", 1) or 1)
        for image, truth in slide_pairs(results, args.tissue, tissue.um_per_px, multiple):
            p = _foreground(model, image[None], tissue.id)[0]
            tp += int((p & truth).sum())
            fp += int((p & ~truth).sum())
            fn += int((~p & truth).sum())
        report["runs"].append({
            "boundary_weight": float(weight),
            "test_dice": round(float(dice_batch(pred, test_truth).mean()), 2),
            "test_dice_pooled": round(float(dice_batch(pred[None], test_truth[None])[0]), 2),
            "slide_raw_dice": round(dice_from_counts(tp, fp, fn), 2),
            "slide_false_positive_share": round(fp / max(tp + fp, 1), 3),
        })  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results")
    p.add_argument("--tissue", default="pt")
    p.add_argument("--weights", type=float, nargs="+", default=[1.2, 3.0, 10.0])
    p.add_argument("--method", default="multi_unet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    print(json.dumps(run(p.parse_args(argv)), indent=1))


if __name__ == "__main__":
    main()
