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
import tifffile
from scipy import ndimage

from omniseg.io import atomic_path, write_png
from omniseg.progress import progress as progress_bar
from omniseg.tissues import TissueTable

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
    """

    path: Path
    shape: tuple[int, int]
    chunks: tuple[int, int] | None
    mpp: float
    label_table: dict[int, str]
    tissues: TissueTable | None
    tissue_area_px: int | None


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
        return LabelMapInfo(
            path=path,
            shape=(int(dset.shape[0]), int(dset.shape[1])),
            chunks=tuple(int(c) for c in dset.chunks) if dset.chunks else None,
            mpp=mpp,
            label_table=table,
            tissues=tissues,
            tissue_area_px=area,
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
    area), holes clockwise; rings are closed and simple. An object whose pixels touch only
    diagonally somewhere is a MultiPolygon of its 4-connected parts (a valid polygon's interior is
    connected), else a Polygon. With ``simplify_px = 0`` only collinear vertices are removed and
    polygon areas equal pixel counts exactly; with ``simplify_px > 0`` rings are simplified
    (Douglas-Peucker, that tolerance in pixels) except in objects where that would make two edges
    cross or overlap.

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
    simple = simplify_rings(rings, simplify_px) if simplify_px > 0 else rings
    obj = win.part_object[rings.comp]
    hole = rings.area2() < 0
    order = np.lexsort((hole, rings.comp, obj))  # object by object, each part's shell first
    bounds = np.flatnonzero(np.diff(obj[order])) + 1
    groups = np.split(order, bounds)
    ok = _groups_valid(simple, groups) if simple is not rings else np.ones(len(groups), bool)
    x0, y0 = win.block.wc0, win.block.wr0
    exact_xy = simple_xy = None
    for group, valid in zip(groups, ok.tolist(), strict=True):
        if valid:
            if simple_xy is None:
                simple_xy = np.stack([simple.x + x0, simple.y + y0], axis=1).tolist()
            src, xy = simple, simple_xy
        else:
            if exact_xy is None:
                exact_xy = np.stack([rings.x + x0, rings.y + y0], axis=1).tolist()
            src, xy = rings, exact_xy
        polygons: list[list] = []
        for i in group.tolist():
            s, e = int(src.start[i]), int(src.start[i + 1])
            ring = xy[s:e]
            ring.append(ring[0])
            if hole[i]:
                polygons[-1].append(ring)
            else:  # every 4-connected part has exactly one outer ring, sorted first
                polygons.append([ring])
        if len(polygons) == 1:
            yield int(obj[group[0]]), {"type": "Polygon", "coordinates": polygons[0]}
        else:
            yield int(obj[group[0]]), {"type": "MultiPolygon", "coordinates": polygons}


# -- contour tracing -----------------------------------------------------------------------------
@dataclass
class Rings:
    """Closed rings stored back to back (the closing vertex is not repeated).

    Attributes:
        x: int64 ``(N,)`` vertex x (column of the pixel corner).
        y: int64 ``(N,)`` vertex y (row of the pixel corner).
        start: int64 ``(R + 1,)``: ring ``i`` is ``x[start[i]:start[i+1]]``.
        comp: int64 ``(R,)``: region id of the pixels on each ring's inner side.
    """

    x: np.ndarray
    y: np.ndarray
    start: np.ndarray
    comp: np.ndarray

    def __len__(self) -> int:
        return len(self.comp)

    def ring(self, i: int) -> np.ndarray:
        """Vertices of ring ``i`` as int64 ``(n, 2)`` ``(x, y)``."""
        s, e = self.start[i], self.start[i + 1]
        return np.stack([self.x[s:e], self.y[s:e]], axis=1)

    def next_vertex(self) -> np.ndarray:
        """Index of the following vertex in the same ring, for every vertex."""
        nxt = np.arange(1, len(self.x) + 1)
        if len(self):
            nxt[self.start[1:] - 1] = self.start[:-1]
        return nxt

    def area2(self) -> np.ndarray:
        """Twice the signed (shoelace) area of each ring: > 0 outer rings, < 0 holes."""
        if not len(self):
            return np.zeros(0, np.int64)
        nxt = self.next_vertex()
        cross = self.x * self.y[nxt] - self.x[nxt] * self.y
        return np.add.reduceat(cross, self.start[:-1])


def trace_rings(regions: np.ndarray) -> Rings:
    """Trace the pixel-corner outlines of labelled regions, vectorised (no per-pixel loop).

    Every pixel edge between a region pixel and a pixel outside that region (background or
    another region) is a directed boundary edge with the region on its left in the ``(x, y)``
    frame (x = column, y = row), which makes outer rings positive and holes negative in shoelace
    area. At a corner the ring continues right if the pixel ahead-right is in the region, else
    straight if the pixel ahead-left is, else left: where two pixels of one region touch only
    diagonally the ring joins them. With 4-connected regions (e.g. ``ndimage.label`` default),
    diagonal touches only join pixels of one region through other pixels, so every ring is
    simple, and each region has one outer ring plus one ring per hole.

    Args:
        regions: int ``(H, W)`` region ids, 0 = background.

    Returns:
        :class:`Rings` with vertices in the array's pixel-corner frame (``0 <= x <= W``,
        ``0 <= y <= H``), collinear vertices removed.
    """
    h, w = regions.shape
    pad = np.zeros((h + 2, w + 2), np.int32 if regions.max(initial=0) < 2**31 else np.int64)
    pad[1:-1, 1:-1] = regions
    # horizontal edges between padded rows i and i+1 lie on corner row y = i + 1;
    # vertical edges between padded columns j and j+1 on corner column x = j + 1
    top, bot = pad[:-1], pad[1:]
    hdiff = top != bot
    i0, j0 = np.nonzero(hdiff & (bot > 0))  # +x, region below
    i2, j2 = np.nonzero(hdiff & (top > 0))  # -x, region above
    del top, bot, hdiff
    left, right = pad[:, :-1], pad[:, 1:]
    vdiff = left != right
    i1, j1 = np.nonzero(vdiff & (left > 0))  # +y, region left
    i3, j3 = np.nonzero(vdiff & (right > 0))  # -y, region right
    del left, right, vdiff
    # start vertices (x, y) and region per direction 0: +x, 1: +y, 2: -x, 3: -y; each list is
    # sorted by start vertex id y * stride + x because nonzero returns raster order
    sx = [j0, j1 + 1, j2 + 1, j3 + 1]
    sy = [i0 + 1, i1, i2 + 1, i3 + 1]
    fg = [pad[i0 + 1, j0], pad[i1, j1], pad[i2, j2], pad[i3, j3 + 1]]
    sizes = [len(a) for a in sx]
    n = sum(sizes)
    if n == 0:
        z = np.zeros(0, np.int64)
        return Rings(z, z, np.zeros(1, np.int64), z)
    base = np.cumsum([0, *sizes])
    stride = w + 3
    sid = [y * stride + x for x, y in zip(sx, sy, strict=True)]
    sx, sy, fg = np.concatenate(sx), np.concatenate(sy), np.concatenate(fg)
    d = np.repeat(np.arange(4, dtype=np.int64), sizes)
    ex = sx + np.array([1, 0, -1, 0])[d]
    ey = sy + np.array([0, 1, 0, -1])[d]
    # pixels ahead-left / ahead-right of the end vertex (row, col) for each direction
    al = pad[ey + np.array([0, 0, -1, -1])[d], ex + np.array([0, -1, -1, 0])[d]]
    ar = pad[ey + np.array([-1, 0, 0, -1])[d], ex + np.array([0, 0, -1, -1])[d]]
    nd = np.where(ar == fg, (d + 3) % 4, np.where(al == fg, d, (d + 1) % 4))
    eid = ey * stride + ex
    succ = np.empty(n, np.int64)
    for k in range(4):
        sel = np.flatnonzero(nd == k)
        succ[sel] = base[k] + np.searchsorted(sid[k], eid[sel])

    # cycles of the permutation ``succ``: label = smallest edge index (pointer jumping), then
    # each edge's distance to the end of its cycle (list ranking)
    longest = int(np.bincount(fg).max())  # no ring is longer than its region's boundary
    rounds = max(1, int(np.ceil(np.log2(max(longest, 2)))) + 1)
    lab = np.arange(n)
    nxt = succ.copy()
    for _ in range(rounds):
        lab = np.minimum(lab, lab[nxt])
        nxt = nxt[nxt]
    last = succ == lab  # edges whose successor starts their cycle
    dist = (~last).astype(np.int64)
    nxt = np.where(last, np.arange(n), succ)
    for _ in range(rounds):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    starts = np.flatnonzero(lab == np.arange(n))  # cycle starts, in increasing order
    offset = np.cumsum(dist[starts] + 1) - (dist[starts] + 1)
    cycle = np.zeros(n, np.int64)
    cycle[starts] = np.arange(len(starts))
    pos = offset[cycle[lab]] + dist[lab] - dist
    seq = np.empty(n, np.int64)
    seq[pos] = np.arange(n)  # edges cycle by cycle, in tracing order

    d_s = d[seq]
    prev = np.arange(n) - 1
    prev[offset] = np.r_[offset[1:], n] - 1
    corner = d_s != d_s[prev]  # drop vertices where the direction does not change
    ring_of = np.repeat(np.arange(len(starts)), dist[starts] + 1)[corner]
    keep = seq[corner]
    return Rings(
        x=sx[keep] - 1,
        y=sy[keep] - 1,
        start=np.searchsorted(ring_of, np.arange(len(starts) + 1)).astype(np.int64),
        comp=fg[starts].astype(np.int64),
    )


# -- simplification and validity -----------------------------------------------------------------
def simplify_rings(rings: Rings, tolerance: float) -> Rings:
    """Douglas-Peucker simplification of every ring at once (vectorised over rings).

    Each ring is split at its first vertex and the vertex farthest from it; kept vertices are a
    subset of the original ones, so coordinates stay integral. A ring that would keep fewer than
    3 vertices is returned unchanged.

    Args:
        rings: input rings.
        tolerance: maximum distance in pixels between a removed vertex and the simplified ring.
    """
    r = len(rings)
    if r == 0 or tolerance <= 0:
        return rings
    lengths = np.diff(rings.start)
    # closed copies: each ring's vertices followed by its first vertex again
    cstart = rings.start[:-1] + np.arange(r)
    total = len(rings.x) + r
    closing = cstart + lengths
    pos = np.ones(total, bool)
    pos[closing] = False
    x = np.empty(total, np.float64)
    y = np.empty(total, np.float64)
    x[pos], y[pos] = rings.x, rings.y
    x[closing], y[closing] = rings.x[rings.start[:-1]], rings.y[rings.start[:-1]]
    ring_id = np.repeat(np.arange(r), lengths + 1)
    first = cstart[ring_id]
    far_d = (x - x[first]) ** 2 + (y - y[first]) ** 2
    keep = np.zeros(total, bool)
    keep[cstart] = True
    keep[closing] = True
    keep[_first_argmax(far_d, cstart, ring_id)] = True

    idx = np.arange(total)
    while True:
        prev = np.maximum.accumulate(np.where(keep, idx, 0))
        nxt = np.minimum.accumulate(np.where(keep, idx, total)[::-1])[::-1]
        dist = _segment_distance(x, y, x[prev], y[prev], x[nxt], y[nxt])
        dist[keep] = -1.0
        kept = np.flatnonzero(keep)
        gmax = np.maximum.reduceat(dist, kept)
        split = _first_argmax(dist, kept, np.cumsum(keep) - 1, gmax)
        split = split[dist[split] > tolerance]
        if not split.size:
            break
        keep[split] = True

    keep[closing] = False
    counts = np.bincount(ring_id[keep], minlength=r)
    revert = counts < 3
    keep[pos] |= np.repeat(revert, lengths)
    keep[closing] = False
    xs, ys = x[keep].astype(np.int64), y[keep].astype(np.int64)
    counts = np.bincount(ring_id[keep], minlength=r)
    return Rings(xs, ys, np.r_[0, np.cumsum(counts)].astype(np.int64), rings.comp)


def _first_argmax(
    values: np.ndarray, starts: np.ndarray, group: np.ndarray, gmax: np.ndarray | None = None
) -> np.ndarray:
    """Index of the first maximum of ``values`` in each contiguous group (groups start at
    ``starts``; ``group`` gives each element's group number)."""
    if gmax is None:
        gmax = np.maximum.reduceat(values, starts)
    hit = np.flatnonzero(values == gmax[group])
    _, first = np.unique(group[hit], return_index=True)
    return hit[first]


def _segment_distance(px, py, ax, ay, bx, by) -> np.ndarray:
    """Euclidean distance of points ``p`` to segments ``a-b`` (degenerate segments allowed)."""
    vx, vy = bx - ax, by - ay
    den = vx * vx + vy * vy
    t = np.where(den > 0, ((px - ax) * vx + (py - ay) * vy) / np.where(den > 0, den, 1), 0.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (ax + t * vx), py - (ay + t * vy))


def rings_valid(rings: list[np.ndarray], chunk: int = 512) -> bool:
    """True if no two edges of the given integer rings cross or overlap.

    Edges may share end points (consecutive edges of a ring; rings touching at a vertex), but an
    edge end point may not lie inside another edge, edges may not cross or coincide, and every
    ring needs at least 3 vertices. Exact integer arithmetic; ``O(E^2)`` in chunks of ``chunk``
    edges.

    Args:
        rings: int ``(n_i, 2)`` ``(x, y)`` vertex arrays, not closed (first vertex not repeated).
    """
    if any(len(r) < 3 for r in rings):
        return False
    a = np.concatenate(rings).astype(np.int64)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings]).astype(np.int64)
    n = len(a)
    for s in range(0, n, chunk):
        bad = _bad_pairs(a[s : s + chunk, None], b[s : s + chunk, None], a[None], b[None])
        bad &= np.arange(s, min(n, s + chunk))[:, None] != np.arange(n)[None, :]
        if bad.any():
            return False
    return True


def _groups_valid(rings: Rings, groups: list[np.ndarray], cell: int = 8) -> np.ndarray:
    """:func:`rings_valid` for many groups of rings at once (one group = one object).

    Only edges whose bounding boxes share a ``cell x cell`` grid cell can touch, so edges are
    hashed to the cells their bounding box covers and only pairs within one cell of one group
    are tested: about linear in the number of edges, vectorised over all groups.
    """
    out = np.ones(len(groups), bool)
    if not groups:
        return out
    lengths = np.diff(rings.start)
    out &= np.array([(lengths[g] >= 3).all() for g in groups])
    group_of_ring = np.zeros(len(rings), np.int64)
    for k, g in enumerate(groups):
        group_of_ring[g] = k
    ring_of_vertex = np.repeat(np.arange(len(rings)), lengths)
    group = group_of_ring[ring_of_vertex]
    nxt = rings.next_vertex()
    x1, y1, x2, y2 = rings.x, rings.y, rings.x[nxt], rings.y[nxt]
    cx0, cx1 = np.minimum(x1, x2) // cell, np.maximum(x1, x2) // cell
    cy0, cy1 = np.minimum(y1, y2) // cell, np.maximum(y1, y2) // cell
    wx = cx1 - cx0 + 1
    count = wx * (cy1 - cy0 + 1)
    seg = np.repeat(np.arange(len(x1)), count)
    k = np.arange(len(seg)) - np.repeat(np.cumsum(count) - count, count)
    cx, cy = cx0[seg] + k % wx[seg], cy0[seg] + k // wx[seg]
    ncx = int(cx.max(initial=0)) + 1
    key = (group[seg] * (int(cy.max(initial=0)) + 1) + cy) * ncx + cx
    order = np.argsort(key, kind="stable")
    seg, key = seg[order], key[order]
    first = np.r_[True, key[1:] != key[:-1]]
    gstart = np.flatnonzero(first)
    gsize = np.diff(np.r_[gstart, len(key)])
    size = np.repeat(gsize, gsize)  # size of each entry's cell group
    start = np.repeat(gstart, gsize)
    pos = np.arange(len(key))
    # pairs (entry, later entry of the same cell group)
    n_after = start + size - pos - 1
    left = np.repeat(pos, n_after)
    right = left + 1 + (np.arange(len(left)) - np.repeat(np.cumsum(n_after) - n_after, n_after))
    a, b = seg[left], seg[right]
    xy1 = np.stack([x1, y1], axis=1)
    xy2 = np.stack([x2, y2], axis=1)
    bad = _bad_pairs(xy1[a], xy2[a], xy1[b], xy2[b])
    out[np.unique(group[a[bad]])] = False
    return out


def _bad_pairs(p1, p2, q1, q2) -> np.ndarray:
    """Edges ``p1-p2`` and ``q1-q2`` (broadcast, ``(..., 2)`` integer) cross, overlap, coincide
    or touch with an end point inside the other edge (shared end points are fine)."""
    o1, o2 = _orient(p1, p2, q1), _orient(p1, p2, q2)
    o3, o4 = _orient(q1, q2, p1), _orient(q1, q2, p2)
    bad = (o1 * o2 < 0) & (o3 * o4 < 0)
    bad |= (o1 == 0) & _strictly_inside(p1, p2, q1)
    bad |= (o2 == 0) & _strictly_inside(p1, p2, q2)
    bad |= (o3 == 0) & _strictly_inside(q1, q2, p1)
    bad |= (o4 == 0) & _strictly_inside(q1, q2, p2)
    bad |= (_eq(p1, q1) & _eq(p2, q2)) | (_eq(p1, q2) & _eq(p2, q1))
    return bad


def _orient(a, b, c) -> np.ndarray:
    return np.sign(
        (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1])
        - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    )


def _eq(a, b) -> np.ndarray:
    return (a[..., 0] == b[..., 0]) & (a[..., 1] == b[..., 1])


def _strictly_inside(a, b, p) -> np.ndarray:
    """For ``p`` collinear with segment ``a-b``: ``p`` lies between them, not at an end."""
    dot1 = (p[..., 0] - a[..., 0]) * (b[..., 0] - a[..., 0]) + (p[..., 1] - a[..., 1]) * (
        b[..., 1] - a[..., 1]
    )
    dot2 = (p[..., 0] - b[..., 0]) * (a[..., 0] - b[..., 0]) + (p[..., 1] - b[..., 1]) * (
        a[..., 1] - b[..., 1]
    )
    return (dot1 > 0) & (dot2 > 0)


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
