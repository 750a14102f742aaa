"""Turn an aggregated label map (``labels.h5``) into the files a user opens.

Input contract: an HDF5 file with the dataset ``labels`` (uint8, ``(H0, W0)``, the slide's
level-0 pixel grid, chunked), 0 = background and ``tissue id + 1`` per tissue, with the attributes
``mpp`` (um/px of level 0), ``label_table`` (JSON ``{"0": "background", "1": key, ...}``),
``tissues`` (JSON of :meth:`TissueTable.to_records`) and optionally ``tissue_area_px`` (level-0
pixels inside the tissue mask).

Outputs, all in the level-0 grid:

* :func:`write_label_pyramid`: ``labels.ome.tif``, a tiled OME-TIFF pyramid in SubIFDs.
* :func:`write_overlay`: ``overlay.png``, a thumbnail with tissue colours and a legend.
* :func:`labels_to_geojson`: ``tissues.geojson``, one classified QuPath annotation per object.
* :func:`tissue_areas`: ``areas.csv``, object count, area and fraction of tissue per tissue.

Coordinates: arrays are indexed ``(row, col)``; GeoJSON vertices are ``(x, y) = (col, row)`` of
level-0 pixel *corners* (QuPath's convention: ``(0, 0)`` is the top-left corner of the top-left
pixel), so a one-pixel object is a unit square and polygon areas equal pixel counts.

Memory: every function streams the dataset in strips or blocks; nothing of the slide's level-0
size is ever held in memory.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import shapely
import tifffile
from scipy import ndimage

from omniseg.io import atomic_path, write_png
from omniseg.progress import progress as progress_bar
from omniseg.tissues import TissueTable
from omniseg.wsi.geometry import Objects, simplify_rings, trace_rings, valid_outlines

LABELS_DATASET = "labels"
#: OME MapAnnotation namespace that holds the label table in ``labels.ome.tif``.
LABEL_TABLE_NAMESPACE = "omniseg/label_table"
#: QuPath object types :func:`labels_to_geojson` writes (config `wsi.geojson_object_type`).
QUPATH_OBJECT_TYPES = ("annotation", "detection")

_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


# -- the label file ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMapInfo:
    """What a ``labels.h5`` file declares.

    Attributes:
        path: the file.
        shape: ``(rows, cols)`` of the level-0 label map.
        chunks: HDF5 chunk shape, or None for a contiguous dataset.
        mpp: micrometres per level-0 pixel.
        label_table: label value -> tissue key (0 -> ``"background"``).
        tissues: the tissue table stored in the file, or None if absent.
        tissue_area_px: level-0 pixels inside the tissue mask, or None if unknown.
        mask_margin_um: how far the tissue mask that limited the labels was grown (um), or
            None if the file does not say (no mask, or written before it was recorded).
    """

    path: Path
    shape: tuple[int, int]
    chunks: tuple[int, int] | None
    mpp: float
    label_table: dict[int, str]
    tissues: TissueTable | None
    tissue_area_px: int | None
    mask_margin_um: float | None


def label_map_info(labels_h5: str | Path) -> LabelMapInfo:
    """Read and check the metadata of a ``labels.h5`` file (no pixel is read).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, if it is not HDF5, lacks the dataset or an attribute, or the
            dataset is not a 2-D uint8 array.
    """
    path = Path(labels_h5)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"label map {path} is not a readable HDF5 file: {exc}") from exc
    with fh:
        if LABELS_DATASET not in fh:
            raise ValueError(f"label map {path} has no dataset {LABELS_DATASET!r}")
        dset = fh[LABELS_DATASET]
        if dset.ndim != 2 or dset.dtype != np.uint8:
            raise ValueError(
                f"label map {path}: dataset {LABELS_DATASET!r} is {dset.dtype} {dset.shape}, "
                "expected a 2-D uint8 array"
            )
        attrs = dict(dset.attrs) | {k: v for k, v in fh.attrs.items() if k not in dset.attrs}
        missing = [k for k in ("mpp", "label_table") if k not in attrs]
        if missing:
            raise ValueError(f"label map {path}: missing attribute(s) {', '.join(missing)}")
        try:
            mpp = float(attrs["mpp"])
            table = {int(k): str(v) for k, v in json.loads(_text(attrs["label_table"])).items()}
            tissues = (
                TissueTable.from_records(json.loads(_text(attrs["tissues"])))
                if "tissues" in attrs
                else None
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"label map {path}: bad metadata: {exc}") from exc
        if not mpp > 0:
            raise ValueError(f"label map {path}: mpp must be > 0, got {mpp}")
        area = attrs.get("tissue_area_px")
        area = int(area) if area is not None and int(area) >= 0 else None
        margin = attrs.get("mask_margin_um")
        return LabelMapInfo(
            path=path,
            shape=(int(dset.shape[0]), int(dset.shape[1])),
            chunks=tuple(int(c) for c in dset.chunks) if dset.chunks else None,
            mpp=mpp,
            label_table=table,
            tissues=tissues,
            tissue_area_px=area,
            mask_margin_um=None if margin is None else float(margin),
        )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_tissues(info: LabelMapInfo, tissues: TissueTable) -> None:
    expected = tissues.label_table()
    if info.label_table != expected:
        raise ValueError(
            f"label map {info.path} has label table {info.label_table}, "
            f"the tissue table gives {expected}"
        )


def _strip_rows(info: LabelMapInfo, multiple: int) -> int:
    """Rows per read strip: a multiple of ``multiple`` covering at least one chunk row."""
    chunk_rows = info.chunks[0] if info.chunks else multiple
    return multiple * max(1, math.ceil(chunk_rows / multiple))


# -- OME-TIFF pyramid ----------------------------------------------------------------------------
def pyramid_shapes(shape: tuple[int, int], min_size: int = 256) -> list[tuple[int, int]]:
    """Level shapes ``(rows, cols)``: level 0, then halved (ceil) until the longer side <= min_size.

    Level ``k`` is ``level0[::2**k, ::2**k]``.
    """
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def write_label_pyramid(
    labels_h5: str | Path,
    out_tif: str | Path,
    *,
    tile: int = 512,
    min_size: int = 256,
    progress: bool = True,
) -> Path:
    """Write the label map as a tiled OME-TIFF pyramid (reduced levels in SubIFDs).

    Level 0 is the full-resolution map; level ``k`` is ``level0[::2**k, ::2**k]`` (stride
    sampling keeps label values exact), down to a longest side <= ``min_size``. Tiles are
    ``tile x tile``, zlib-compressed, streamed from the HDF5 file strip by strip; each reduced level
    is staged in a compressed temporary HDF5 file beside the output, so memory stays at a few
    strips whatever the slide size. The OME metadata carries ``PhysicalSizeX/Y`` (= ``mpp``, um)
    and the label table (JSON in the image description and a MapAnnotation in the namespace
    :data:`LABEL_TABLE_NAMESPACE`).

    Args:
        labels_h5: the aggregated label map.
        out_tif: output path (``labels.ome.tif``), written atomically.
        tile: tile side in pixels, a multiple of 16.
        min_size: the smallest level has its longer side <= this.
        progress: show a tqdm bar over the tiles of every level.

    Returns:
        ``out_tif`` as a Path.
    """
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    info = label_map_info(labels_h5)
    out_tif = Path(out_tif)
    shapes = pyramid_shapes(info.shape, min_size)
    table_json = json.dumps({str(k): v for k, v in sorted(info.label_table.items())})
    metadata = {
        "axes": "YX",
        "Name": out_tif.name,
        "Description": f"omniseg label map; label_table={table_json}",
        "PhysicalSizeX": info.mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": info.mpp,
        "PhysicalSizeYUnit": "µm",
        "MapAnnotation": {
            "Namespace": LABEL_TABLE_NAMESPACE,
            "Value": {str(k): v for k, v in sorted(info.label_table.items())},
        },
    }
    options = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "compression": "zlib",
        "photometric": "minisblack",
        "resolutionunit": "CENTIMETER",
    }
    with (
        atomic_path(out_tif) as tmp,
        tempfile.TemporaryDirectory(prefix=".pyramid.", dir=out_tif.parent) as stage_dir,
        h5py.File(info.path, "r") as src_file,
        h5py.File(Path(stage_dir) / "levels.h5", "w") as stage,
        tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw,
        progress_bar(
            total=sum(-(-h // tile) * -(-w // tile) for h, w in shapes),
            desc="labels.ome.tif",
            unit="tile",
            enabled=progress,
        ) as bar,
    ):
        src = src_file[LABELS_DATASET]
        rows = _strip_rows(info, tile)
        for level, shape in enumerate(shapes):
            nxt = None
            if level + 1 < len(shapes):
                nxt = stage.create_dataset(
                    f"level{level + 1}",
                    shape=shapes[level + 1],
                    dtype=np.uint8,
                    chunks=(min(tile, shapes[level + 1][0]), min(tile, shapes[level + 1][1])),
                    compression="lzf",
                )
            res = 1e4 / (info.mpp * 2**level)  # pixels per cm
            tw.write(
                _pyramid_tiles(src, shape, tile, rows, nxt, bar),
                shape=shape,
                resolution=(res, res),
                **(
                    {"subifds": len(shapes) - 1, "metadata": metadata}
                    if level == 0
                    else {"subfiletype": 1, "metadata": None}
                ),
                **options,
            )
            src, rows = nxt, tile
    return out_tif


def _pyramid_tiles(
    src: h5py.Dataset,
    shape: tuple[int, int],
    tile: int,
    rows: int,
    nxt: h5py.Dataset | None,
    bar=None,
) -> Iterator[np.ndarray]:
    """Yield the tiles of ``src`` in row-major order; stage ``src[::2, ::2]`` into ``nxt``."""
    h, w = shape
    for r0 in range(0, h, rows):
        strip = src[r0 : min(h, r0 + rows), :]
        if nxt is not None:  # rows and r0 are even, so the stride stays aligned with level 0
            half = strip[::2, ::2]
            nxt[r0 // 2 : r0 // 2 + half.shape[0], :] = half
        for t0 in range(0, strip.shape[0], tile):
            band = strip[t0 : t0 + tile]
            for c0 in range(0, w, tile):
                if bar is not None:
                    bar.update()
                yield np.ascontiguousarray(band[:, c0 : c0 + tile])


# -- overlay -------------------------------------------------------------------------------------
def read_label_thumbnail(labels_h5: str | Path, max_side: int = 2048) -> tuple[np.ndarray, int]:
    """Read the label map at an integer stride so that its longer side is <= ``max_side``.

    Returns:
        ``(thumb, step)``: uint8 ``(ceil(H0/step), ceil(W0/step))`` with
        ``thumb = labels[::step, ::step]``, read by strided HDF5 selections strip by strip.
    """
    info = label_map_info(labels_h5)
    h, w = info.shape
    step = max(1, math.ceil(max(h, w) / max_side))
    out = np.zeros(((h + step - 1) // step, (w + step - 1) // step), np.uint8)
    rows = _strip_rows(info, step)
    with h5py.File(info.path, "r") as fh:
        dset = fh[LABELS_DATASET]
        for r0 in range(0, h, rows):
            part = dset[r0 : min(h, r0 + rows) : step, ::step]
            out[r0 // step : r0 // step + part.shape[0]] = part
    return out, step


def write_overlay(
    labels_h5: str | Path,
    out_png: str | Path,
    tissues: TissueTable,
    *,
    thumbnail: np.ndarray | None = None,
    max_side: int = 2048,
    alpha: float = 0.5,
) -> Path:
    """Write a thumbnail with tissue colours blended in and a legend naming each tissue.

    Args:
        labels_h5: the aggregated label map.
        out_png: output PNG, written atomically.
        tissues: registry (colours and names); must match the file's label table.
        thumbnail: optional RGB(A) uint8 ``(h, w, 3|4)`` thumbnail of the whole slide (any size
            with about the slide's aspect ratio); resized (nearest) to the label thumbnail.
            White when None.
        max_side: longer side of the label thumbnail (labels are read at an integer stride).
        alpha: opacity of the tissue colours.

    Returns:
        ``out_png`` as a Path. The image occupies the top-left of the PNG pixel for pixel
        (``(ceil(H0/step), ceil(W0/step))``); the legend is to its right.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    info = label_map_info(labels_h5)
    _check_tissues(info, tissues)
    labels, _ = read_label_thumbnail(info.path, max_side)
    h, w = labels.shape
    if thumbnail is None:
        base = np.full((h, w, 3), 255, np.uint8)
    else:
        base = _resize_nearest(_as_rgb(thumbnail), (h, w))
    if not labels.any():
        warnings.warn(f"label map {info.path} has no labelled pixel", stacklevel=2)
    lut = np.zeros((256, 3), np.float32)
    for t in tissues:
        lut[t.label] = t.rgb
    blend = base.astype(np.float32)
    fg = labels > 0
    blend[fg] = (1.0 - alpha) * blend[fg] + alpha * lut[labels[fg]]
    blend = np.clip(np.rint(blend, out=blend), 0, 255).astype(np.uint8)

    legend = _legend_image(tissues)
    canvas = np.full((max(h, legend.shape[0]), w + legend.shape[1], 3), 255, np.uint8)
    canvas[:h, :w] = blend
    canvas[: legend.shape[0], w:] = legend
    out_png = Path(out_png)
    write_png(out_png, canvas)
    return out_png


def _legend_image(tissues: TissueTable, font: float = 10.0) -> np.ndarray:
    """RGB uint8 legend (one colour patch and name per tissue) drawn with matplotlib Agg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dpi = 100
    names = [f"{t.name} ({t.key})" for t in tissues]
    width = int(70 + 0.62 * font * dpi / 72 * max(len(n) for n in names))
    rows = int(40 + 2.0 * font * dpi / 72 * (len(names) + 1))
    fig = Figure(figsize=(width / dpi, rows / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    handles = [
        Patch(facecolor=t.color, edgecolor="black", linewidth=0.5, label=n)
        for t, n in zip(tissues, names, strict=True)
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        frameon=False,
        fontsize=font,
        title="tissue",
        handlelength=2.0,
        handleheight=1.5,
    )
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 (h, w, 3|4), got {img.dtype} {img.shape}")
    return img[:, :, :3]


def _resize_nearest(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(h, w, C)`` to ``shape`` sampling at pixel centres."""
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * img.shape[0] / h).astype(np.int64), img.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * img.shape[1] / w).astype(np.int64), img.shape[1] - 1)
    return img[rows[:, None], cols[None, :]]


# -- block scanning (shared by the GeoJSON and the areas) ----------------------------------------
@dataclass(frozen=True)
class _Block:
    """A core block of the level-0 map and the window read around it (half-open bounds)."""

    r0: int
    r1: int
    c0: int
    c1: int
    wr0: int
    wr1: int
    wc0: int
    wc1: int


def _blocks(shape: tuple[int, int], size: int, margin: int) -> Iterator[_Block]:
    """Blocks of ``size x size``; windows add 1 context pixel above/left and ``margin`` below/right.

    An object belongs to the block that contains the top-left corner of its bounding box
    (its minimum row and minimum column): every object has exactly one owner. The context
    row/column shows whether a visible piece continues above or left of the core; the margin lets
    an owned object up to ``margin`` pixels tall and wide lie entirely inside the window (one
    that reaches the window's bottom or right edge, unless that is the slide's, may be clipped).
    """
    h, w = shape
    for r0 in range(0, h, size):
        for c0 in range(0, w, size):
            r1, c1 = min(h, r0 + size), min(w, c0 + size)
            yield _Block(
                r0,
                r1,
                c0,
                c1,
                max(0, r0 - 1),
                min(h, r1 + margin),
                max(0, c0 - 1),
                min(w, c1 + margin),
            )


@dataclass
class _Window:
    """The objects owned by one block, all tissues together.

    Attributes:
        block: where the window lies.
        core_counts: int64 ``(256,)`` bincount of the core's label values.
        labels: label value of each owned object (objects with >= min_area_px pixels).
        sizes: pixel count of each object.
        clipped: object touches a window edge that is not the slide's edge.
        parts: int32 window-sized map of 4-connected parts of the owned objects (ids 1..P,
            0 elsewhere), or None when not requested.
        part_object: int64 ``(P + 1,)`` object index of each part id (entry 0 unused).
    """

    block: _Block
    core_counts: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    clipped: np.ndarray
    parts: np.ndarray | None = None
    part_object: np.ndarray | None = None


def _bincount(arr: np.ndarray, minlength: int, rows: int = 256) -> np.ndarray:
    """``np.bincount(arr.ravel())`` in row chunks (bincount copies its input to int64)."""
    out = np.zeros(minlength, np.int64)
    for r0 in range(0, arr.shape[0], rows):
        out += np.bincount(arr[r0 : r0 + rows].ravel(), minlength=minlength)[:minlength]
    return out


def _scan(
    info: LabelMapInfo,
    labels: list[int],
    block: int,
    margin: int,
    min_area_px: int,
    parts: bool = False,
    desc: str | None = None,
) -> Iterator[_Window]:
    """Yield the owned objects of each block of the label map (8-connected components).

    Summing ``core_counts`` over windows counts every pixel once; every object of at least
    ``min_area_px`` pixels is listed by exactly one window. With ``desc``, a tqdm bar so named
    counts the blocks.
    """
    if block < 1 or margin < 0:
        raise ValueError(f"strip must be >= 1 and margin >= 0, got {block} and {margin}")
    h, w = info.shape
    wanted = np.zeros(256, bool)
    wanted[labels] = True
    wanted[0] = False
    n_blocks = -(-h // block) * -(-w // block)
    with (
        h5py.File(info.path, "r") as fh,
        progress_bar(
            total=n_blocks, desc=desc or "", unit="block", enabled=desc is not None
        ) as bar,
    ):
        dset = fh[LABELS_DATASET]
        for b in _blocks(info.shape, block, margin):
            bar.update()
            win = dset[b.wr0 : b.wr1, b.wc0 : b.wc1]
            counts = _bincount(win[b.r0 - b.wr0 : b.r1 - b.wr0, b.c0 - b.wc0 : b.c1 - b.wc0], 256)
            present = np.flatnonzero((_bincount(win, 256) > 0) & wanted)
            out = _Window(b, counts, *(np.zeros(0, t) for t in (np.int64, np.int64, bool)))
            found: list[tuple] = []
            part_map = np.zeros(win.shape, np.int32) if parts else None
            part_object = [np.full(1, -1, np.int64)]
            n_obj = n_part = 0
            for label in present.tolist():
                lab8, n = ndimage.label(win == label, structure=_EIGHT)
                boxes = ndimage.find_objects(lab8)
                top = np.fromiter((s[0].start for s in boxes), np.int64, n) + b.wr0
                left = np.fromiter((s[1].start for s in boxes), np.int64, n) + b.wc0
                bottom = np.fromiter((s[0].stop for s in boxes), np.int64, n) + b.wr0
                right = np.fromiter((s[1].stop for s in boxes), np.int64, n) + b.wc0
                sizes = _bincount(lab8, n + 1)[1:]
                owned = (top >= b.r0) & (top < b.r1) & (left >= b.c0) & (left < b.c1)
                idx = np.flatnonzero(owned & (sizes >= min_area_px))
                if not idx.size:
                    continue
                clipped = ((bottom == b.wr1) & (b.wr1 < h)) | ((right == b.wc1) & (b.wc1 < w))
                found.append((np.full(idx.size, label), sizes[idx], clipped[idx]))
                if parts:
                    lut = np.zeros(n + 1, np.int32)
                    lut[idx + 1] = np.arange(1, idx.size + 1, dtype=np.int32) + n_obj
                    obj = lut[lab8]
                    del lab8
                    mask = obj > 0
                    lab4, n4 = ndimage.label(mask, structure=_FOUR)
                    where = np.flatnonzero(mask)
                    owner = np.zeros(n4 + 1, np.int64)
                    owner[lab4.ravel()[where]] = obj.ravel()[where] - 1
                    np.add(lab4, n_part, out=lab4, where=mask)
                    part_map += lab4
                    part_object.append(owner[1:])
                    n_part += n4
                n_obj += idx.size
            if found:
                out.labels, out.sizes, out.clipped = (
                    np.concatenate(a) for a in zip(*found, strict=True)
                )
            if parts:
                out.parts, out.part_object = part_map, np.concatenate(part_object)
            yield out


def _warn_clipped(path: Path, n: int, margin: int) -> None:
    if n:
        warnings.warn(
            f"label map {path}: {n} object(s) are taller or wider than the margin "
            f"({margin} px) and were emitted clipped; raise `margin`",
            stacklevel=3,
        )


# -- GeoJSON -------------------------------------------------------------------------------------
def labels_to_geojson(
    labels_h5: str | Path,
    out_geojson: str | Path,
    tissues: TissueTable,
    *,
    strip: int = 4096,
    margin: int = 512,
    simplify_px: float = 1.0,
    min_area_px: int = 16,
    object_type: str = "annotation",
    progress: bool = True,
) -> Path:
    """Write one classified QuPath object per connected object per tissue.

    Objects are 8-connected components of each tissue's pixels. The map is processed in blocks
    of ``strip x strip`` level-0 pixels (horizontal strips of a narrow slide) read with ``margin``
    extra pixels below and right; an object belongs to the block holding the top-left corner of
    its bounding box, so objects crossing block borders are emitted once and whole as long as
    they are at most ``margin`` pixels tall and wide. Larger objects are emitted clipped, with a
    warning. Memory: about 25 bytes per pixel of one ``(strip + margin)^2`` window (~0.5 GB at
    the defaults), whatever the slide size.

    Geometry: rings follow pixel corners (a 1-pixel object is a unit square), in level-0
    ``(x, y) = (col, row)``; outer rings are counter-clockwise in that frame (positive shoelace
    area), holes clockwise; rings are closed. An object whose pixels touch only diagonally
    somewhere is a MultiPolygon of its 4-connected parts (a valid polygon's interior is
    connected), else a Polygon. Every object is valid in the OGC sense of JTS/GEOS, which QuPath
    uses (checked with shapely, see :mod:`omniseg.wsi.geometry`). With ``simplify_px = 0`` only
    collinear vertices are removed and polygon areas equal pixel counts exactly; with
    ``simplify_px > 0`` rings are simplified (Douglas-Peucker, that tolerance in pixels; vertices
    stay integral pixel corners) and an object whose simplified polygons are not valid (a ring
    crossing itself or another) keeps its exact outline.

    Properties: ``objectType`` (``object_type``), ``classification = {"name": tissue name,
    "color": [r, g, b]}``, ``measurements = {"area_um2": pixel count x mpp^2 (exact),
    "area_px": pixel count}`` (QuPath keeps the numbers under ``measurements`` and drops other
    keys on import), ``tissue`` (key) and ``clipped: true`` on clipped objects.

    Args:
        labels_h5: the aggregated label map.
        out_geojson: output FeatureCollection, written atomically.
        tissues: registry (names, colours); must match the file's label table.
        strip: block side in level-0 pixels.
        margin: look-ahead below/right of each block; must exceed the tallest/widest object.
        simplify_px: Douglas-Peucker tolerance in pixels (0 = exact pixel outlines).
        min_area_px: objects with fewer pixels are dropped.
        object_type: QuPath object type of every feature: ``"annotation"`` (editable, suited
            to a few large objects) or ``"detection"`` (light, for many objects: QuPath draws
            tens of thousands of detections fluently but annotations slowly).
        progress: show a tqdm bar over the blocks.

    Returns:
        ``out_geojson`` as a Path. An empty label map gives an empty FeatureCollection and a
        warning.
    """
    if object_type not in QUPATH_OBJECT_TYPES:
        raise ValueError(
            f"object_type must be one of {', '.join(QUPATH_OBJECT_TYPES)}, got {object_type!r}"
        )
    info = label_map_info(labels_h5)
    _check_tissues(info, tissues)
    by_label = {t.label: t for t in tissues}
    classes = {t.label: {"name": t.name, "color": list(t.rgb)} for t in tissues}
    out_geojson = Path(out_geojson)
    n_features = n_clipped = 0
    any_label = False
    with atomic_path(out_geojson) as tmp, tmp.open("w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        desc = "tissues.geojson" if progress else None
        for win in _scan(info, list(by_label), strip, margin, min_area_px, True, desc):
            any_label |= bool(win.core_counts[1:].any())
            if not win.labels.size:
                continue
            n_clipped += int(win.clipped.sum())
            for k, geometry in _window_geometries(win, simplify_px):
                label, area_px = int(win.labels[k]), int(win.sizes[k])
                props = {
                    "objectType": object_type,
                    "classification": classes[label],
                    "measurements": {
                        "area_um2": round(area_px * info.mpp**2, 6),
                        "area_px": area_px,
                    },
                    "tissue": by_label[label].key,
                }
                if win.clipped[k]:
                    props["clipped"] = True
                feature = {"type": "Feature", "geometry": geometry, "properties": props}
                fh.write(("," if n_features else "") + "\n")
                fh.write(json.dumps(feature, separators=(",", ":")))
                n_features += 1
        fh.write("\n]}\n")
    if not any_label:
        warnings.warn(
            f"label map {info.path} has no labelled pixel; wrote an empty FeatureCollection",
            stacklevel=2,
        )
    _warn_clipped(info.path, n_clipped, margin)
    return out_geojson


def _window_geometries(win: _Window, simplify_px: float) -> Iterator[tuple[int, dict]]:
    """Yield ``(object index, GeoJSON geometry)`` for every owned object of a window."""
    rings = trace_rings(win.parts)
    if not len(rings):
        return
    objects = Objects.group(rings, win.part_object[rings.comp])
    if simplify_px > 0:
        simple = simplify_rings(rings, simplify_px)
        use_simple, repaired = valid_outlines(rings, simple, objects)
    else:  # exact outlines of 4-connected parts are valid by construction (omniseg.wsi.geometry)
        simple, use_simple, repaired = rings, np.ones(len(objects), bool), {}
    x0, y0 = win.block.wc0, win.block.wr0
    exact_xy = simple_xy = None
    order, polygon, start = objects.order, objects.polygon, objects.start.tolist()
    for k, valid in enumerate(use_simple.tolist()):
        index = int(win.part_object[rings.comp[order[start[k]]]])
        if k in repaired:
            yield index, _geojson(_repaired_polygons(repaired[k], x0, y0))
            continue
        if valid:
            if simple_xy is None:
                simple_xy = np.stack([simple.x + x0, simple.y + y0], axis=1).tolist()
            src, xy = simple, simple_xy
        else:
            if exact_xy is None:
                exact_xy = np.stack([rings.x + x0, rings.y + y0], axis=1).tolist()
            src, xy = rings, exact_xy
        polygons: list[list] = []
        last = -1
        for i, p in zip(
            order[start[k] : start[k + 1]].tolist(),
            polygon[start[k] : start[k + 1]].tolist(),
            strict=True,
        ):
            s, e = int(src.start[i]), int(src.start[i + 1])
            ring = xy[s:e]
            ring.append(ring[0])
            if p == last:  # a hole of the current polygon
                polygons[-1].append(ring)
            else:  # the polygon's shell, sorted first
                polygons.append([ring])
                last = p
        yield index, _geojson(polygons)


def _geojson(polygons: list[list]) -> dict:
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _repaired_polygons(geometry: shapely.Geometry, x0: int, y0: int) -> list[list]:
    """GeoJSON polygon coordinates of a repaired (polygonal, oriented) geometry, shifted to
    level 0; its vertices are integral (see :func:`valid_outlines`)."""
    shift = np.array([x0, y0])
    return [
        [
            (np.rint(np.asarray(r.coords)).astype(np.int64) + shift).tolist()
            for r in (p.exterior, *p.interiors)
        ]
        for p in shapely.get_parts(geometry)
    ]


# -- areas ---------------------------------------------------------------------------------------
def tissue_areas(
    labels_h5: str | Path,
    out_csv: str | Path,
    tissues: TissueTable,
    *,
    strip: int = 4096,
    margin: int = 512,
    min_area_px: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-tissue object counts and areas, written as CSV (a tqdm bar over the blocks when
    ``progress``).

    Columns: ``tissue`` (key), ``name``, ``label``, ``objects`` (8-connected components with at
    least ``min_area_px`` pixels, counted with the same block ownership as
    :func:`labels_to_geojson`, so it equals that tissue's feature count for the same
    ``strip``/``margin``/``min_area_px``), ``area_px`` (all pixels of the tissue), ``area_mm2``
    (``area_px * mpp^2 / 1e6``) and ``fraction_of_tissue`` (``area_px / tissue_area_px``, NaN when
    the file does not record the tissue area or it is 0). One row per tissue of the table, in
    table order.

    Returns:
        The table as a DataFrame. An empty label map gives zero rows' values and a warning.
    """
    info = label_map_info(labels_h5)
    _check_tissues(info, tissues)
    labels = [t.label for t in tissues]
    area = np.zeros(256, np.int64)
    objects = np.zeros(256, np.int64)
    n_clipped = 0
    for win in _scan(info, labels, strip, margin, min_area_px, desc="areas" if progress else None):
        area += win.core_counts
        np.add.at(objects, win.labels, 1)
        n_clipped += int(win.clipped.sum())
    if not area[labels].any():
        warnings.warn(f"label map {info.path} has no labelled pixel; all areas are 0", stacklevel=2)
    _warn_clipped(info.path, n_clipped, margin)
    total = info.tissue_area_px
    df = pd.DataFrame(
        {
            "tissue": [t.key for t in tissues],
            "name": [t.name for t in tissues],
            "label": labels,
            "objects": objects[labels],
            "area_px": area[labels],
            "area_mm2": area[labels] * info.mpp**2 / 1e6,
            "fraction_of_tissue": area[labels] / total if total else np.nan,
        }
    )
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df
