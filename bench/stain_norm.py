"""Do the slide maps owe their errors to each slide's stain draw? Normalise it and score again.

Each slide of a finished run (and of ``bench/more_slides.py``'s folders) is written twice, at
every level of its pyramid, losslessly (deflate), so both copies are read as the pipeline reads
the original (the same levels, the same resampling):

* ``identity``: the pixels as decoded, unchanged (the control: any difference to the run's own
  slide table comes from the copy, not the colours);
* ``normalised``: each RGB channel's optical density ``-log(I / 255)`` scaled by one factor per
  slide and channel, so that the mean density of the slide's tissue pixels equals the mean over
  the tissue pixels of the run's training ROIs of ``--stain`` (the demo's ``cohort/rois.tsv``
  or your ROI sheet, ``--sheet``, and the run's ``split/patients.tsv``): a per-channel
  Reinhard-style normalisation in optical density, which undoes a stain batch's strength and,
  roughly, its hue, but not a change of the mixture of tissues on the slide.

Tissue pixels: an optical density summed over the channels above
:data:`omniseg.wsi.stain.TISSUE_OD`, as the pipeline's ``wsi.stain_norm`` counts them (which
measures the reference on the training patches instead, and the slide at 1 um/px). Every
``--methods`` method's networks (``results/models``) then segment, aggregate and score both
copies as the pipeline does (``bench/robustness.py``'s :func:`score_slides`). One JSON object:
the reference densities, each slide's densities and factors, and per method and copy the Dice
after aggregation per tissue, pooled over all slides and over each folder's::

    python bench/stain_norm.py results [bench_slides] [--methods omniseg multi_unet med3d]
        [--stain he] [--sheet rois.tsv] [--out bench_stain_norm] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import tifffile
import yaml

from omniseg.tissues import load_tissues
from omniseg.wsi.slide import Slide
from omniseg.wsi.stain import TISSUE_OD, apply_lut, density_sums, gain_lut

REPO = Path(__file__).resolve().parents[1]

#: The two copies of every slide.
VARIANTS = ("identity", "normalised")


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_density(results: Path, stain: str, sheet: Path | None = None) -> np.ndarray:
    """Mean optical density per channel over the tissue pixels of the training ROIs of
    ``stain`` in a finished run: the ROI sheet (``sheet``; None: the demo's generated
    ``cohort/rois.tsv``; images relative to the sheet's folder) and the run's
    ``split/patients.tsv``."""
    rois_tsv = sheet if sheet is not None else results / "cohort" / "rois.tsv"
    split_tsv = results / "split" / "patients.tsv"
    for path in (rois_tsv, split_tsv):
        if not path.is_file():
            raise SystemExit(f"{path}: not found (a finished run has it; --sheet: your ROI sheet)")
    rois = pd.read_csv(rois_tsv, sep="\t").merge(
        pd.read_csv(split_tsv, sep="\t")[["patient", "split"]], on="patient"
    )
    chosen = rois[(rois["stain"] == stain) & (rois["split"] == "train")]
    if chosen.empty:
        have = sorted(rois.loc[rois["split"] == "train", "stain"].unique())
        raise SystemExit(f"{rois_tsv}: no training ROI stained {stain!r} (have {have})")
    total, count = np.zeros(3), 0
    for image in chosen["image"]:
        s, n = density_sums(imagecodecs.imread(rois_tsv.parent / image))
        total, count = total + s, count + n
    if count == 0:
        raise SystemExit(f"{rois_tsv}: the {stain!r} training ROIs show no tissue")
    return total / count


def write_copy(src: Path, dst: Path, gain: np.ndarray | None) -> None:
    """Every level of ``src`` (as :class:`Slide` reads it) into the tiled TIFF ``dst``, deflated,
    with the same pixel sizes; each level through the optical-density ``gain``
    (:func:`omniseg.wsi.stain.gain_lut`) unless it is None."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    lut = None if gain is None else gain_lut(gain)
    with Slide(src) as slide, tifffile.TiffWriter(tmp) as tw:
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            rgb = slide.read_region(0, 0, w, h, level)
            if lut is not None:
                rgb = apply_lut(rgb, lut)
            res = 1e4 / slide.level_mpp(level)  # pixels per centimetre
            tw.write(
                rgb, tile=(256, 256), photometric="rgb", compression="zlib",
                resolution=(res, res), resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1, metadata=None, software=False,
            )  # fmt: skip
    tmp.replace(dst)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(target).resolve())


def make_copies(entries: Sequence[Mapping], reference: np.ndarray, out: Path) -> tuple[dict, dict]:
    """Both copies of every slide under ``out/{variant}`` (kept when there), truth and tissue
    mask linked; returns ``{variant: entries}`` and per slide its densities and gains."""
    copies: dict = {v: [] for v in VARIANTS}
    info = {}
    for e in entries:
        with Slide(e["slide"]) as slide:
            w, h = slide.level_dimensions[0]
            total, count = density_sums(slide.read_region(0, 0, w, h))
        if count == 0:
            raise SystemExit(f"{e['slide']}: no tissue pixels (optical density > {TISSUE_OD})")
        density = total / count
        gain = reference / density
        info[e["name"]] = {"density": density.round(4).tolist(), "gain": gain.round(4).tolist()}
        for variant in VARIANTS:
            root = out / variant
            copy = {
                **e,
                "slide": root / "slides" / f"{e['name']}.tif",
                "truth": root / "slides" / f"{e['name']}_truth.h5",
                "mask_png": root / "wsi" / e["name"] / "tissue_mask.png",
                "mask_json": root / "wsi" / e["name"] / "tissue_mask.json",
            }
            if not copy["slide"].is_file():
                write_copy(e["slide"], copy["slide"], None if variant == "identity" else gain)
            for key in ("truth", "mask_png", "mask_json"):
                _link(e[key], copy[key])
            copies[variant].append(copy)
    return copies, info


def run(
    folders: Sequence[Path],
    config: Mapping,
    tissues_tsv: Path,
    methods: Sequence[str],
    stain: str,
    out: Path,
    threads: int,
    sheet: Path | None = None,
) -> dict:
    """The module docstring's measurement; the reference comes from ``folders[0]``."""
    robustness, more_slides = _bench("robustness"), _bench("more_slides")
    files = {m: more_slides.model_files(folders[0], m) for m in methods}  # fail early
    entries = [e for folder in folders for e in robustness.demo_slides(folder)]
    reference = reference_density(folders[0], stain, sheet)
    copies, info = make_copies(entries, reference, out)
    tissues = load_tissues(tissues_tsv)
    report: dict = {"stain": stain, "reference": reference.round(4).tolist(), "slides": info}
    report["methods"] = {
        m: {
            variant: robustness.score_slides(
                files[m],
                tissues,
                config["wsi"],
                copies[variant],
                out / variant / "maps" / m,
                threads,
                m,
            )  # fmt: skip
            for variant in VARIANTS
        }
        for m in methods
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", type=Path, nargs="*", default=[Path("results")])
    ap.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    ap.add_argument("--tissues", type=Path, default=REPO / "config" / "tissues.tsv")
    ap.add_argument("--methods", nargs="+", default=["omniseg", "multi_unet", "med3d"])
    ap.add_argument("--stain", default="he", help="stain of the slides (training ROIs of it)")
    ap.add_argument(
        "--sheet", type=Path, help="the ROI sheet (default: the demo's cohort/rois.tsv)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench_stain_norm"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    report = run(
        args.folders, config, args.tissues, args.methods, args.stain, args.out, args.threads,
        args.sheet,
    )  # fmt: skip
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
