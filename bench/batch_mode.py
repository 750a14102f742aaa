"""Single-tissue batches (the paper) against mixed-tissue batches on a short training budget.

Trains Omni-Seg twice with the real trainer on the same patch sets, steps and optimizer, changing
only ``batch_mode``, and prints one JSON object: training loss and mean validation Dice per
epoch for each mode. This is the measurement behind the demo config's ``batch_mode: mixed``::

    python bench/batch_mode.py results/patches/*.h5 [--epochs 6] [--steps 40] [--width 16]
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


def run(patch_sets, tissues, mode: str, args: argparse.Namespace, out: Path) -> dict:
    cfg = {
        "model": {"name": "omniseg", "kwargs": {"width": args.width}},
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "batch_mode": mode,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": 0.9,
        "nesterov": False,
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    tissues = load_tissues(args.tissues)
    report = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("tissue", "mixed"):
            report[mode] = run(args.patch_sets, tissues, mode, args, Path(tmp) / mode)
    report["final_val_dice_ratio_mixed_over_tissue"] = round(
        report["mixed"]["val_dice_mean"][-1] / max(report["tissue"]["val_dice_mean"][-1], 1e-9), 2
    )
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
