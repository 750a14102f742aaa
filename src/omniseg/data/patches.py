"""ROI scaling and cropping: from 40x ROIs to fixed-size patches at each tissue's scale.

Coordinate conventions: arrays are indexed ``(row, col)``. Crop origins are ``(row, col)`` of
the top-left pixel at the *scaled* resolution; the patch-set provenance stores ``x`` (column)
and ``y`` (row) of the top-left in the *source* (40x) pixel grid.

Downscaling by a factor ``f`` maps output pixel ``(i, j)`` to the source square
``[i*f, (i+1)*f) x [j*f, (j+1)*f)``; the output has ``floor(H / f) x floor(W / f)`` pixels and
the remainder rows/columns at the bottom/right are dropped (cropped, never padded), so that
output pixel ``(i, j)`` sits exactly at source ``(i*f, j*f)``.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage as ndi
from tqdm.auto import tqdm

from omniseg.data.patchset import PatchSetWriter
from omniseg.data.split import SPLITS
from omniseg.io import read_image, read_mask
from omniseg.resample import INT_TOL, area_mean, as_int_factor, round_uint8
from omniseg.tissues import SOURCE_UM_PER_PX, Tissue

log = logging.getLogger(__name__)


def scale_factor(source_um_per_px: float, target_um_per_px: float) -> float:
    """Downscaling factor from the source pixel size to the target one (0.25 -> 2.0 is 8.0).

    Values within 1e-9 of an integer are snapped to it, so integer factors take the exact
    block-mean path.

    Raises:
        ValueError: non-positive pixel sizes, or a target finer than the source (upsampling).
    """
    if not (source_um_per_px > 0 and target_um_per_px > 0):
        raise ValueError(
            f"pixel sizes must be > 0, got source {source_um_per_px} and target {target_um_per_px}"
        )
    f = target_um_per_px / source_um_per_px
    if abs(f - round(f)) < INT_TOL * max(1.0, f):
        f = float(round(f))
    if f < 1:
        raise ValueError(
            f"target {target_um_per_px} um/px is finer than the source {source_um_per_px} um/px: "
            "upsampling is not supported"
        )
    return f


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """Output ``(rows, cols)`` of downscaling an image of ``shape`` by ``factor``."""
    k = as_int_factor(factor)
    if k is not None:
        return shape[0] // k, shape[1] // k
    return int(math.floor(shape[0] / factor + INT_TOL)), int(
        math.floor(shape[1] / factor + INT_TOL)
    )


def downscale_image(img: np.ndarray, factor: float) -> np.ndarray:
    """Area-averaging downscale of a uint8 ``(H, W, 3)`` image (or ``(H, W)``).

    Factor 1 returns a copy; integer factors use an exact block mean (rounded half up);
    other factors exact area-weighted resampling (separable sparse weights). See the module
    docstring for the output size (remainder rows/cols cropped).

    Returns:
        uint8 array of shape ``scaled_shape((H, W), factor) (+ (3,))``.
    """
    if img.dtype != np.uint8:
        raise ValueError(f"downscale_image expects uint8, got {img.dtype}")
    mean = _area_mean(img, factor)
    if mean is None:
        return img.copy()
    return round_uint8(mean)


def downscale_mask(mask: np.ndarray, factor: float) -> np.ndarray:
    """Downscale a boolean ``(H, W)`` mask: output pixel is True where >= half its area is.

    Same output grid and shape as :func:`downscale_image` with the same factor.
    """
    mean = _area_mean(np.asarray(mask, dtype=bool), factor)
    if mean is None:
        return np.array(mask, dtype=bool, copy=True)
    return mean >= 0.5 - 1e-5  # float32 weights in the non-integer path


def _area_mean(arr: np.ndarray, factor: float) -> np.ndarray | None:
    """Area mean of ``arr`` (H, W[, C]) over the output grid; None when factor is 1."""
    if not factor >= 1:
        raise ValueError(f"downscale factor must be >= 1, got {factor}")
    if as_int_factor(factor) == 1:
        return None
    h, w = scaled_shape(arr.shape[:2], factor)
    if h == 0 or w == 0:
        raise ValueError(
            f"image of {arr.shape[0]}x{arr.shape[1]} is smaller than one pixel at factor {factor}"
        )
    return area_mean(arr, h, w, factor)


def crop_origins(
    mask: np.ndarray,
    n: int,
    patch: int,
    rng: np.random.Generator,
    object_fraction: float,
    absent_fraction: float = 0.0,
) -> np.ndarray:
    """Top-left corners of ``n`` crops of ``patch x patch`` pixels, all fully inside ``mask``.

    ``round(n * object_fraction)`` crops (the first ones) are centred on labelled objects when
    the mask has any: an object (8-connected component) is drawn uniformly, so small objects are
    sampled as often as large ones, then a pixel of it, then the centre is jittered by up to
    ``patch // 8`` pixels; the crop is clamped into the image. The next
    ``round(n * absent_fraction)`` crops show none of the tissue: their origin is drawn
    uniformly among the origins whose crop holds no labelled pixel (an ROI is fully labelled for
    its tissue, so these are true negatives, like most of a slide's tiles); where no such crop
    exists they are uniform. The others are uniform.

    Args:
        mask: bool ``(H, W)`` at the scaled resolution.
        n: number of crops.
        patch: crop side in pixels.
        rng: random generator (consumed).
        object_fraction: share of object-centred crops, in [0, 1].
        absent_fraction: share of crops without the tissue, in [0, 1 - object_fraction].

    Returns:
        int64 ``(n, 2)`` array of ``(row, col)`` top-left corners at the scaled resolution.

    Raises:
        ValueError: the mask is smaller than one patch, or a bad fraction.
    """
    h, w = mask.shape[:2]
    if h < patch or w < patch:
        raise ValueError(f"image of {h}x{w} px is smaller than one {patch}x{patch} patch")
    if not 0.0 <= object_fraction <= 1.0:
        raise ValueError(f"object_fraction must be in [0, 1], got {object_fraction}")
    if not 0.0 <= absent_fraction <= 1.0 - object_fraction + 1e-9:
        raise ValueError(
            f"absent_fraction must be in [0, 1 - object_fraction = {1 - object_fraction:g}], "
            f"got {absent_fraction}"
        )
    out = np.empty((n, 2), dtype=np.int64)
    n_obj = int(round(n * object_fraction)) if n else 0
    if n_obj:
        labels, count = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
        if count == 0:
            n_obj = 0
        else:
            fg = np.flatnonzero(labels)
            lab = labels.ravel()[fg]
            order = np.argsort(lab, kind="stable")
            sizes = np.bincount(lab, minlength=count + 1)[1:]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            obj = rng.integers(0, count, size=n_obj)
            pick = starts[obj] + (rng.random(n_obj) * sizes[obj]).astype(np.int64)
            centre = np.stack(np.unravel_index(fg[order[pick]], (h, w)), axis=1)
            jit = patch // 8
            jitter = rng.integers(-jit, jit + 1, size=(n_obj, 2)) if jit else 0
            top_left = centre - patch // 2 + jitter
            out[:n_obj, 0] = np.clip(top_left[:, 0], 0, h - patch)
            out[:n_obj, 1] = np.clip(top_left[:, 1], 0, w - patch)
    n_abs = min(int(round(n * absent_fraction)), n - n_obj) if n else 0
    if n_abs:
        free = np.flatnonzero(_empty_windows(mask, patch))
        if free.size:
            pick = free[rng.integers(0, free.size, size=n_abs)]
            rows, cols = np.unravel_index(pick, (h - patch + 1, w - patch + 1))
            out[n_obj : n_obj + n_abs, 0] = rows
            out[n_obj : n_obj + n_abs, 1] = cols
        else:
            n_abs = 0  # the tissue is everywhere: these crops are uniform
    first = n_obj + n_abs
    rest = n - first
    out[first:, 0] = rng.integers(0, h - patch + 1, size=rest)
    out[first:, 1] = rng.integers(0, w - patch + 1, size=rest)
    return out


def _empty_windows(mask: np.ndarray, patch: int) -> np.ndarray:
    """bool ``(H - P + 1, W - P + 1)``: the ``P x P`` crop with that top-left has no True pixel."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    total = (
        integral[patch:, patch:]
        - integral[:-patch, patch:]
        - integral[patch:, :-patch]
        + integral[:-patch, :-patch]
    )
    return total == 0


def cut_patches(arr: np.ndarray, origins: np.ndarray, patch: int) -> np.ndarray:
    """Cut ``(n, patch, patch[, C])`` crops at ``(row, col)`` top-left ``origins`` (n, 2)."""
    view = np.lib.stride_tricks.sliding_window_view(arr, (patch, patch), axis=(0, 1))
    crops = view[origins[:, 0], origins[:, 1]]  # (n, [C,] P, P)
    if arr.ndim == 3:
        crops = np.moveaxis(crops, 1, -1)
    return np.ascontiguousarray(crops)


def allocate(total: int, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Spread ``total`` over ``n_items`` as evenly as possible; who gets the +1 is seeded."""
    if n_items == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.full(n_items, total // n_items, dtype=np.int64)
    extra = rng.permutation(n_items)[: total % n_items]
    counts[extra] += 1
    return counts


def extract_patches(
    sheet: pd.DataFrame,
    tissue: Tissue,
    out_path: str | Path,
    *,
    patch_size: int,
    counts: Mapping[str, int],
    object_fraction: float = 0.5,
    absent_fraction: float = 0.0,
    seed: int = 0,
    config_hash: str = "",
    source_um_per_px: float = SOURCE_UM_PER_PX,
    progress: bool = True,
) -> Path:
    """Write the HDF5 patch set of one tissue, all splits in one file.

    Takes the sheet rows with ``tissue == tissue.key`` (``split`` must be filled). For each
    split (in ``SPLITS`` order) ``counts[split]`` patches are spread evenly over that split's
    ROIs (sorted by roi_id; seeded remainder). Each ROI is read once, downscaled to the
    tissue's pixel size, and cropped by :func:`crop_origins` with a generator seeded by
    ``(seed, tissue.id, crc32(roi_id))``: the same arguments give an identical file, and an ROI's
    patches do not change when other ROIs are added.

    Args:
        sheet: sample sheet from :func:`omniseg.data.sheet.load_sheet` with ``split`` filled.
        tissue: the tissue to extract.
        out_path: the ``.h5`` file to write (atomically).
        patch_size: patch side in pixels at the tissue's scale.
        counts: patches per split, e.g. ``{"train": 200, "val": 20, "test": 60}``.
        object_fraction: share of crops centred on labelled objects.
        absent_fraction: share of crops that show none of the tissue (see :func:`crop_origins`).
        seed: base seed.
        config_hash: stored in the file attributes.
        source_um_per_px: pixel size of the ROIs.
        progress: show a tqdm bar over ROIs.

    Returns:
        ``Path(out_path)``.

    Raises:
        ValueError: rows without a valid split, a mask whose shape differs from its image, an
            ROI smaller than one patch at the target scale, unreadable images or masks.
    """
    factor = scale_factor(source_um_per_px, tissue.um_per_px)
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ValueError(f"counts has unknown split(s) {', '.join(unknown)}; expected {SPLITS}")
    rows = sheet[sheet["tissue"] == tissue.key]
    bad = rows[~rows["split"].isin(SPLITS)] if "split" in rows else rows
    if len(bad):
        ids = ", ".join(bad["roi_id"].astype(str).head(10))
        raise ValueError(f"{tissue.key}: ROI(s) without a train/val/test split: {ids}")

    plan: list[tuple[pd.Series, int]] = []  # (row, number of patches), in write order
    for split in SPLITS:
        want = int(counts.get(split, 0))
        rois = rows[rows["split"] == split].sort_values("roi_id", kind="stable")
        if len(rois) == 0:
            if want:
                log.warning(
                    "%s: no ROI in split %s; writing 0 %s patches", tissue.key, split, split
                )
            continue
        split_rng = np.random.default_rng([seed, tissue.id, SPLITS.index(split)])
        for (_, row), k in zip(rois.iterrows(), allocate(want, len(rois), split_rng), strict=True):
            if k:
                plan.append((row, int(k)))

    total = sum(k for _, k in plan)
    with PatchSetWriter(out_path, tissue, patch_size, config_hash, expected=total) as writer:
        bar = tqdm(plan, desc=f"patches {tissue.key}", unit="ROI", disable=not progress)
        for row, k in bar:
            images, masks, origins = roi_patches(
                row["image"],
                row["mask"],
                str(row["roi_id"]),
                factor,
                patch_size,
                k,
                np.random.default_rng([seed, tissue.id, zlib.crc32(str(row["roi_id"]).encode())]),
                object_fraction,
                tissue.um_per_px,
                absent_fraction,
            )
            writer.append(
                images,
                masks,
                {
                    "split": [row["split"]] * k,
                    "roi_id": [str(row["roi_id"])] * k,
                    "patient": [str(row["patient"])] * k,
                    "stain": [str(row["stain"])] * k,
                    "x": np.rint(origins[:, 1] * factor).astype(np.int64),
                    "y": np.rint(origins[:, 0] * factor).astype(np.int64),
                    "um_per_px": np.full(k, source_um_per_px * factor, dtype=np.float32),
                },
            )
    return Path(out_path)


def roi_patches(
    image_path: str | Path,
    mask_path: str | Path,
    roi_id: str,
    factor: float,
    patch_size: int,
    n: int,
    rng: np.random.Generator,
    object_fraction: float,
    um_per_px: float,
    absent_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one ROI, downscale it by ``factor`` and cut ``n`` patches.

    Returns:
        images uint8 ``(n, P, P, 3)``, masks bool ``(n, P, P)``, origins int64 ``(n, 2)``
        ``(row, col)`` at the scaled resolution.
    """
    img = read_image(image_path)
    mask = read_mask(mask_path)
    if mask.shape != img.shape[:2]:
        h, w = mask.shape
        H, W = img.shape[:2]
        raise ValueError(f"mask {mask_path} is {h}x{w}, image {image_path} is {H}x{W}")
    h, w = scaled_shape(img.shape[:2], factor)
    if h < patch_size or w < patch_size:
        raise ValueError(
            f"ROI {roi_id} ({img.shape[0]}x{img.shape[1]} px at source) is {h}x{w} px at "
            f"{um_per_px:g} um/px, smaller than one {patch_size}x{patch_size} patch"
        )
    img_s = downscale_image(img, factor)
    mask_s = downscale_mask(mask, factor)
    origins = crop_origins(mask_s, n, patch_size, rng, object_fraction, absent_fraction)
    return (
        cut_patches(img_s, origins, patch_size),
        cut_patches(mask_s, origins, patch_size),
        origins,
    )
