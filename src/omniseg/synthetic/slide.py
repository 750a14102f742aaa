"""Synthetic whole slides: needle-biopsy-like tissue strips on glass, with the full ground truth.

:func:`synthesize_slide` writes

* ``{stem}.tif``: a pyramidal tiled TIFF at 0.25 um/px (:data:`~omniseg.tissues.SOURCE_UM_PER_PX`)
  that OpenSlide opens as a *generic tiled TIFF*: every level is its own page (no SubIFDs),
  tiled, JPEG or deflate compressed, with ``XResolution``/``YResolution`` in pixels per
  centimetre and ``ResolutionUnit = CENTIMETER`` so that ``openslide.mpp-x`` reads the pixel size;
* ``{stem}_truth.h5``: the full ground truth in the level-0 grid, one chunked uint8 (0/1) dataset
  per tissue key (masks overlap: the glomerular unit contains its tuft), plus ``_region`` (the
  strips' tissue region), with the attributes ``mpp``, ``level0_shape`` ``(rows, cols)``,
  ``tissues`` (JSON of :meth:`TissueTable.to_records`), ``seed``, ``stain``, ``slide``.

The tissue comes from the cohort's generator (:func:`omniseg.synthetic.render.render_tissue`), rendered
once per strip inside the strip's bounding box with the strip as its tissue mask, so image and
truth agree exactly. Strips lie in separate horizontal lanes, so their boxes never overlap.
Memory is bounded by one strip box plus one band of rows: the level-0 image and every pyramid
level are composed in a temporary HDF5 file beside the output and streamed into the TIFF tile by
tile.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tifffile
from scipy import ndimage as ndi

from omniseg.io import atomic_path
from omniseg.synthetic.render import DRAWN, GLASS_RGB, STAINS, render_tissue
from omniseg.tissues import SOURCE_UM_PER_PX, TissueTable

__all__ = [
    "GLASS_SIGMA",
    "REGION_DATASET",
    "Strip",
    "edge_tissue_mask",
    "load_slide_truth",
    "strip_layout",
    "synthesize_slide",
]

#: Dataset of the truth file holding the union of the strips (the true tissue region).
REGION_DATASET = "_region"

#: Grey-level noise (std) of bare glass, like the renderer's glass texture.
GLASS_SIGMA = 1.8
_COMPRESSIONS = ("jpeg", "deflate", "none")


@dataclass(frozen=True)
class Strip:
    """Geometry of one tissue strip, in level-0 pixels (``(row, col)`` convention).

    Attributes:
        box: ``(r0, r1, c0, c1)`` bounding box (half-open) that holds the whole strip.
        centre: lane centre row.
        half_width: nominal half-width in pixels.
        amplitude: amplitude of the centre line's bend, pixels.
        wavelength: wavelength of the bend, pixels.
        phase: phase of the bend, radians.
        c_start: first column of the strip.
        c_end: last column (exclusive).
    """

    box: tuple[int, int, int, int]
    centre: float
    half_width: float
    amplitude: float
    wavelength: float
    phase: float
    c_start: int
    c_end: int


def strip_layout(
    rng: np.random.Generator, height: int, width: int, strips: int, um_per_px: float
) -> list[Strip]:
    """Place ``strips`` needle-biopsy-like strips, one per horizontal lane of the slide.

    A strip is 200-400 um wide (narrower when its lane is too thin), runs over most of the slide
    width and bends gently; its box stays inside its lane, so boxes never overlap.
    """
    lane = height / strips
    out = []
    for i in range(strips):
        margin = 0.06 * lane
        avail = lane / 2 - margin  # room for half-width + bend + ragged edge
        half = min(rng.uniform(100.0, 200.0) / um_per_px, 0.55 * avail)
        amp = max(0.0, min(rng.uniform(0.1, 0.5) * half, avail - 1.25 * half))
        c_start = int(width * rng.uniform(0.03, 0.1))
        c_end = int(width * (1 - rng.uniform(0.03, 0.1)))
        centre = (i + 0.5) * lane
        reach = amp + 1.25 * half + 2
        r0, r1 = max(0, int(centre - reach)), min(height, int(math.ceil(centre + reach)))
        out.append(
            Strip(
                box=(r0, r1, c_start, c_end),
                centre=centre,
                half_width=half,
                amplitude=amp,
                wavelength=(c_end - c_start) * rng.uniform(0.8, 2.0),
                phase=rng.uniform(0, 2 * np.pi),
                c_start=c_start,
                c_end=c_end,
            )
        )
    return out


def _strip_mask(rng: np.random.Generator, strip: Strip, um_per_px: float) -> np.ndarray:
    """Bool mask of ``strip`` inside its box: a bent band with tapered ends and ragged edges."""
    r0, r1, c0, c1 = strip.box
    h, w = r1 - r0, c1 - c0
    cols = np.arange(c0, c1, dtype=np.float32)
    centre = strip.centre + strip.amplitude * np.sin(
        2 * np.pi * (cols - c0) / strip.wavelength + strip.phase
    )
    # width varies slowly along the strip; ends are rounded over ~1.5 half-widths
    wobble = _noise_1d(rng, w, scale=max(4.0, 150.0 / um_per_px))
    end = np.minimum(cols - c0, c1 - 1 - cols) / (1.5 * strip.half_width)
    taper = np.sqrt(np.clip(end, 0.0, 1.0))
    half = strip.half_width * (1 + 0.12 * wobble) * taper
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    dist = np.abs(rows - centre[None, :]) - half[None, :]
    # ragged edges: coarse (~15 um) and fine (~4 um) noise on the boundary, in micrometres
    dist += _noise_2d(rng, (h, w), 15.0 / um_per_px) * (6.0 / um_per_px)
    dist += _noise_2d(rng, (h, w), 4.0 / um_per_px) * (2.0 / um_per_px)
    return dist < 0


def edge_tissue_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    um_per_px: float,
    reach_um: tuple[float, float] = (100.0, 400.0),
) -> np.ndarray:
    """Bool tissue mask of a region that a biopsy's edge crosses: a band of tissue through the
    region's centre, glass beyond it, with the same ragged boundary as a slide's strips.

    The band runs at a random angle through a point within 50 um of the centre; each of its two
    edges lies ``reach_um`` (uniform) from that line, so a band is 200-800 um wide at the
    default: as narrow as a needle biopsy (whose 5x slide tiles show glass on both sides) or
    with one edge beyond the region (a single tissue border). Tissue reaches at least
    ``low`` minus ~20 um of edge noise from that line, so the region's centre is tissue and
    :func:`~omniseg.synthetic.render.render_tissue` can place its focus structure there.

    Args:
        rng: the only source of randomness.
        shape: ``(H, W)`` in pixels.
        um_per_px: pixel size.
        reach_um: ``(low, high)`` of each edge's distance from the centre line, um.
    """
    h, w = (int(v) for v in shape)
    lo, hi = (float(v) for v in reach_um)
    if not 0 < lo <= hi:
        raise ValueError(f"reach_um must be 0 < low <= high, got {reach_um}")
    theta = rng.uniform(0.0, np.pi)
    cy, cx = (np.array([h - 1, w - 1]) / 2 + rng.uniform(-50.0, 50.0, 2) / um_per_px).tolist()
    below, above = rng.uniform(lo, hi, 2)
    rows = (np.arange(h, dtype=np.float32)[:, None] - cy) * (np.cos(theta) * um_per_px)
    cols = (np.arange(w, dtype=np.float32)[None, :] - cx) * (np.sin(theta) * um_per_px)
    across = rows + cols  # um across the band
    # ragged edges, as on the strips: coarse (~15 um) and fine (~4 um) noise, in micrometres
    rag = _noise_2d(rng, (h, w), 15.0 / um_per_px) * 6.0
    rag += _noise_2d(rng, (h, w), 4.0 / um_per_px) * 2.0
    return (across + rag > -below) & (across - rag < above)


def _noise_1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Unit-variance smooth noise of length ``n``, correlation length ``scale`` samples."""
    k = max(2, int(n / scale) + 3)
    coarse = rng.standard_normal(k).astype(np.float32)
    out = ndi.zoom(coarse, (n + 1) / k, order=3, mode="nearest")[:n]
    return (out - out.mean()) / max(float(out.std()), 1e-6)


def _noise_2d(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Roughly unit-variance smooth noise (cubic interpolation of a grid of spacing ``scale``)."""
    h, w = shape
    kh, kw = max(2, int(h / scale) + 3), max(2, int(w / scale) + 3)
    coarse = rng.standard_normal((kh, kw)).astype(np.float32)
    out = ndi.zoom(coarse, ((h + 1) / kh, (w + 1) / kw), order=3, mode="nearest", grid_mode=False)
    return out[:h, :w]


def _glass(seed: int, band: int, shape: tuple[int, int]) -> np.ndarray:
    """Bare glass ``(h, w, 3)`` uint8: near-white with pixel noise, seeded per band of rows."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6C617373, band]))
    noise = rng.standard_normal(shape, dtype=np.float32) * GLASS_SIGMA
    base = np.asarray(GLASS_RGB, np.float32)
    return np.clip(np.rint(base + noise[:, :, None]), 0, 255).astype(np.uint8)


def _halve(a: np.ndarray) -> np.ndarray:
    """2x2 mean of ``(h, w, 3)`` uint8 (odd edges replicated), rounded -> ``(ceil h/2, ceil w/2, 3)``."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).sum(axis=(1, 3), dtype=np.uint16)
    return ((s + 2) // 4).astype(np.uint8)


def _level_shapes(height: int, width: int, min_side: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) > min_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tiles(dset: h5py.Dataset, tile: int) -> Iterator[np.ndarray]:
    """Row-major full-size tiles of a ``(h, w, 3)`` dataset (edge tiles padded with glass)."""
    h, w = dset.shape[:2]
    for r in range(0, h, tile):
        band = dset[r : r + tile]
        for c in range(0, w, tile):
            block = band[:, c : c + tile]
            if block.shape[:2] != (tile, tile):
                full = np.empty((tile, tile, 3), np.uint8)
                full[:] = GLASS_RGB
                full[: block.shape[0], : block.shape[1]] = block
                block = full
            yield block


def synthesize_slide(
    out_tif: str | Path,
    tissues: TissueTable,
    *,
    seed: int = 0,
    height: int = 8192,
    width: int = 12288,
    strips: int = 3,
    stain: str = "he",
    tile: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    focus: Sequence[str | None] = (),
    truth_h5: str | Path | None = None,
) -> dict[str, Path]:
    """Write a synthetic pyramidal slide and its full ground truth.

    Args:
        out_tif: the slide (``.tif``).
        truth_h5: where the truth goes; None: ``{stem}_truth.h5`` beside the slide.
        tissues: the registry; one truth dataset per key (keys the renderer does not draw are
            all zero).
        seed: everything random derives from it (same arguments, same pixels and masks).
        height: level-0 rows (0.25 um/px).
        width: level-0 columns.
        strips: number of tissue strips (one per horizontal lane).
        stain: stain code (:data:`~omniseg.synthetic.render.STAINS`).
        tile: TIFF tile edge (multiple of 16); pyramid levels halve until the longer side is at
            most ``tile``.
        compression: ``"jpeg"`` (as scanners write; lossy), ``"deflate"`` (lossless) or
            ``"none"``.
        quality: JPEG quality.
        focus: tissue keys (or None) cycled over the strips: strip ``i`` is rendered with
            ``focus[i % len(focus)]`` in its centre (a glomerulus for ``cap``/``tuft``, an artery
            for ``ves``...). Empty: no constraint, the renderer's natural densities (narrow
            strips then often hold no glomerulus).

    Returns:
        ``{"slide": path of the TIFF, "truth": path of the truth HDF5}``.

    Raises:
        ValueError: bad size, strip count, tile, stain or compression.
    """
    out_tif = Path(out_tif)
    _check_slide_args(stain, compression, tile, strips, height, width)
    focus = tuple(focus)
    bad = [k for k in focus if k is not None and (k not in tissues or k not in DRAWN)]
    if bad:
        raise ValueError(f"focus key(s) {bad} are not tissues the renderer draws in {tissues!r}")
    um = SOURCE_UM_PER_PX
    truth_path = (
        out_tif.with_name(f"{out_tif.stem}_truth.h5") if truth_h5 is None else Path(truth_h5)
    )
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    out_tif.parent.mkdir(parents=True, exist_ok=True)
    layout = strip_layout(np.random.default_rng([seed, 0x736C]), height, width, strips, um)
    shapes = _level_shapes(height, width, tile)

    scratch = Path(tempfile.mkdtemp(prefix=f".{out_tif.stem}.", dir=out_tif.parent))
    try:
        with h5py.File(scratch / "levels.h5", "w") as work, atomic_path(truth_path) as tmp_truth:
            level0 = work.create_dataset(
                "0",
                shape=(height, width, 3),
                dtype=np.uint8,
                chunks=(min(height, tile), min(width, 2048), 3),
            )
            for band, r in enumerate(range(0, height, tile)):
                rows = min(tile, height - r)
                level0[r : r + rows] = _glass(seed, band, (rows, width))
            with h5py.File(tmp_truth, "w") as truth:
                _write_truth_attrs(truth, tissues, out_tif, seed, stain, (height, width), um)
                dsets = {
                    key: truth.create_dataset(
                        key,
                        shape=(height, width),
                        dtype=np.uint8,
                        chunks=(min(height, tile), min(width, tile)),
                        compression="gzip",
                        compression_opts=1,
                        fillvalue=0,
                    )
                    for key in [*tissues.keys, REGION_DATASET]
                }
                for i, strip in enumerate(layout):
                    key = focus[i % len(focus)] if focus else None
                    _render_strip(seed, i, strip, key, stain, tissues, um, level0, dsets)
            for k in range(1, len(shapes)):
                prev = work[str(k - 1)]
                h, w = shapes[k]
                cur = work.create_dataset(
                    str(k), shape=(h, w, 3), dtype=np.uint8, chunks=(min(h, tile), min(w, 2048), 3)
                )
                for r in range(0, prev.shape[0], 2 * tile):
                    half = _halve(prev[r : r + 2 * tile])
                    cur[r // 2 : r // 2 + half.shape[0]] = half
            _write_tiff(out_tif, work, len(shapes), tile, compression, quality, um)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"slide": out_tif, "truth": truth_path}


def _check_slide_args(stain, compression, tile, strips, height, width) -> None:
    if stain not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; known: {', '.join(STAINS)}")
    if compression not in _COMPRESSIONS:
        raise ValueError(
            f"compression must be one of {', '.join(_COMPRESSIONS)}, got {compression!r}"
        )
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if strips < 1 or int(strips) != strips:
        raise ValueError(f"strips must be a positive integer, got {strips!r}")
    if height < 64 * strips or width < 256:
        raise ValueError(
            f"a {height}x{width} slide is too small for {strips} strip(s) "
            f"(need height >= {64 * strips}, width >= 256)"
        )


def _render_strip(seed, i, strip, key, stain, tissues, um, level0, dsets) -> None:
    """Render tissue strip ``i`` (focus ``key``) into the level-0 image and the truth masks."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5354, i]))
    mask = _strip_mask(rng, strip, um)
    image, masks = render_tissue(
        rng, mask.shape, stain, tissues, focus=key, um_per_px=um, tissue_mask=mask
    )
    r0, r1, c0, c1 = strip.box
    # keep our glass outside the strip (the renderer tints its own glass)
    glass = level0[r0:r1, c0:c1]
    level0[r0:r1, c0:c1] = np.where(mask[:, :, None], image, glass)
    for name, m in masks.items():
        if m.any():
            dsets[name][r0:r1, c0:c1] = m
    dsets[REGION_DATASET][r0:r1, c0:c1] = mask


def _write_truth_attrs(truth, tissues, out_tif, seed, stain, shape, um) -> None:
    truth.attrs["mpp"] = um
    truth.attrs["level0_shape"] = np.asarray(shape, np.int64)
    truth.attrs["tissues"] = tissues.to_json()
    truth.attrs["seed"] = int(seed)
    truth.attrs["stain"] = stain
    truth.attrs["slide"] = out_tif.name
    truth.attrs["drawn"] = json.dumps([k for k in tissues.keys if k in DRAWN])


def _write_tiff(out_tif, work, n_levels, tile, compression, quality, um) -> None:
    h0, w0 = work["0"].shape[:2]
    big = h0 * w0 * 3 * 4 // 3 > 2**31  # plain TIFF offsets end at 4 GiB; keep a margin
    codec: dict = {}
    if compression == "jpeg":
        codec = {"compression": "jpeg", "compressionargs": {"level": int(quality)}}
    elif compression == "deflate":
        codec = {"compression": "zlib", "compressionargs": {"level": 6}, "predictor": True}
    res = 1e4 / um  # pixels per centimetre
    with atomic_path(out_tif) as tmp, tifffile.TiffWriter(tmp, bigtiff=big) as tw:
        for k in range(n_levels):
            dset = work[str(k)]
            tw.write(
                _tiles(dset, tile),
                shape=dset.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                planarconfig="contig",
                resolution=(res / 2**k, res / 2**k),
                resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1,
                metadata=None,
                software=False,
                **codec,
            )


def load_slide_truth(
    truth_h5: str | Path, key: str, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Read one truth mask (or a window ``(r0, r1, c0, c1)`` of it) as bool ``(rows, cols)``.

    Raises:
        ValueError: naming the file if it is unreadable or lacks ``key``.
    """
    path = Path(truth_h5)
    try:
        with h5py.File(path, "r") as fh:
            if key not in fh:
                have = ", ".join(k for k in fh if k != REGION_DATASET)
                raise ValueError(f"slide truth {path} has no mask {key!r} (it has {have})")
            d = fh[key]
            arr = d[()] if window is None else d[window[0] : window[1], window[2] : window[3]]
    except OSError as exc:
        raise ValueError(f"slide truth {path} cannot be read: {exc}") from exc
    return arr.astype(bool)
