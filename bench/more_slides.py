"""How much does the slide table owe to its two demo slides? The run's models on more of them.

The demo scores the slide maps on two synthetic H&E slides (``wsi.synthetic``: seeds 1 and 2):
two stain draws, two tissue layouts. This bench generates ``--count`` more slides with the same
generator settings and the next seeds (``synth_2``, ``synth_3``, ...), masks them with the
config's tissue-mask settings, and segments, aggregates and scores them with each ``--methods``
method's trained networks from ``results/models`` exactly as the pipeline does (the config's
``wsi`` tiles and aggregation; ``bench/robustness.py``'s :func:`score_slides`). It prints one
JSON object: per method the Dice after aggregation per tissue and their mean, pooled over the new
slides, and per slide::

    python bench/more_slides.py results [--count 4] [--first N] [--methods omniseg ...]
        [--adapt-norm 2] [--config config/config.yaml] [--out bench_slides] [--threads 2]

``--first 0`` starts at ``synth_0``: the run's own slides are drawn again (the same seeds give
the same slides), so one call scores them with the new ones. ``--adapt-norm N`` overrides the
config's ``wsi.adapt_norm`` (the first N BatchNorm layers re-estimated on each slide).
The slides and their maps stay in ``--out`` (reused when there: a second run only re-scores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from omniseg.steps.slides import mask_slide, synth_slide
from omniseg.tissues import load_tissues
from omniseg.wsi.tables import AVERAGE, slide_table

REPO = Path(__file__).resolve().parents[1]


def _robustness():
    """``bench/robustness.py`` as a module (its :func:`score_slides`)."""
    spec = importlib.util.spec_from_file_location("robustness", REPO / "bench" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_files(results: Path, method: str) -> list[Path]:
    """The trained networks of ``method``: ``models/{method}/*/model.pt`` (one, ``all``, for a
    network on every tissue; one per tissue otherwise)."""
    files = sorted((results / "models" / method).glob("*/model.pt"))
    if not files:
        raise SystemExit(
            f"{results / 'models' / method}: no */model.pt (train it first: snakemake --cores all)"
        )
    return files


def new_slides(wsi: Mapping, tissues_tsv: Path, count: int, first: int, out: Path) -> list[dict]:
    """Generate (or reuse) slides ``synth_{first} .. synth_{first + count - 1}`` with their
    truth and tissue mask, as the pipeline's slide rules make them; entries as
    ``bench/robustness.py``'s ``demo_slides`` returns them."""
    synthetic = {k: v for k, v in wsi["synthetic"].items() if k != "count"}
    found = []
    for index in range(first, first + count):
        name = f"synth_{index}"
        entry = {
            "name": name,
            "slide": out / "slides" / f"{name}.tif",
            "truth": out / "slides" / f"{name}_truth.h5",
            "mask_png": out / "wsi" / name / "tissue_mask.png",
            "mask_json": out / "wsi" / name / "tissue_mask.json",
        }
        if not (entry["slide"].is_file() and entry["truth"].is_file()):
            entry["slide"].parent.mkdir(parents=True, exist_ok=True)
            args = {**synthetic, "seed": synthetic["seed"] + index}
            synth_slide(entry["slide"], tissues_tsv, truth_h5=entry["truth"], **args)
        if not (entry["mask_png"].is_file() and entry["mask_json"].is_file()):
            entry["mask_png"].parent.mkdir(parents=True, exist_ok=True)
            mask_slide(entry["slide"], entry["mask_png"], entry["mask_json"], **wsi["mask"])
        found.append(entry)
    return found


def run(
    results: Path,
    config: Mapping,
    tissues_tsv: Path,
    methods: Sequence[str],
    count: int,
    out: Path,
    threads: int,
    first: int | None = None,
) -> dict:
    """Score every method on ``count`` slides from ``synth_{first}`` (None: the first after
    the run's own; module docstring)."""
    wsi = config["wsi"]
    if wsi.get("slides") != "synthetic":
        raise SystemExit(
            "--config: wsi.slides is not 'synthetic': there is no generator to draw more"
        )
    files = {m: model_files(results, m) for m in methods}  # fail before generating anything
    tissues = load_tissues(tissues_tsv)
    if first is None:
        first = int(wsi["synthetic"].get("count", 0))  # after the run's own slides
    slides = new_slides(wsi, tissues_tsv, count, first, out)
    score_slides = _robustness().score_slides
    report: dict = {"slides": [s["name"] for s in slides], "methods": {}}
    for m in methods:
        maps = out / "maps" / m
        pooled = score_slides(files[m], tissues, wsi, slides, maps, threads, m)
        per_slide = {}
        for s in slides:  # the score table score_slides wrote for each slide alone
            table = slide_table([maps / s["name"] / "scores.csv"], tissues).set_index("tissue")
            per_slide[s["name"]] = round(float(table.loc[AVERAGE, "dice"]), 2)
        report["methods"][m] = {**pooled, "per_slide_mean": per_slide}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="?", default=Path("results"))
    ap.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    ap.add_argument("--tissues", type=Path, default=REPO / "config" / "tissues.tsv")
    ap.add_argument("--methods", nargs="+", default=["omniseg", "multi_unet", "med3d"])
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--first", type=int, help="index of the first slide (default: after the run's)")
    ap.add_argument("--adapt-norm", type=int, help="wsi.adapt_norm for this call")
    ap.add_argument("--out", type=Path, default=Path("bench_slides"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error(f"--count must be >= 1, got {args.count}")
    if args.first is not None and args.first < 0:
        ap.error(f"--first must be >= 0, got {args.first}")
    if args.adapt_norm is not None and args.adapt_norm < 0:
        ap.error(f"--adapt-norm must be >= 0, got {args.adapt_norm}")
    config = yaml.safe_load(args.config.read_text())
    if args.adapt_norm is not None:
        config["wsi"]["adapt_norm"] = args.adapt_norm
    report = run(
        args.results, config, args.tissues, args.methods, args.count, args.out, args.threads,
        args.first,
    )  # fmt: skip
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
