"""Is the default Omni-Seg training robust? Seeds x CPU threads, per-tissue test Dice.

Floating-point order changes with the thread count, and a short schedule can land on either
side of a tipping point (distal vs proximal tubules separating or not). This trains the default
config's Omni-Seg (``config/config.yaml``, method ``omniseg``) on the demo patch sets for every
seed x thread count, with the project's own ``train`` and ``evaluate``, and prints one JSON
object: per run the per-tissue test Dice (%), the count of false-positive patches on empty masks,
and seconds; then the minimum Dice per tissue over the runs::

    python bench/robustness.py results/patches/*.h5 [--seeds 0 1] [--threads 1 2]

``--select ves`` (or ``dt,pt,ves``) trains the same network on those tissues only, with the
steps per epoch scaled to their share (the same samples per tissue as the full run), and scores
those tissues: it isolates what training several tissues in one network costs one of them.

The arithmetic follows ``OMNISEG_PRECISION`` (unset: bfloat16 on a CPU with AMX or AVX-512
BF16, like the pipeline; ``OMNISEG_PRECISION=float32`` for float32). Run it with the cores to
itself: it is a measurement of training outcomes, and (as a side figure) of time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from omniseg.steps.rois import evaluate_method, method_training_config
from omniseg.tissues import load_tissues
from omniseg.train import train

REPO = Path(__file__).resolve().parents[1]


def run(
    patch_sets,
    tissues,
    cfg: dict,
    seed: int,
    threads: int,
    out: Path,
    method: str,
    select: list[str] | None = None,
) -> dict:
    cfg = {**cfg, "seed": seed}
    t0 = time.perf_counter()
    train(
        patch_sets, tissues, cfg, model_out=out / "all" / "model.pt", log_csv=out / "log.csv",
        curve_png=out / "curve.png", state_dir=out / "state", method=method, threads=threads,
        select=select, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    evaluate_method(
        [out / "all" / "model.pt"], patch_sets, tissues, method=method, out_dir=out / "eval"
    )
    summary = pd.read_csv(out / "eval" / "summary.csv").set_index("tissue")
    tissues_ = [k for k in summary.index if k != "average" and (not select or k in select)]
    summary = summary.loc[tissues_]
    return {
        "seed": seed,
        "threads": threads,
        "train_seconds": round(seconds, 1),
        "test_dice": {k: round(float(v), 2) for k, v in summary["dice_pct"].items()},
        "test_dice_mean": round(float(summary["dice_pct"].mean()), 2),
        "test_dice_nonempty": {
            k: round(float(v), 2) for k, v in summary["dice_nonempty_pct"].items()
        },
        "false_positive_patches_on_empty_masks": {
            k: f"{int(summary.loc[k, 'n_fp_empty'])}/{int(summary.loc[k, 'n_empty_mask'])}"
            for k in tissues_
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("patch_sets", nargs="+")
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--tissues", default=str(REPO / "config" / "tissues.tsv"))
    p.add_argument("--method", default="omniseg")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--select",
        default=None,
        help="comma-separated tissue keys: train and score these only (default: all)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=YAML",
        help="training overrides, dotted keys: loss.kind=authors lr=0.004",
    )
    args = p.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    tissues = load_tissues(args.tissues)
    cfg = method_training_config(config, args.method, "all", len(tissues))
    select = None
    if args.select:
        select = [k.strip() for k in args.select.split(",") if k.strip()]
        unknown = [k for k in select if k not in tissues]
        if unknown:
            p.error(f"--select: unknown tissue(s) {unknown}; known: {', '.join(tissues.keys)}")
        # the same samples per tissue as a run on every tissue
        cfg["steps_per_epoch"] = max(1, -(-cfg["steps_per_epoch"] * len(select) // len(tissues)))
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    report: dict = {"config": vars(args), "training": cfg, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                out = Path(tmp) / f"s{seed}_t{threads}"
                report["runs"].append(
                    run(args.patch_sets, tissues, cfg, seed, threads, out, args.method, select)
                )
                print(json.dumps(report["runs"][-1]), flush=True)
    keys = list(report["runs"][0]["test_dice"])
    report["min_test_dice"] = {k: min(r["test_dice"][k] for r in report["runs"]) for k in keys}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
