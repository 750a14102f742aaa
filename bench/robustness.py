"""Is the default Omni-Seg training robust? Seeds x CPU threads, per-tissue test Dice (and slides).

Floating-point order changes with the thread count, and a short schedule can land on either
side of a tipping point (distal vs proximal tubules separating or not). This trains the default
config's Omni-Seg (``config/config.yaml``, method ``omniseg``) on the demo patch sets for every
seed x thread count, with the project's own ``train`` and ``evaluate``, and prints one JSON
object: per run the per-tissue test Dice (%), the count of false-positive patches on empty masks,
and seconds; then the minimum Dice per tissue over the runs::

    python bench/robustness.py results/patches/*.h5 [--seeds 0 1] [--threads 1 2]
        [--method med3d] [--slides results] [--set lr=0.0015 model.kwargs.width=24]

``--method``: any configured method; one that trains a network per tissue (``per_tissue``,
Multi U-Net, Multi DeepLabV3) trains one per tissue, each with its own settings, as the
pipeline does. ``--set KEY=YAML``: training overrides, dotted keys (``loss.boundary_weight=3``;
``model.kwargs.width=24`` changes the network).

``--slides results``: a finished default run. Each run's networks then segment every demo slide
with ground truth there (``slides/<slide>.tif`` and ``<slide>_truth.h5``, the tissue mask in
``wsi/<slide>/``) with the config's ``wsi`` tiles and aggregation, as the pipeline's
``wsi_predict``, ``wsi_aggregate`` and ``wsi_score`` do, and the run reports the Dice (%) after
aggregation per tissue, pixels pooled over the slides (the slide table's rows): a seed's Table 1
mean does not predict its slide mean. More folders add their slides (``--slides results
bench_slides``: the demo pair and ``bench/more_slides.py``'s), pooled with them; each run then
also reports every folder's own mean (``slide_mean_by_folder``: the demo pair apart).
``--keep DIR`` keeps each run's models, logs and slide maps under ``DIR/s{seed}_t{threads}``.

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
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import yaml

from omniseg.steps.rois import evaluate_method, method_training_config
from omniseg.steps.slides import (
    MASK_MARGIN_UM,
    aggregate_slide,
    predict_slide,
    scale_keys,
    score_slide,
)
from omniseg.tissues import TissueTable, load_tissues
from omniseg.train import train
from omniseg.wsi.tables import AVERAGE, slide_table

REPO = Path(__file__).resolve().parents[1]


def apply_overrides(cfg: dict, items: Sequence[str]) -> dict:
    """``KEY=YAML`` items (dotted keys) set into ``cfg``, in place; returns it."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=YAML, e.g. lr=0.0015")
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return cfg


def network_configs(
    config: Mapping,
    method: str,
    tissues: TissueTable,
    overrides: Sequence[str] = (),
    select: Sequence[str] | None = None,
) -> dict[str, dict]:
    """The training settings of each network ``method`` trains, by scope: ``{"all": ...}``, or
    one per tissue for a method with ``per_tissue: true`` (``select``: those tissues only), each
    with ``overrides`` applied (:func:`apply_overrides`)."""
    n = len(tissues)
    if config["methods"][method].get("per_tissue", False):
        scopes = list(select or tissues.keys)
    else:
        scopes = ["all"]
    configs = {}
    for scope in scopes:
        cfg = method_training_config(config, method, scope, n)
        if scope == "all" and select:  # the same samples per tissue as a run on every tissue
            cfg["steps_per_epoch"] = max(1, -(-cfg["steps_per_epoch"] * len(select) // n))
        configs[scope] = apply_overrides(cfg, overrides)
    return configs


def demo_slides(results: Path) -> list[dict]:
    """The slides of a finished run that have ground truth: ``slides/<name>.tif`` beside
    ``slides/<name>_truth.h5``, with the run's tissue mask in ``wsi/<name>/``."""
    found = []
    for truth in sorted((results / "slides").glob("*_truth.h5")):
        name = truth.name.removesuffix("_truth.h5")
        entry = {
            "name": name,
            "folder": str(results),
            "slide": results / "slides" / f"{name}.tif",
            "truth": truth,
            "mask_png": results / "wsi" / name / "tissue_mask.png",
            "mask_json": results / "wsi" / name / "tissue_mask.json",
        }
        missing = [
            str(p)
            for k, p in entry.items()
            if k not in ("name", "folder") and not Path(p).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"--slides {results}: slide {name} lacks {', '.join(missing)} "
                "(run the default pipeline first: snakemake --cores all)"
            )
        found.append(entry)
    if not found:
        raise FileNotFoundError(
            f"--slides {results}: no slides/*_truth.h5 there (run the default pipeline first: "
            "snakemake --cores all)"
        )
    return found


def score_slides(
    models: Sequence[Path],
    tissues: TissueTable,
    wsi: Mapping,
    slides: Sequence[Mapping],
    out: Path,
    threads: int,
    method: str = "bench",
) -> dict:
    """Segment, aggregate and score ``slides`` (:func:`demo_slides`) with ``models`` as the
    pipeline does with the config's ``wsi`` settings; per-tissue Dice (%) after aggregation,
    pixel counts pooled over the slides as the slide table pools them, and its mean; with slides
    of more than one folder, also the mean of each folder's slides (``slide_mean_by_folder``: the
    demo pair of a run's ``results`` apart from ``bench/more_slides.py``'s)."""
    agg = wsi.get("aggregation") or {}
    rules = {"nested": agg.get("nested", []), "conflict": agg.get("conflict", "max")}
    threshold = agg.get("threshold", 0.5)
    score_csvs, by_folder = [], {}
    for s in slides:
        o = out / s["name"]
        probs = [
            predict_slide(
                models,
                s["slide"],
                s["mask_png"],
                s["mask_json"],
                tissues,
                key,
                o / f"prob_{key}.h5",
                tile=wsi.get("tile"),
                overlap=wsi.get("overlap"),
                batch_size=wsi.get("batch_size", 16),
                threads=threads,
                adapt_norm=wsi.get("adapt_norm", 0),
                progress=False,
            )
            for key in scale_keys(tissues)
        ]
        aggregate_slide(
            probs, s["mask_json"], tissues, o / "labels.h5", mask_png=s["mask_png"], rules=rules,
            threshold=threshold, mask_margin_um=agg.get("mask_margin_um", MASK_MARGIN_UM),
        )  # fmt: skip
        score_slide(
            o / "labels.h5",
            s["truth"],
            tissues,
            o / "scores.csv",
            rules=rules,
            mask_png=s["mask_png"],
            mask_json=s["mask_json"],
            threshold=threshold,
            method=method,
        )
        score_csvs.append(o / "scores.csv")
        by_folder.setdefault(s.get("folder", ""), []).append(o / "scores.csv")
    table = slide_table(score_csvs, tissues).set_index("tissue")
    dice = {k: round(float(table.loc[k, "dice"]), 2) for k in tissues.keys if k in table.index}
    record = {"slide_dice": dice, "slide_mean": round(float(table.loc[AVERAGE, "dice"]), 2)}
    if len(by_folder) > 1:
        record["slide_mean_by_folder"] = {
            folder: round(
                float(slide_table(csvs, tissues).set_index("tissue").loc[AVERAGE, "dice"]), 2
            )
            for folder, csvs in by_folder.items()
        }
    return record


def run(
    patch_sets,
    tissues,
    configs: Mapping[str, dict],
    seed: int,
    threads: int,
    out: Path,
    method: str,
    select: list[str] | None = None,
    slides: tuple[Mapping, Sequence[Mapping]] | None = None,
) -> dict:
    """Train the networks of ``configs`` (:func:`network_configs`) at ``seed``, score the test
    patches and, with ``slides`` (``(wsi settings, demo_slides(...))``), the slides."""
    t0 = time.perf_counter()
    models = []
    for scope, cfg in configs.items():
        model = out / scope / "model.pt"
        train(
            patch_sets, tissues, {**cfg, "seed": seed}, model_out=model,
            log_csv=out / scope / "log.csv", curve_png=out / scope / "curve.png",
            state_dir=out / scope / "state", method=method, threads=threads,
            select=select if scope == "all" else [scope], progress=False,
        )  # fmt: skip
        models.append(model)
    seconds = time.perf_counter() - t0
    evaluate_method(models, patch_sets, tissues, method=method, out_dir=out / "eval")
    summary = pd.read_csv(out / "eval" / "summary.csv").set_index("tissue")
    tissues_ = [k for k in summary.index if k != "average" and (not select or k in select)]
    summary = summary.loc[tissues_]
    record = {
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
    if slides is not None:
        wsi, entries = slides
        record.update(score_slides(models, tissues, wsi, entries, out / "slides", threads, method))
    return record


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
        help="training overrides, dotted keys: loss.kind=authors lr=0.004 model.kwargs.width=24",
    )
    p.add_argument(
        "--slides",
        nargs="+",
        default=None,
        metavar="RESULTS",
        help="a finished default run's results folder: score its demo slides too (more "
        "folders: their slides too, e.g. bench/more_slides.py's --out)",
    )
    p.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="write every run (models, logs, evaluation, slide maps) under DIR/s{seed}_t{threads} "
        "and keep it (default: a temporary folder, removed at the end)",
    )
    args = p.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    tissues = load_tissues(args.tissues)
    if args.method not in config.get("methods", {}):
        p.error(
            f"--method {args.method}: not in {args.config} (have {', '.join(config['methods'])})"
        )
    select = None
    if args.select:
        select = [k.strip() for k in args.select.split(",") if k.strip()]
        unknown = [k for k in select if k not in tissues]
        if unknown:
            p.error(f"--select: unknown tissue(s) {unknown}; known: {', '.join(tissues.keys)}")
        if args.slides:
            p.error("--slides scores every tissue of a slide: leave out --select")
    try:
        configs = network_configs(config, args.method, tissues, args.set, select)
        slides = None
        if args.slides:
            entries = [e for folder in args.slides for e in demo_slides(Path(folder))]
            names = [e["name"] for e in entries]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"--slides: slide(s) {', '.join(twice)} in more than one folder")
            slides = (config.get("wsi") or {}, entries)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    report: dict = {"config": vars(args), "training": configs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for seed in args.seeds:
            for threads in args.threads:
                out = root / f"s{seed}_t{threads}"
                report["runs"].append(
                    run(
                        args.patch_sets,
                        tissues,
                        configs,
                        seed,
                        threads,
                        out,
                        args.method,
                        select,
                        slides,
                    )
                )
                print(json.dumps(report["runs"][-1]), flush=True)
    runs = report["runs"]
    keys = list(runs[0]["test_dice"])
    report["min_test_dice"] = {k: min(r["test_dice"][k] for r in runs) for k in keys}
    report["mean_test_dice_mean"] = round(sum(r["test_dice_mean"] for r in runs) / len(runs), 2)
    if slides is not None:
        report["mean_slide_mean"] = round(sum(r["slide_mean"] for r in runs) / len(runs), 2)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
