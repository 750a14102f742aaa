"""The ``omniseg`` command: one subcommand per pipeline step.

Each subcommand calls the same :mod:`omniseg.steps` function as the matching Snakemake rule,
so ``omniseg patches ...`` by hand and ``snakemake patches`` do the same work.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from omniseg import __version__
from omniseg.steps import rois, setup_logging

SPLIT_KEYS = ("train", "val", "test")


def _split_fractions(text: str) -> dict[str, float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected train:val:test such as 6:1:3, got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from None
    total = sum(values)
    if total <= 0 or min(values) < 0:
        raise argparse.ArgumentTypeError(f"fractions must be >= 0 with a positive sum: {text!r}")
    return {k: v / total for k, v in zip(SPLIT_KEYS, values, strict=True)}


def _split_counts(text: str) -> dict[str, int]:
    parts = text.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected train:val:test counts such as 160:24:48, got {text!r}"
        )
    return {k: int(p) for k, p in zip(SPLIT_KEYS, parts, strict=True)}


def _load_yaml(path: str) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise SystemExit(f"omniseg: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"omniseg: {path} must hold a YAML mapping")
    return data


def _n_tissues(path: str) -> int:
    from omniseg.tissues import load_tissues

    return len(load_tissues(path))


def _opt(parser: argparse.ArgumentParser, step, name: str, **kwargs) -> argparse.Action:
    """Add ``--name`` (underscores as dashes) for keyword ``name`` of the step function ``step``,
    its default read from the step's signature: a default is declared once, in the step."""
    param = inspect.signature(step).parameters[name]
    if param.default is inspect.Parameter.empty:
        raise TypeError(f"{step.__qualname__}() has no default for {name!r}")
    default = list(param.default) if kwargs.get("nargs") else param.default
    action = parser.add_argument(
        "--" + name.replace("_", "-"), dest=name, default=default, **kwargs
    )
    action.step_param = (step, name)  # read by tests/test_cli.py
    parser.set_defaults(step_options=[*(parser.get_default("step_options") or []), name])
    return action


def _opts(args: argparse.Namespace) -> dict:
    """The parsed values of a command's step options (those added with :func:`_opt`)."""
    return {name: getattr(args, name) for name in getattr(args, "step_options", None) or []}


def _synthesize_cohort():
    from omniseg.synthetic.cohort import synthesize_cohort

    return synthesize_cohort


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omniseg",
        description="Omni-Seg multi-tissue kidney pathology segmentation, step by step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"omniseg {__version__}")
    p.add_argument("--log", metavar="FILE", help="write the log (and progress bars) to FILE")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help,
            description=help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sp.add_argument(
            "--tissues",
            default=None,
            help="tissue registry TSV (default: the paper's six tissues, shipped with omniseg "
            "and identical to config/tissues.tsv)",
        )
        return sp

    _add_data_commands(add)
    _add_model_commands(add)
    _add_wsi_commands(add)
    return p


def _add_data_commands(add) -> None:
    s = add("synth", "generate the synthetic renal cohort (40x ROIs, partial masks, full truth)")
    s.add_argument("outdir", help="output folder; the sample sheet is OUTDIR/rois.tsv")
    cohort = _synthesize_cohort()
    _opt(s, cohort, "seed", type=int, help="random seed of the cohort")
    _opt(s, cohort, "patients", type=int, help="number of synthetic patients")
    _opt(s, cohort, "rois_per_tissue", type=int, help="ROIs per patient, stain and tissue")
    _opt(s, cohort, "roi_size", type=int, help="ROI side in 40x pixels")
    _opt(s, cohort, "stains", nargs="+", help="stains to render")
    _opt(s, cohort, "edge_fraction", type=float, help="share of ROIs crossed by the tissue's edge")
    _opt(s, cohort, "threads", type=int, help="worker processes")

    s = add("split", "patient-level train/val/test split of a sample sheet")
    s.add_argument("sheet", help="sample sheet of 40x ROIs (TSV, see resources/README.md)")
    s.add_argument("out", help="patient split table (TSV: patient, split, rois)")
    _opt(s, rois.split_patients, "fractions", type=_split_fractions, help="train:val:test")
    _opt(s, rois.split_patients, "seed", type=int, help="random seed of the split")

    s = add("patches", "scale one tissue's ROIs to its magnification and crop an HDF5 patch set")
    s.add_argument("sheet", help="sample sheet of 40x ROIs (TSV, see resources/README.md)")
    s.add_argument("splits", help="patient split table from `omniseg split`")
    s.add_argument("tissue", help="tissue key (a key of the tissue registry)")
    s.add_argument("out", help="output patch set, e.g. results/patches/tuft.h5")
    extract = rois.extract_tissue
    _opt(s, extract, "size", type=int, help="patch side in pixels at the tissue's scale")
    _opt(s, extract, "counts", type=_split_counts, help="patches per split: train:val:test")
    _opt(s, extract, "object_fraction", type=float, help="share of crops centred on objects")
    _opt(s, extract, "absent_fraction", type=float, help="share of crops without the tissue")
    _opt(s, extract, "seed", type=int, help="random seed of the crops")

    s = add("import-release", "import the public Omni-Seg release folder layout as patch sets")
    s.add_argument("src", help="release folder (e.g. KI_data_testingset_demo or its parent)")
    s.add_argument("outdir", help="writes OUTDIR/{tissue}.h5")
    _opt(s, rois.import_release, "fractions", type=_split_fractions, help="train:val:test")
    _opt(s, rois.import_release, "seed", type=int, help="random seed of the split")
    s.add_argument("--data-list", help="the release's data_list.csv, when present")


def _add_model_commands(add) -> None:
    s = add("train", "train one network on HDF5 patch sets")
    s.add_argument("patch_sets", nargs="+", help="HDF5 patch sets (omniseg patches)")
    s.add_argument(
        "--config", default="config/config.yaml", help="workflow config (training + methods)"
    )
    s.add_argument("--method", default="omniseg", help="a method of the config's `methods`")
    _opt(s, rois.train_model, "scope", help="'all', or one tissue key (per-tissue networks)")
    s.add_argument("--out", required=True, help="output folder: model.pt, log.csv, curve.png")
    s.add_argument("--state-dir", help="resume state (default: OUT/.state)")
    _opt(s, rois.train_model, "device", help="auto, cpu, cuda, cuda:N")
    _opt(s, rois.train_model, "threads", type=int, help="CPU threads of torch")

    s = add("evaluate", "score a method on the test split (Dice %%, HD and MSD in um)")
    s.add_argument("--models", nargs="+", required=True, help="model.pt file(s)")
    s.add_argument(
        "--patch-sets", nargs="+", required=True, help="HDF5 patch sets (omniseg patches)"
    )
    s.add_argument("--method", default="omniseg", help="method name written in the tables")
    s.add_argument("--out", required=True, help="output folder")
    _opt(s, rois.evaluate_method, "split", choices=SPLIT_KEYS, help="split to score")
    _opt(s, rois.evaluate_method, "device", help="auto, cpu, cuda, cuda:N")
    _opt(s, rois.evaluate_method, "batch_size", type=int, help="patches per forward pass")
    _opt(s, rois.evaluate_method, "threads", type=int, help="CPU threads of torch")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    try:
        result = _run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"omniseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _run(args: argparse.Namespace):
    cmd, opts = args.command, _opts(args)
    if cmd == "synth":
        return {"sheet": rois.synth_cohort(Path(args.outdir) / "rois.tsv", args.tissues, **opts)}
    if cmd == "split":
        table = rois.split_patients(args.sheet, args.tissues, args.out, **opts)
        return table.groupby("split")["patient"].size().to_dict()
    if cmd == "patches":
        out = rois.extract_tissue(
            args.sheet, args.splits, args.tissues, args.tissue, args.out, **opts
        )
        return {"patch_set": out}
    if cmd == "import-release":
        return rois.import_release(
            args.src, args.outdir, args.tissues, data_list=args.data_list, **opts
        )
    if cmd == "train":
        out = Path(args.out)
        training = rois.method_training_config(
            _load_yaml(args.config), args.method, args.scope, _n_tissues(args.tissues)
        )
        return rois.train_model(
            args.patch_sets,
            args.tissues,
            training,
            model_out=out / "model.pt",
            log_csv=out / "log.csv",
            curve_png=out / "curve.png",
            state_dir=args.state_dir or out / ".state",
            method=args.method,
            **opts,
        )
    if cmd == "evaluate":
        return rois.evaluate_method(
            args.models, args.patch_sets, args.tissues, method=args.method, out_dir=args.out,
            **opts,
        )  # fmt: skip
    if cmd in WSI_COMMANDS:
        return _run_wsi(args, opts)
    raise AssertionError(cmd)  # argparse rejects unknown commands


# -- whole slides (omniseg.steps.slides; the same functions as the rules of workflow/rules/wsi.smk) --
WSI_COMMANDS = (
    "synth-slide",
    "wsi-mask",
    "stain-reference",
    "wsi-stain",
    "wsi-predict",
    "wsi-aggregate",
    "wsi-export",
    "wsi-score",
    "import-qupath",
)
#: Files of one slide's folder (OUTDIR), as the workflow names them in results/wsi/{slide}/.
MASK_PNG, MASK_JSON, LABELS_H5 = "tissue_mask.png", "tissue_mask.json", "labels.h5"
STAIN_JSON = "stain.json"


def _pair(text: str) -> list[str]:
    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected INNER:OUTER tissue keys such as tuft:cap, got {text!r}"
        )
    return parts


def _class_entry(text: str) -> tuple[str, str]:
    name, sep, key = text.rpartition("=")
    if not sep or not name or not key:
        raise argparse.ArgumentTypeError(f"expected 'QuPath class=tissue key', got {text!r}")
    return name, key


#: Tissue-mask options of ``wsi-mask`` (keywords of :func:`omniseg.wsi.tissue_mask.tissue_mask`).
MASK_PARAMS = ("saturation_min", "od_min", "close_um", "open_um", "min_area_um2")


def _add_wsi_commands(add) -> None:
    from omniseg.steps import slides as steps
    from omniseg.wsi.tissue_mask import tissue_mask

    s = add("synth-slide", "write a synthetic pyramidal 40x slide and its full ground truth")
    s.add_argument("out", help="slide TIFF; the truth goes to {stem}_truth.h5 beside it")
    synth = steps.synth_slide
    _opt(s, synth, "seed", type=int, help="random seed of the slide")
    _opt(s, synth, "height", type=int, help="level-0 rows (0.25 um/px)")
    _opt(s, synth, "width", type=int, help="level-0 columns")
    _opt(s, synth, "strips", type=int, help="needle-biopsy-like tissue strips")
    _opt(s, synth, "stain", choices=["he", "pas", "sil", "tri"], help="stain to render")
    _opt(s, synth, "focus", nargs="*", help="tissue keys cycled over strips")
    _opt(s, synth, "tile", type=int, help="TIFF tile edge")
    _opt(s, synth, "compression", choices=["jpeg", "deflate", "none"], help="TIFF tiles")
    _opt(s, synth, "quality", type=int, help="JPEG quality")

    s = add("wsi-mask", "tissue mask of a slide: OUTDIR/tissue_mask.png and tissue_mask.json")
    s.add_argument("slide", help="slide file (anything OpenSlide reads, or TIFF/PNG)")
    s.add_argument("outdir", help="the slide's output folder (results/wsi/{slide} in the workflow)")
    s.add_argument("--mpp", type=float, help="level-0 um/px, overriding the slide's metadata")
    s.add_argument("--mask-image", help="a binary mask image to use instead of the automatic mask")
    _opt(s, steps.mask_slide, "um_per_px", type=float, help="mask resolution")
    for name in MASK_PARAMS:
        _opt(s, tissue_mask, name, type=float, help="see config/README.md (wsi.mask)")

    s = add(
        "stain-reference",
        "the training patches' mean optical density per stain (for wsi-stain)",
    )
    s.add_argument("patch_sets", nargs="+", help="HDF5 patch sets (omniseg patches)")
    s.add_argument("--out", required=True, help="output JSON (results/wsi/stain_reference.json)")
    _opt(s, steps.stain_reference, "split", choices=SPLIT_KEYS, help="the patches measured")

    s = add(
        "wsi-stain",
        "the gain that brings a slide's stain to the training patches': OUTDIR/stain.json",
    )
    s.add_argument("slide", help="slide file (anything OpenSlide reads, or TIFF/PNG)")
    s.add_argument("outdir", help="the slide's folder, holding the output of `omniseg wsi-mask`")
    s.add_argument("--reference", required=True, help="output of `omniseg stain-reference`")
    s.add_argument("--stain", required=True, help="the slide's stain (a stain of the reference)")
    _opt(s, steps.slide_stain, "mpp", type=float, help="level-0 um/px, overriding the slide's "
         "metadata")  # fmt: skip

    s = add(
        "wsi-predict",
        "predict every tissue of a slide, one scale at a time: OUTDIR/prob_{scale}.h5",
    )
    s.add_argument("slide", help="slide file (anything OpenSlide reads, or TIFF/PNG)")
    s.add_argument("outdir", help="the slide's folder, holding the output of `omniseg wsi-mask`")
    s.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="model.pt of a single-network method, or one per tissue of a multi-network method",
    )
    s.add_argument("--scale", nargs="+", help="scale keys such as 0.25 1 2 (default: every scale)")
    s.add_argument("--mpp", type=float, help="level-0 um/px, overriding the slide's metadata")
    predict = steps.predict_slide
    _opt(s, predict, "tile", type=int, help="tile edge at the tissue's scale (None: the model's "
         "training patch size)")  # fmt: skip
    _opt(s, predict, "overlap", type=int, help="overlap of neighbouring tiles (None: tile / 8)")
    _opt(s, predict, "batch_size", type=int, help="tiles per forward pass")
    _opt(s, predict, "adapt_norm", type=int, help="re-estimate each network's first N BatchNorm "
         "layers on the slide before predicting (0: off; 2: the first block)")  # fmt: skip
    s.add_argument(
        "--stain-norm",
        action="store_true",
        help="read the slide through OUTDIR/stain.json (`omniseg wsi-stain`): its stain "
        "normalised to the training patches'",
    )
    _opt(s, predict, "device", help="auto, cpu, cuda, cuda:N")
    _opt(s, predict, "threads", type=int, help="CPU threads of torch")

    _add_map_commands(add)


def _add_map_commands(add) -> None:
    """Commands from per-tissue predictions to the label map and its files, and QuPath import."""
    from omniseg.steps import slides as steps

    s = add("wsi-aggregate", "aggregate OUTDIR/prob_*.h5 into one label map: OUTDIR/labels.h5")
    s.add_argument("outdir", help="the slide's folder (tissue mask and every scale's prediction)")
    s.add_argument(
        "--nested",
        nargs="*",
        type=_pair,
        metavar="INNER:OUTER",
        help="inner tissue wins over outer (default: tuft:cap); none given: no pair",
    )
    s.add_argument(
        "--conflict",
        choices=("max", "background"),
        help="a pixel several tissues claim goes to the most confident (max, the default) or "
        "to background (the paper)",
    )
    _opt(s, steps.aggregate_slide, "threshold", type=float, help="probability at which a tissue "
         "claims a pixel")  # fmt: skip
    _opt(s, steps.aggregate_slide, "mask_margin_um", type=float, help="labels may reach this far "
         "(um) beyond the tissue mask")  # fmt: skip

    s = add("wsi-export", "OUTDIR/labels.ome.tif, overlay.png, tissues.geojson, areas.csv")
    s.add_argument("outdir", help="the slide's folder holding labels.h5")
    s.add_argument("--slide", help="the slide, for the overlay's thumbnail (default: white)")
    s.add_argument("--mpp", type=float, help="level-0 um/px, overriding the slide's metadata")
    _opt(s, steps.export_slide, "object_type", choices=("annotation", "detection"),
         help="QuPath object type of the GeoJSON features (detection for many objects)")  # fmt: skip

    s = add("wsi-score", "Dice of OUTDIR/labels.h5 and its raw heads against a slide's truth")
    s.add_argument("outdir", help="the slide's folder holding labels.h5")
    s.add_argument("truth", help="ground truth HDF5 ({stem}_truth.h5 of `omniseg synth-slide`)")
    s.add_argument(
        "--nested",
        nargs="*",
        type=_pair,
        metavar="INNER:OUTER",
        help="the aggregation rule used (default: tuft:cap)",
    )
    s.add_argument(
        "--out",
        help="score table (default: OUTDIR/scores.csv; raw heads are scored too when "
        "OUTDIR/prob_*.h5 of every scale are there)",
    )
    _opt(s, steps.score_slide, "mask_margin_um", type=float, help="um beyond the tissue mask; "
         "default: the margin the label map records")  # fmt: skip

    s = add("import-qupath", "40x ROIs + partial masks from QuPath GeoJSON annotations of a slide")
    s.add_argument("slide", help="the annotated slide (anything OpenSlide reads, or TIFF/PNG)")
    s.add_argument("geojson", help="QuPath export (File > Export objects as GeoJSON)")
    s.add_argument("outdir", help="writes OUTDIR/rois.tsv, images/ and masks/")
    s.add_argument(
        "--class",
        dest="classes",
        action="append",
        type=_class_entry,
        metavar="NAME=KEY",
        help="QuPath class -> tissue key (repeat; default: tissue names and keys)",
    )
    s.add_argument("--patient", help="patient of every ROI (default: the slide's file name)")
    annotations = steps.import_annotations
    _opt(s, annotations, "stain", choices=["he", "pas", "sil", "tri"], help="stain of the slide")
    _opt(s, annotations, "roi_size", type=int, help="minimum ROI side, level-0 pixels")
    _opt(s, annotations, "margin_px", type=int, help="context around each object")


def _wsi_rules(nested, conflict: str | None = None) -> dict | None:
    """The aggregation rules of the options; None: the default rules."""
    from omniseg.wsi.aggregate import DEFAULT_RULES

    if nested is None and conflict is None:
        return None
    return {
        "nested": DEFAULT_RULES["nested"] if nested is None else nested,
        "conflict": conflict or DEFAULT_RULES["conflict"],
    }


def _run_wsi(args: argparse.Namespace, opts: dict):
    from omniseg.steps import slides as steps

    cmd = args.command
    if cmd == "synth-slide":
        return steps.synth_slide(args.out, args.tissues, **opts)
    if cmd == "import-qupath":
        classes = dict(args.classes) if args.classes else None
        sheet = steps.import_annotations(
            args.slide, args.geojson, args.outdir, args.tissues, class_map=classes,
            patient=args.patient, **opts,
        )  # fmt: skip
        return {"sheet": sheet}
    if cmd == "stain-reference":
        return steps.stain_reference(args.patch_sets, args.out, **opts)["stains"]
    out = Path(args.outdir)
    mask = {"mask_png": out / MASK_PNG, "mask_json": out / MASK_JSON}
    probs = [out / f"prob_{key}.h5" for key in steps.scale_keys(args.tissues)]
    if cmd == "wsi-mask":
        return steps.mask_slide(
            args.slide, mask["mask_png"], mask["mask_json"], mpp=args.mpp,
            mask_image=args.mask_image, **opts,
        )  # fmt: skip
    if cmd == "wsi-stain":
        return steps.slide_stain(
            args.slide, mask["mask_png"], mask["mask_json"], args.reference, args.stain,
            out / STAIN_JSON, **opts,
        )  # fmt: skip
    if cmd == "wsi-predict":
        stain = out / STAIN_JSON if args.stain_norm else None
        if stain is not None and not stain.is_file():
            raise FileNotFoundError(f"--stain-norm: {stain} missing: run `omniseg wsi-stain` first")
        return {
            key: steps.predict_slide(
                args.model,
                args.slide,
                mask["mask_png"],
                mask["mask_json"],
                args.tissues,
                key,
                out / f"prob_{key}.h5",
                mpp=args.mpp,
                stain_json=stain,
                **opts,
            )  # fmt: skip
            for key in args.scale or steps.scale_keys(args.tissues)
        }
    if cmd == "wsi-aggregate":
        missing = [str(p) for p in probs if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing prediction(s) {', '.join(missing)}: run `omniseg wsi-predict` first"
            )
        labels = steps.aggregate_slide(
            probs, mask["mask_json"], args.tissues, out / LABELS_H5, mask_png=mask["mask_png"],
            rules=_wsi_rules(args.nested, args.conflict), **opts,
        )  # fmt: skip
        return {"labels": labels}
    if cmd == "wsi-export":
        return steps.export_slide(
            out / LABELS_H5, args.tissues, ome_tif=out / "labels.ome.tif",
            overlay_png=out / "overlay.png", geojson=out / "tissues.geojson",
            areas_csv=out / "areas.csv", slide=args.slide, mpp=args.mpp, **opts,
        )  # fmt: skip
    if cmd == "wsi-score":
        df = steps.score_slide(
            out / LABELS_H5, args.truth, args.tissues, args.out or out / "scores.csv",
            rules=_wsi_rules(args.nested), prob_h5s=[p for p in probs if p.is_file()], **mask,
            **opts,
        )  # fmt: skip
        return dict(zip(df["tissue"], df["dice"].round(2), strict=True))
    raise AssertionError(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
