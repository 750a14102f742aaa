"""Benchmark of patch extraction: reading, scaling, cropping and writing ROIs, per scale.

Prints one JSON object::

    python bench/patches.py [--rois 12] [--size 2048] [--patch 128] [--per-roi 20]

ROIs come from ``omniseg.synthetic.cohort.synthesize_cohort`` when it exists, else from a quick
blocky generator (random low-resolution colours upsampled, plus noise; masks are thresholded
smooth fields), written as PNG to a temporary directory. For one tissue per distinct scale of
the registry it times each phase over all ROIs (best of ``--repeats``): ``read`` (PNG decode),
``scale`` (image + mask downscale), ``crop`` (crop origins + cutting), ``write`` (HDF5 append,
lzf), then the whole ``extract_patches`` call. It also compares the compression of the
written patches (gzip 1, lzf, none; and the real release sample when present).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from omniseg.data.patches import (
    crop_origins,
    cut_patches,
    downscale_image,
    downscale_mask,
    extract_patches,
    scale_factor,
)
from omniseg.data.patchset import PatchSetWriter
from omniseg.io import read_image, read_mask, write_png
from omniseg.tissues import SOURCE_UM_PER_PX, load_tissues

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared/data/omniseg_release_sample"


def blocky_roi(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A quick stand-in ROI: uint8 (size, size, 3) image and bool (size, size) mask."""
    cells = max(size // 64, 2)
    coarse = rng.integers(120, 240, size=(cells, cells, 3), dtype=np.uint8)
    rep = -(-size // cells)
    img = np.repeat(np.repeat(coarse, rep, axis=0), rep, axis=1)[:size, :size]
    img = np.clip(
        img.astype(np.int16) + rng.integers(-12, 13, size=img.shape, dtype=np.int16), 0, 255
    )
    field = rng.random((cells * 2, cells * 2))
    rep2 = -(-size // (cells * 2))
    mask = np.repeat(np.repeat(field > 0.8, rep2, axis=0), rep2, axis=1)[:size, :size]
    img[mask] = (img[mask] * 0.6).astype(np.int16)
    return img.astype(np.uint8), mask


def make_rois(tmp: Path, tissues, n: int, size: int, seed: int) -> tuple[pd.DataFrame, str]:
    """Write ``n`` ROIs per tissue; return the sheet (split filled) and the ROI source name."""
    try:
        from omniseg.synthetic.cohort import synthesize_cohort
    except ImportError:
        synthesize_cohort = None
    if synthesize_cohort is not None:
        from omniseg.data.sheet import load_sheet

        sheet = synthesize_cohort(tmp / "cohort", tissues, seed=seed, patients=n, roi_size=size)
        df = load_sheet(sheet, tissues)
        return df.assign(split="train"), "synth"
    rng = np.random.default_rng(seed)
    rows = []
    for t in tissues:
        for i in range(n):
            img, mask = blocky_roi(size, rng)
            write_png(tmp / f"{t.key}_{i}.png", img)
            write_png(tmp / f"{t.key}_{i}_mask.png", mask)
            rows.append(
                {
                    "roi_id": f"{t.key}_{i}",
                    "patient": f"p{i}",
                    "stain": "he",
                    "tissue": t.key,
                    "image": str(tmp / f"{t.key}_{i}.png"),
                    "mask": str(tmp / f"{t.key}_{i}_mask.png"),
                    "split": "train",
                    "truth": "",
                }
            )
    return pd.DataFrame(rows), "blocky"


def phases(
    rows: pd.DataFrame, tissue, patch: int, per_roi: int, out: Path
) -> tuple[dict, np.ndarray]:
    factor = scale_factor(SOURCE_UM_PER_PX, tissue.um_per_px)
    t = dict.fromkeys(("read", "scale", "crop", "write"), 0.0)
    kept = []
    with PatchSetWriter(out, tissue, patch) as writer:
        for i, row in enumerate(rows.itertuples()):
            t0 = time.perf_counter()
            img, mask = read_image(row.image), read_mask(row.mask)
            t1 = time.perf_counter()
            img_s, mask_s = downscale_image(img, factor), downscale_mask(mask, factor)
            t2 = time.perf_counter()
            o = crop_origins(mask_s, per_roi, patch, np.random.default_rng(i), 0.5)
            ims, ms = cut_patches(img_s, o, patch), cut_patches(mask_s, o, patch)
            t3 = time.perf_counter()
            writer.append(
                ims,
                ms,
                {
                    "split": ["train"] * per_roi,
                    "roi_id": [row.roi_id] * per_roi,
                    "patient": [row.patient] * per_roi,
                    "stain": ["he"] * per_roi,
                },
            )
            t4 = time.perf_counter()
            t["read"] += t1 - t0
            t["scale"] += t2 - t1
            t["crop"] += t3 - t2
            t["write"] += t4 - t3
            if i < 4:
                kept.append((ims, ms))
    return t, kept


def compression(images: np.ndarray, masks: np.ndarray, tmp: Path) -> dict:
    """Write time (best of 3) and bytes per patch for each compression filter."""
    n, P = images.shape[:2]
    out = {"raw_bytes_per_patch": int(images[0].nbytes + masks[0].nbytes)}
    for name, kw in {
        "gzip1": {"compression": "gzip", "compression_opts": 1},
        "lzf": {"compression": "lzf"},
        "none": {},
    }.items():
        best = np.inf
        for _ in range(3):
            path = tmp / f"c_{name}.h5"
            t0 = time.perf_counter()
            with h5py.File(path, "w") as h5:
                h5.create_dataset("images", data=images, chunks=(1, P, P, 3), **kw)
                h5.create_dataset("masks", data=masks, chunks=(1, P, P), **kw)
            best = min(best, time.perf_counter() - t0)
        read = np.inf
        for _ in range(3):  # one patch at a time, as PatchDataset reads
            with h5py.File(path, "r") as h5:
                t0 = time.perf_counter()
                for j in range(n):
                    h5["images"][j], h5["masks"][j]
                read = min(read, time.perf_counter() - t0)
        out[name] = {
            "write_ms_per_patch": round(1e3 * best / n, 3),
            "read_ms_per_patch": round(1e3 * read / n, 3),
            "bytes_per_patch": int(os.path.getsize(path) / n),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rois", type=int, default=12)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--per-roi", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tissues", default=str(ROOT / "config/tissues.tsv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tissues = load_tissues(args.tissues)
    result = {
        "host": platform.node(),
        "rois": args.rois,
        "roi_size": args.size,
        "patch": args.patch,
        "per_roi": args.per_roi,
        "scales": {},
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        sheet, source = make_rois(tmp, tissues, args.rois, args.size, args.seed)
        result["roi_source"] = source
        result["synthesis_s"] = round(time.perf_counter() - t0, 2)
        for um in tissues.scales:
            tissue = tissues.at_scale(um)[0]
            rows = sheet[sheet["tissue"] == tissue.key].head(args.rois)
            best, best_total = None, np.inf
            for _ in range(args.repeats):
                t, kept = phases(rows, tissue, args.patch, args.per_roi, tmp / "p.h5")
                if sum(t.values()) < best_total:
                    best, best_total = t, sum(t.values())
            e2e = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                extract_patches(
                    rows,
                    tissue,
                    tmp / "e.h5",
                    patch_size=args.patch,
                    counts={"train": args.per_roi * len(rows)},
                    progress=False,
                )
                e2e = min(e2e, time.perf_counter() - t0)
            images = np.concatenate([k[0] for k in kept])
            masks = np.concatenate([k[1] for k in kept]).astype(np.uint8)
            result["scales"][f"{um:g}"] = {
                "tissue": tissue.key,
                "factor": scale_factor(SOURCE_UM_PER_PX, um),
                "seconds": {k: round(v, 3) for k, v in best.items()},
                "extract_patches_s": round(e2e, 3),
                "rois_per_s": round(len(rows) / e2e, 2),
                "compression": compression(images, masks, tmp),
            }
        if SAMPLE.is_dir():
            files = sorted(SAMPLE.rglob("*.png"))
            imgs = [f for f in files if "_mask_" not in f.name][:32]
            images = np.stack([read_image(f) for f in imgs])
            masks = np.stack(
                [
                    read_mask(f.with_name(next(f.parent.glob(f"{f.stem}_mask_*.png")).name))
                    for f in imgs
                ]
            ).astype(np.uint8)
            result["release_sample_compression"] = compression(images, masks, tmp)
    total = sum(
        len(sheet[sheet["tissue"] == tissues.at_scale(um)[0].key].head(args.rois))
        for um in tissues.scales
    )
    result["rois_per_s"] = round(
        total / sum(s["extract_patches_s"] for s in result["scales"].values()), 2
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
