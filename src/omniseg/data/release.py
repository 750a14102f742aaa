"""Importer for the public Omni-Seg release layout -> one HDF5 patch set per tissue.

Layout: ``{src}/**/{release_folder}/{stain}/im_A_B.png`` with its mask beside it as
``im_A_B_mask_{mask_suffix}.png`` (folder and suffix from the tissue registry). Images are RGBA
256x256 patches already at their tissue's scale (alpha dropped); masks are RGBA with foreground
255. ``A`` is the source image, used as the patient/group of the split, shared across tissue
folders so that no source image is in two splits.

Everything is validated (every pair read and checked) before anything is written; outputs are
written atomically and only if all inputs are good.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omniseg.data.patchset import PatchSetWriter
from omniseg.data.split import DEFAULT_FRACTIONS, SPLITS, assign_splits
from omniseg.io import read_image, read_mask
from omniseg.tissues import Tissue, TissueTable

log = logging.getLogger(__name__)

#: Scale ids of the release's folder names and data_list.csv -> pixel size (um/px).
RELEASE_SCALE_UM = {0: 2.0, 1: 1.0, 2: 0.5, 3: 0.25}

_IMAGE_RE = re.compile(r"^(?P<stem>im_(?P<a>[^_]+)_(?P<b>[^_]+))\.png$", re.IGNORECASE)
_MASK_RE = re.compile(r"^(?P<stem>im_[^_]+_[^_]+)_mask_(?P<suffix>.+)\.png$", re.IGNORECASE)
_BATCH = 64


@dataclass(frozen=True)
class ReleasePair:
    """One image/mask pair of the release."""

    tissue: Tissue
    folder: str
    stain: str
    stem: str
    group: str
    image: Path
    mask: Path

    @property
    def roi_id(self) -> str:
        return f"{self.folder}/{self.stain}/{self.stem}"


def import_release(
    src: str | Path,
    outdir: str | Path,
    tissues: TissueTable,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    data_list: str | Path | None = None,
    outputs: Mapping[str, str | Path] | None = None,
) -> dict[str, Path]:
    """Convert a release folder into ``{outdir}/{tissue}.h5`` patch sets.

    Args:
        src: the release folder, or any folder above the tissue folders.
        outdir: where the patch sets go (created only if there is something to write).
        tissues: registry (tissue folders and mask suffixes are looked up in it).
        fractions: train/val/test shares of source images ``A``.
        seed: split seed.
        data_list: optional ``data_list.csv`` (columns image_path, label_path, name, task_id,
            scale_id); when given, it lists the pairs instead of the folder scan.
        outputs: tissue key -> patch-set path, where given (a rule's declared outputs); the
            other tissues go to ``{outdir}/{tissue}.h5``.

    Returns:
        ``{tissue key: path}`` for every tissue with files.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: listing every bad input (image without mask, mask without image, unreadable
            or truncated PNG, non-binary mask, mask of another size, non-square or mixed patch
            sizes within a tissue, duplicate ROI, no pairs at all); nothing is written then.
    """
    src = Path(src)
    pairs, sizes = _checked_pairs(src, tissues, data_list)
    split_of = assign_splits([p.group for p in pairs], fractions, seed)
    config_hash = hashlib.sha1(
        json.dumps(
            {
                "source": "release",
                "fractions": list(fractions),
                "seed": seed,
                "tissues": tissues.fingerprint(),
            }
        ).encode()
    ).hexdigest()[:12]
    by_tissue: dict[str, list[ReleasePair]] = {}
    for p in pairs:
        by_tissue.setdefault(p.tissue.key, []).append(p)

    out: dict[str, Path] = {}
    outdir = Path(outdir)
    absent = [f"{t.key} (folder {t.release_folder})" for t in tissues if t.key not in by_tissue]
    if absent:
        warnings.warn(
            f"release {src}: no files for tissue(s) {', '.join(absent)}; no patch set written "
            "for them",
            stacklevel=2,
        )
    with contextlib.ExitStack() as stack:  # all files appear together, or none
        for tissue in tissues:
            group = by_tissue.get(tissue.key, [])
            if not group:
                continue
            group.sort(key=lambda p: (SPLITS.index(split_of[p.group]), p.roi_id))
            path = (
                Path(outputs[tissue.key])
                if tissue.key in (outputs or {})
                else (outdir / f"{tissue.key}.h5")
            )
            writer = stack.enter_context(
                PatchSetWriter(path, tissue, sizes[tissue.key], config_hash, expected=len(group))
            )
            for lo in range(0, len(group), _BATCH):
                batch = group[lo : lo + _BATCH]
                writer.append(
                    np.stack([read_image(p.image) for p in batch]),
                    np.stack([read_mask(p.mask) for p in batch]),
                    {
                        "split": [split_of[p.group] for p in batch],
                        "roi_id": [p.roi_id for p in batch],
                        "patient": [p.group for p in batch],
                        "stain": [p.stain for p in batch],
                        "x": [-1] * len(batch),
                        "y": [-1] * len(batch),
                        "um_per_px": [tissue.um_per_px] * len(batch),
                    },
                )
            out[tissue.key] = path
            log.info("%s: %d patches -> %s", tissue.key, len(group), path)
    return out


def _checked_pairs(src: Path, tissues: TissueTable, data_list) -> tuple[list[ReleasePair], dict]:
    """The release's image/mask pairs and each tissue's patch size; every problem found (missing
    folder, unpaired or unreadable files, mixed sizes, duplicates) in one ValueError."""
    if not src.is_dir():
        raise FileNotFoundError(f"release folder {src} does not exist")
    if data_list is not None:
        pairs, problems = _pairs_from_list(Path(data_list), src, tissues)
    else:
        pairs, problems = _pairs_from_folders(src, tissues)
    seen: dict[str, Path] = {}
    for p in pairs:
        if p.roi_id in seen:
            problems.append(f"{p.image}: same ROI {p.roi_id} as {seen[p.roi_id]}")
        seen.setdefault(p.roi_id, p.image)
    if not pairs and not problems:
        problems.append(
            "no image/mask pairs found in any tissue folder "
            f"({', '.join(t.release_folder for t in tissues)})"
        )
    sizes, read_problems = _validate_pixels(pairs)
    problems += read_problems
    if problems:
        raise ValueError(f"release {src}:\n" + "\n".join(f"  {p}" for p in problems))

    return pairs, sizes


def find_pairs(src: str | Path, tissues: TissueTable) -> list[ReleasePair]:
    """List the image/mask pairs of a release folder (no pixel is read).

    Raises:
        ValueError: unpaired images or masks, listing all of them.
    """
    pairs, problems = _pairs_from_folders(Path(src), tissues)
    if problems:
        raise ValueError(f"release {src}:\n" + "\n".join(f"  {p}" for p in problems))
    return pairs


def _tissue_dirs(src: Path, tissues: TissueTable) -> list[tuple[Tissue, Path]]:
    folders = {t.release_folder: t for t in tissues}
    found = []
    for dirpath, dirnames, _ in os.walk(src):
        here = Path(dirpath)
        if here.name in folders:
            found.append((folders[here.name], here))
            dirnames[:] = []  # a tissue folder holds stains, not other tissue folders
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found, key=lambda tp: (tp[0].id, str(tp[1])))


def _pairs_from_folders(src: Path, tissues: TissueTable) -> tuple[list[ReleasePair], list[str]]:
    pairs: list[ReleasePair] = []
    problems: list[str] = []
    skipped: list[str] = []
    for tissue, tdir in _tissue_dirs(src, tissues):
        for entry in sorted(tdir.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                skipped.append(str(entry))
                continue
            stain = entry.name.lower()
            images: dict[str, Path] = {}
            masks: dict[str, Path] = {}
            for f in sorted(entry.iterdir()):
                if f.name.startswith("."):
                    continue
                m_img = _IMAGE_RE.match(f.name) if f.is_file() else None
                m_mask = _MASK_RE.match(f.name) if f.is_file() else None
                if m_img:
                    images[m_img["stem"]] = f
                elif m_mask and m_mask["suffix"] == tissue.mask_suffix:
                    masks[m_mask["stem"]] = f
                else:
                    skipped.append(str(f))
            for stem in sorted(images.keys() - masks.keys()):
                problems.append(
                    f"image {images[stem]} has no mask "
                    f"(expected {stem}_mask_{tissue.mask_suffix}.png beside it)"
                )
            for stem in sorted(masks.keys() - images.keys()):
                problems.append(f"mask {masks[stem]} has no image (expected {stem}.png beside it)")
            for stem in sorted(images.keys() & masks.keys()):
                group = _IMAGE_RE.match(images[stem].name)["a"]
                pairs.append(
                    ReleasePair(tissue, tdir.name, stain, stem, group, images[stem], masks[stem])
                )
    if skipped:
        warnings.warn(
            f"release {src}: skipped {len(skipped)} file(s) that are not image/mask pairs: "
            + ", ".join(skipped),
            stacklevel=3,
        )
    return pairs, problems


def _pairs_from_list(
    csv: Path, src: Path, tissues: TissueTable
) -> tuple[list[ReleasePair], list[str]]:
    if not csv.is_file():
        raise FileNotFoundError(f"data list {csv} does not exist")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    need = ["image_path", "label_path", "task_id", "scale_id"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"data list {csv}: missing column(s) {', '.join(missing)}")
    folders = {t.release_folder: t for t in tissues}
    bases = [csv.parent, csv.parent.parent, src, src.parent]
    pairs, problems = [], []
    for i, row in enumerate(df.to_dict(orient="records"), start=2):
        where = f"data list {csv} line {i}"
        image = _locate(row["image_path"], bases)
        label = _locate(row["label_path"], bases)
        if image is None:
            problems.append(f"{where}: image {row['image_path']} not found")
        if label is None:
            problems.append(f"{where}: mask {row['label_path']} of {row['image_path']} not found")
        if image is None or label is None:
            continue
        folder, stain = image.parent.parent.name, image.parent.name.lower()
        tissue = folders.get(folder)
        m = _IMAGE_RE.match(image.name)
        if tissue is None:
            problems.append(f"{where}: image {image} is not in a known tissue folder")
            continue
        if m is None:
            problems.append(f"{where}: image {image} is not named im_A_B.png")
            continue
        lead = re.match(r"^(\d+)_", folder)
        if lead and row["task_id"].strip() and int(row["task_id"]) != int(lead[1]):
            problems.append(f"{where}: task_id {row['task_id']} disagrees with folder {folder}")
        um = (
            RELEASE_SCALE_UM.get(int(row["scale_id"]))
            if row["scale_id"].strip().isdigit()
            else None
        )
        if um is None or abs(um - tissue.um_per_px) > 1e-9:
            problems.append(
                f"{where}: scale_id {row['scale_id']!r} does not match tissue {tissue.key} "
                f"({tissue.um_per_px:g} um/px)"
            )
        pairs.append(ReleasePair(tissue, folder, stain, m["stem"], m["a"], image, label))
    return pairs, problems


def _locate(value: str, bases: Sequence[Path]) -> Path | None:
    p = Path(value.strip())
    if p.is_absolute():
        return p if p.is_file() else None
    for base in bases:
        if (base / p).is_file():
            return base / p
    return None


def _validate_pixels(pairs: Sequence[ReleasePair]) -> tuple[dict[str, int], list[str]]:
    """Read every pair; return the patch size per tissue and every problem found."""
    problems: list[str] = []
    shapes: dict[str, list[tuple[ReleasePair, tuple[int, int]]]] = {}
    for p in pairs:
        try:
            img = read_image(p.image)
            mask = read_mask(p.mask)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        H, W = img.shape[:2]
        h, w = mask.shape
        if (h, w) != (H, W):
            problems.append(f"mask {p.mask} is {h}x{w}, image {p.image} is {H}x{W}")
            continue
        if H != W:
            problems.append(f"image {p.image} is {H}x{W}: patches must be square")
            continue
        shapes.setdefault(p.tissue.key, []).append((p, (H, W)))
    sizes: dict[str, int] = {}
    for key, items in shapes.items():
        values, counts = np.unique([s[0] for _, s in items], return_counts=True)
        size = int(values[np.argmax(counts)])
        sizes[key] = size
        for p, (H, W) in items:
            if H != size:
                problems.append(
                    f"image {p.image} is {H}x{W}, other {key} patches are {size}x{size}: "
                    "one tissue needs one patch size"
                )
    return sizes, problems
