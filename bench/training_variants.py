"""Short-budget training variants of Omni-Seg, side by side, with the real trainer.

The demo trains for minutes where the paper trains 100 epochs. This compares, on the same patch
sets, steps and optimizer, the paper's single-tissue batches against mixed-tissue batches, and
the controller's default initialisation against the conditioning-first one
(``feature_init_scale=0.1``). Prints one JSON object: per variant, training loss and mean
validation Dice per epoch, the best epoch's Dice per tissue, and seconds::

    python bench/training_variants.py results/patches/*.h5 [--epochs 6] [--steps 40] [--width 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from omniseg.tissues import load_tissues
from omniseg.train import train

#: name -> (batch_mode, feature_init_scale)
VARIANTS = {
    "tissue_batches_default_init": ("tissue", 1.0),
    "mixed_batches_default_init": ("mixed", 1.0),
    "mixed_batches_conditioning_first": ("mixed", 0.1),
}


def run(patch_sets, tissues, variant: str, args: argparse.Namespace, out: Path) -> dict:
    mode, scale = VARIANTS[variant]
    cfg = {
        "model": {"name": "omniseg", "kwargs": {"width": args.width, "feature_init_scale": scale}},
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "batch_mode": mode,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 1e-4,
        "augment": {"p_geometric": args.augment, "p_color": args.augment, "p_noise": args.augment},
        "seed": args.seed,
    }
    t0 = time.perf_counter()
    summary = train(
        patch_sets, tissues, cfg, model_out=out / "model.pt", log_csv=out / "log.csv",
        curve_png=out / "curve.png", state_dir=out / "state", threads=args.threads,
        progress=False,
    )  # fmt: skip
    log = pd.read_csv(out / "log.csv")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "loss": [round(v, 4) for v in log["loss"]],
        "val_dice_mean": [round(v, 2) for v in log["val_dice_mean"]],
        "best_val_dice": {k: round(v, 2) for k, v in summary["val_dice"].items()},
        "best_val_dice_mean": round(summary["val_dice_mean"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patch_sets", nargs="+")
    p.add_argument("--tissues", default="config/tissues.tsv")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--augment", type=float, default=0.2, help="p of each augmentation group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    tissues = load_tissues(args.tissues)
    report: dict = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            report[name] = run(args.patch_sets, tissues, name, args, Path(tmp) / name)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
