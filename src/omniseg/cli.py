"""The ``omniseg`` command: one subcommand per pipeline step.

Each subcommand calls the same :mod:`omniseg.pipeline` function as the matching Snakemake rule,
so ``omniseg patches ...`` by hand and ``snakemake patches`` do the same work.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from omniseg import __version__, pipeline

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
        raise argparse.ArgumentTypeError(f"expected train:val:test counts such as 160:24:48, got {text!r}")
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


def _training_from_config(path: str, method: str) -> dict:
    """The training block of a workflow config file, merged with one method's settings."""
    cfg = _load_yaml(path)
    methods = cfg.get("methods", {})
    if method not in methods:
        raise SystemExit(f"omniseg: method {method!r} is not in {path} (has {', '.join(methods)})")
    m = methods[method]
    return {
        **cfg.get("training", {}),
        **m.get("training", {}),
        "model": {"name": m["model"], "kwargs": m.get("kwargs", {})},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omniseg",
        description="Omni-Seg multi-tissue kidney pathology segmentation, step by step.",
    )
    p.add_argument("--version", action="version", version=f"omniseg {__version__}")
    p.add_argument("--log", metavar="FILE", help="write the log (and progress bars) to FILE")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--tissues", default="config/tissues.tsv", help="tissue registry TSV")
        return sp

    s = add("synth", "generate the synthetic renal cohort (40x ROIs, partial masks, full truth)")
    s.add_argument("outdir", help="output folder; the sample sheet is OUTDIR/rois.tsv")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--patients", type=int, default=10)
    s.add_argument("--rois-per-tissue", type=int, default=1)
    s.add_argument("--roi-size", type=int, default=2048, help="ROI side in 40x pixels")
    s.add_argument("--stains", nargs="+", default=["he", "pas", "sil", "tri"])
    s.add_argument("--threads", type=int, default=1)

    s = add("split", "patient-level train/val/test split of a sample sheet")
    s.add_argument("sheet")
    s.add_argument("out", help="patient split table (TSV: patient, split, rois)")
    s.add_argument("--fractions", type=_split_fractions, default="6:1:3", help="train:val:test")
    s.add_argument("--seed", type=int, default=0)

    s = add("patches", "scale one tissue's ROIs to its magnification and crop an HDF5 patch set")
    s.add_argument("sheet")
    s.add_argument("splits", help="patient split table from `omniseg split`")
    s.add_argument("tissue", help="tissue key (config/tissues.tsv)")
    s.add_argument("out", help="output patch set, e.g. results/patches/tuft.h5")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--counts", type=_split_counts, default="2000:300:1000", help="train:val:test")
    s.add_argument("--object-fraction", type=float, default=0.5)
    s.add_argument("--seed", type=int, default=0)

    s = add("import-release", "import the public Omni-Seg release folder layout as patch sets")
    s.add_argument("src", help="release folder (e.g. KI_data_testingset_demo or its parent)")
    s.add_argument("outdir", help="writes OUTDIR/{tissue}.h5")
    s.add_argument("--fractions", type=_split_fractions, default="6:1:3", help="train:val:test")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-list", help="the release's data_list.csv, when present")

    s = add("train", "train one network on HDF5 patch sets")
    s.add_argument("patch_sets", nargs="+")
    s.add_argument("--config", default="config/config.yaml", help="workflow config (training + methods)")
    s.add_argument("--method", default="omniseg")
    s.add_argument("--scope", default="all", help="'all', or one tissue key for per-tissue networks")
    s.add_argument("--out", required=True, help="output folder: model.pt, log.csv, curve.png")
    s.add_argument("--state-dir", help="resume state (default: OUT/.state)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--threads", type=int, default=1)

    s = add("evaluate", "score a method on the test split (Dice %, HD and MSD in um)")
    s.add_argument("--models", nargs="+", required=True, help="model.pt file(s)")
    s.add_argument("--patch-sets", nargs="+", required=True)
    s.add_argument("--method", default="omniseg")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--split", default="test", choices=SPLIT_KEYS)
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=16)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pipeline.setup_logging(args.log)
    try:
        result = _run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"omniseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _run(args: argparse.Namespace):
    cmd = args.command
    if cmd == "synth":
        sheet = pipeline.synth_cohort(
            Path(args.outdir) / "rois.tsv",
            args.tissues,
            threads=args.threads,
            seed=args.seed,
            patients=args.patients,
            rois_per_tissue=args.rois_per_tissue,
            roi_size=args.roi_size,
            stains=args.stains,
        )
        return {"sheet": sheet}
    if cmd == "split":
        table = pipeline.split_patients(
            args.sheet, args.tissues, args.out, fractions=args.fractions, seed=args.seed
        )
        return table.groupby("split")["patient"].size().to_dict()
    if cmd == "patches":
        out = pipeline.extract_tissue(
            args.sheet,
            args.splits,
            args.tissues,
            args.tissue,
            args.out,
            size=args.size,
            counts=args.counts,
            object_fraction=args.object_fraction,
            seed=args.seed,
        )
        return {"patch_set": out}
    if cmd == "import-release":
        return pipeline.import_release(
            args.src,
            args.outdir,
            args.tissues,
            fractions=args.fractions,
            seed=args.seed,
            data_list=args.data_list,
        )
    if cmd == "train":
        out = Path(args.out)
        return pipeline.train_model(
            args.patch_sets,
            args.tissues,
            _training_from_config(args.config, args.method),
            model_out=out / "model.pt",
            log_csv=out / "log.csv",
            curve_png=out / "curve.png",
            state_dir=args.state_dir or out / ".state",
            method=args.method,
            scope=args.scope,
            device=args.device,
            threads=args.threads,
        )
    if cmd == "evaluate":
        return pipeline.evaluate_method(
            args.models,
            args.patch_sets,
            args.tissues,
            method=args.method,
            out_dir=args.out,
            split=args.split,
            device=args.device,
            batch_size=args.batch_size,
        )
    raise AssertionError(cmd)  # argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
