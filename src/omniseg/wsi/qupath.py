"""Training data from your own slides: QuPath GeoJSON annotations -> 40x ROIs + partial masks.

Users annotate tissues in QuPath and export the annotations as GeoJSON (File > Export objects as
GeoJSON; a FeatureCollection or a plain list of features). :func:`import_qupath` maps the
QuPath class names to tissue keys, cuts 40x ROIs around the annotated objects of each tissue,
rasterises that tissue's polygons in each ROI as its (partial) mask and writes the ROIs in the
sample-sheet format read by :func:`omniseg.data.sheet.load_sheet`.

QuPath objects: only ``objectType: annotation`` features are imported by default (detections
and cells, e.g. from a cell detection run, are skipped and counted in the log); features nested
under ``childObjects`` (QuPath's hierarchy) are walked. A class is read from
``classification.name``, or from ``classification.names`` (QuPath >= 0.4 writes the parts of a
derived class such as ``["Glomerulus", "Tuft"]`` instead of ``name``).

Coordinates: GeoJSON vertices are level-0 ``(x, y) = (col, row)`` of the slide with ``(0, 0)``
at the top-left corner of the top-left pixel (QuPath's convention). A pixel belongs to a polygon
when its centre ``(col + 0.5, row + 0.5)`` is inside it (even-odd rule), so pixel-corner
outlines as written by :func:`omniseg.wsi.export.labels_to_geojson` round-trip exactly.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from omniseg.io import atomic_path, write_png
from omniseg.progress import progress as progress_bar
from omniseg.tissues import SOURCE_UM_PER_PX, TissueTable
from omniseg.wsi.slide import Slide

log = logging.getLogger(__name__)

#: Largest plain (untiled, compressed) image read whole when OpenSlide cannot open it.
MAX_PLAIN_PIXELS = 2**28
#: Allowed relative difference between the slide's pixel size and 0.25 um/px.
MPP_TOLERANCE = 0.1

Polygon = list[np.ndarray]  # rings, each float (n, 2) (x, y), not closed


# -- GeoJSON -------------------------------------------------------------------------------------
def read_geojson_features(path: str | Path) -> list[dict]:
    """Load the features of a GeoJSON file.

    Accepts a FeatureCollection, a single Feature, or a plain list of features (QuPath writes
    either).

    Raises:
        ValueError: naming the file, if it is not valid JSON, not GeoJSON features, or has none.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"GeoJSON {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"GeoJSON {path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and isinstance(data.get("features"), list):
        features = data["features"]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError(f"GeoJSON {path} is neither a FeatureCollection nor a list of features")
    if not features:
        raise ValueError(f"GeoJSON {path} has no features")
    bad = [i for i, f in enumerate(features) if not isinstance(f, dict)]
    if bad:
        raise ValueError(f"GeoJSON {path}: feature(s) {bad[:5]} are not JSON objects")
    return features


#: QuPath's separator of the parts of a derived class name ("Glomerulus: Tuft").
DERIVED_CLASS_SEP = ": "


def feature_class(feature: Mapping) -> str | None:
    """QuPath class name of a feature; None when unclassified.

    Read from ``properties.classification.name`` (QuPath >= 0.2), from
    ``properties.classification.names`` (QuPath >= 0.4 writes the parts of a derived class
    instead of ``name``; joined as QuPath shows them, ``"Glomerulus: Tuft"``), or a plain string
    ``properties.classification`` (older exports).
    """
    props = feature.get("properties") or {}
    cls = props.get("classification")
    if isinstance(cls, Mapping):
        names = cls.get("names")
        if cls.get("name") in (None, "") and isinstance(names, list) and names:
            cls = DERIVED_CLASS_SEP.join(str(n) for n in names)
        else:
            cls = cls.get("name")
    return str(cls) if cls not in (None, "") else None


def feature_object_type(feature: Mapping) -> str:
    """QuPath object type (``annotation``, ``detection``, ``cell``, ``tile``, ...), lower-case;
    features without one (GeoJSON from other tools) count as annotations."""
    props = feature.get("properties") or {}
    kind = props.get("objectType", feature.get("objectType"))
    return str(kind).lower() if kind not in (None, "") else "annotation"


def walk_features(features: list[Mapping]) -> Iterator[Mapping]:
    """Every feature and, depth first, the features nested under its ``childObjects`` (QuPath
    writes a parent's children there, in the feature or in its properties)."""
    stack = list(reversed(features))
    while stack:
        feature = stack.pop()
        yield feature
        props = feature.get("properties") or {}
        children = feature.get("childObjects") or props.get("childObjects") or []
        stack.extend(reversed([c for c in children if isinstance(c, Mapping)]))


def lookup_class(name: str, class_map: Mapping[str, str]) -> str | None:
    """The tissue key of a QuPath class: the whole name, else (derived classes) its most
    specific mapped part (``"Glomerulus: Tuft"`` -> the key of ``Tuft``)."""
    if name in class_map:
        return class_map[name]
    for part in reversed(name.split(DERIVED_CLASS_SEP)):
        if part.strip() in class_map:
            return class_map[part.strip()]
    return None


def feature_polygons(geometry: Mapping | None) -> list[Polygon]:
    """Polygons of a GeoJSON geometry (Polygon, MultiPolygon, GeometryCollection).

    Returns:
        A list of polygons; each is a list of rings (outer ring first), each ring a float
        ``(n, 2)`` array of ``(x, y)`` with the closing vertex removed. Other geometry types give
        an empty list.
    """
    if not geometry:
        return []
    kind = geometry.get("type")
    if kind == "Polygon":
        polys = [geometry.get("coordinates") or []]
    elif kind == "MultiPolygon":
        polys = geometry.get("coordinates") or []
    elif kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in feature_polygons(g)]
    else:
        return []
    out = []
    for poly in polys:
        rings = []
        for ring in poly:
            arr = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
            if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
                arr = arr[:-1]
            if len(arr) >= 3:
                rings.append(arr)
        if rings:
            out.append(rings)
    return out


# -- rasterisation -------------------------------------------------------------------------------
def rasterize_polygon(polygon: Polygon, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """Fill one polygon (even-odd over all its rings) on a pixel window, vectorised scanlines.

    Args:
        polygon: rings of float ``(n, 2)`` ``(x, y)`` level-0 vertices.
        x0, y0: level-0 column and row of the window's top-left pixel.
        h, w: window size in pixels.

    Returns:
        bool ``(h, w)``: pixel ``(r, c)`` is True when the centre ``(x0 + c + 0.5, y0 + r + 0.5)``
        lies inside the polygon.
    """
    out = np.zeros((h, w), bool)
    if h <= 0 or w <= 0 or not polygon:
        return out
    a = np.concatenate(polygon) - (x0, y0)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in polygon]) - (x0, y0)
    slanted = a[:, 1] != b[:, 1]
    a, b = a[slanted], b[slanted]
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    # rows whose centre r + 0.5 lies in [ylo, yhi): half-open, so shared vertices count once
    r_lo = np.clip(np.ceil(ylo - 0.5), 0, h).astype(np.int64)
    r_hi = np.clip(np.ceil(yhi - 0.5), 0, h).astype(np.int64)
    cnt = np.maximum(r_hi - r_lo, 0)
    total = int(cnt.sum())
    if total == 0:
        return out
    edge = np.repeat(np.arange(len(cnt)), cnt)
    offset = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    rows = r_lo[edge] + offset
    yc = rows + 0.5
    ax, ay, bx, by = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
    xc = ax + (yc - ay) * (bx - ax) / (by - ay)
    # a crossing at x toggles every pixel whose centre is right of it
    col = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1, 0, w)
    acc = np.bincount(rows * (w + 1) + col, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(acc[:, :w], axis=1) & 1).astype(bool)


def rasterize(polygons: list[Polygon], x0: int, y0: int, h: int, w: int) -> np.ndarray:
    """Union of :func:`rasterize_polygon` over polygons, each filled only over its bbox."""
    out = np.zeros((h, w), bool)
    for poly in polygons:
        pts = np.concatenate(poly)
        c0 = max(int(np.floor(pts[:, 0].min())), x0)
        c1 = min(int(np.ceil(pts[:, 0].max())), x0 + w)
        r0 = max(int(np.floor(pts[:, 1].min())), y0)
        r1 = min(int(np.ceil(pts[:, 1].max())), y0 + h)
        if c1 <= c0 or r1 <= r0:
            continue
        out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] |= rasterize_polygon(
            poly, c0, r0, r1 - r0, c1 - c0
        )
    return out


# -- ROI planning --------------------------------------------------------------------------------
def plan_rois(
    boxes: np.ndarray, slide_size: tuple[int, int], roi_size: int, margin: int
) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Group objects into ROIs greedily.

    Objects are taken in raster order of their top-left corners; the first object not yet in a
    ROI seeds one of ``roi_size`` (or its bbox plus ``margin`` on every side, if larger) whose
    top-left lies ``margin`` above and left of the object, clamped to the slide. Every object
    whose bbox lies inside that ROI joins it.

    Args:
        boxes: int ``(N, 4)`` level-0 ``(x0, y0, x1, y1)`` half-open pixel bboxes.
        slide_size: level-0 ``(width, height)``.
        roi_size: minimum ROI side in pixels.
        margin: pixels kept around the seed object.

    Returns:
        ``[((x, y, w, h), member_indices), ...]`` in level-0 pixels.
    """
    width, height = slide_size
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    assigned = np.zeros(len(boxes), bool)
    rois = []
    for i in np.lexsort((boxes[:, 0], boxes[:, 1])).tolist():
        if assigned[i]:
            continue
        x0, y0, x1, y1 = boxes[i].tolist()
        w = min(width, max(roi_size, x1 - x0 + 2 * margin))
        h = min(height, max(roi_size, y1 - y0 + 2 * margin))
        x = min(max(x0 - margin, 0), width - w)
        y = min(max(y0 - margin, 0), height - h)
        inside = (
            ~assigned
            & (boxes[:, 0] >= x)
            & (boxes[:, 1] >= y)
            & (boxes[:, 2] <= x + w)
            & (boxes[:, 3] <= y + h)
        )
        inside[i] = True
        assigned |= inside
        rois.append(((x, y, w, h), np.flatnonzero(inside)))
    return rois


# -- slide reading -------------------------------------------------------------------------------
class SlideRegionReader:
    """Level-0 RGB regions of an annotated slide: a :class:`~omniseg.wsi.slide.Slide` (the one
    slide reader) that opens without a pixel size and refuses reads outside the slide.

    Attributes:
        size: level-0 ``(width, height)``.
        mpp: level-0 micrometres per pixel, or None when the file does not say.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"slide {self.path} does not exist")
        self._slide = Slide(self.path, max_plain_pixels=MAX_PLAIN_PIXELS, require_mpp=False)
        self.size = self._slide.dimensions
        self.mpp = self._slide.mpp

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> SlideRegionReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of level-0 pixels ``[y, y + h) x [x, x + w)``."""
        if x < 0 or y < 0 or x + w > self.size[0] or y + h > self.size[1]:
            raise ValueError(
                f"slide {self.path}: region x={x} y={y} {w}x{h} outside {self.size[0]}x"
                f"{self.size[1]}"
            )
        return self._slide.read_region(x, y, w, h)


# -- the importer --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Annotation:
    tissue: str
    polygons: list[Polygon]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (half-open pixel bbox)


def import_qupath(
    slide: str | Path,
    geojson: str | Path,
    outdir: str | Path,
    tissues: TissueTable,
    *,
    class_map: Mapping[str, str],
    patient: str | None = None,
    stain: str = "he",
    roi_size: int = 2048,
    margin_px: int = 256,
    object_types: tuple[str, ...] = ("annotation",),
    progress: bool = True,
) -> Path:
    """Cut 40x ROIs with partial masks around QuPath annotations and write a sample sheet.

    For each tissue, annotated objects are grouped greedily into ROIs (:func:`plan_rois`); in
    each ROI every polygon of that tissue is rasterised (pixel centres, even-odd rule) as the
    ROI's mask, and the RGB region is read from the slide.

    Args:
        slide: the slide (anything OpenSlide opens; plain TIFF through tifffile; PNG/JPEG).
            Its level 0 must be 40x (0.25 um/px) when the file records a pixel size.
        geojson: QuPath export (FeatureCollection or list of features) in level-0 pixels.
        outdir: writes ``images/{roi}.png``, ``masks/{roi}.png`` and ``rois.tsv``.
        tissues: registry; ``class_map`` values must be its keys.
        class_map: QuPath class name -> tissue key. Features of other classes (or
            unclassified ones) are skipped with one warning listing them.
        patient: patient of every ROI (default: the slide's file name without suffixes).
        stain: stain code of the slide.
        roi_size: minimum ROI side in level-0 pixels.
        margin_px: context kept around each seed object.
        object_types: QuPath object types imported (features nested under ``childObjects``
            included); the others, e.g. the detections and cells of a cell-detection run, are
            skipped and counted in the log.
        progress: show a tqdm bar over the ROIs written.

    Returns:
        The sample sheet path ``outdir/rois.tsv`` (columns ``roi_id, patient, stain, tissue,
        image, mask`` with paths relative to ``outdir``, plus ``slide, x, y, width, height``: the
        ROI in level-0 pixels).

    Raises:
        ValueError: naming the file for an invalid GeoJSON, one without features or without any
            polygon of a mapped class, a slide that cannot be read or is not 40x, or a
            ``class_map`` value that is not a tissue key.
    """
    slide, geojson, outdir = Path(slide), Path(geojson), Path(outdir)
    wrong = sorted({v for v in class_map.values() if v not in tissues})
    if wrong:
        raise ValueError(f"class_map maps to unknown tissue key(s) {', '.join(wrong)}")
    if roi_size < 1 or margin_px < 0:
        raise ValueError(f"roi_size must be >= 1 and margin_px >= 0, got {roi_size}, {margin_px}")
    features = read_geojson_features(geojson)
    wanted = {t.lower() for t in object_types}

    annotations = _annotations(features, class_map, wanted, geojson)

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", slide.name.split(".")[0] or slide.name)
    patient = patient if patient is not None else stem
    rows = []
    with (
        SlideRegionReader(slide) as reader,
        progress_bar(desc="QuPath ROIs", unit="ROI", enabled=progress) as bar,
    ):
        if reader.mpp is not None and abs(reader.mpp / SOURCE_UM_PER_PX - 1) > MPP_TOLERANCE:
            raise ValueError(
                f"slide {slide} has {reader.mpp:.4g} um/px at level 0; ROIs must be 40x "
                f"({SOURCE_UM_PER_PX} um/px)"
            )
        for tissue in tissues:
            rows += _tissue_rois(
                reader, tissue, [a for a in annotations if a.tissue == tissue.key], outdir,
                stem=stem, patient=patient, stain=stain, roi_size=roi_size, margin_px=margin_px,
                geojson=geojson, bar=bar,
            )  # fmt: skip
    sheet = outdir / "rois.tsv"
    with atomic_path(sheet) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    return sheet


def _annotations(features, class_map, wanted: set[str], geojson: Path) -> list[_Annotation]:
    """The polygons of the wanted object types and mapped classes, with their boxes; what was
    skipped is logged (other object types) or warned about (unmapped classes, no polygons)."""
    annotations: list[_Annotation] = []
    unknown: dict[str, int] = {}
    other_types: dict[str, int] = {}
    not_polygons = 0
    for feature in walk_features(features):
        kind = feature_object_type(feature)
        if kind not in wanted:
            other_types[kind] = other_types.get(kind, 0) + 1
            continue
        name = feature_class(feature)
        key = lookup_class(name, class_map) if name is not None else None
        if key is None:
            label = name if name is not None else "<unclassified>"
            unknown[label] = unknown.get(label, 0) + 1
            continue
        polygons = feature_polygons(feature.get("geometry"))
        if not polygons:
            not_polygons += 1
            continue
        pts = np.concatenate([np.concatenate(p) for p in polygons])
        box = (
            int(np.floor(pts[:, 0].min())),
            int(np.floor(pts[:, 1].min())),
            int(np.ceil(pts[:, 0].max())),
            int(np.ceil(pts[:, 1].max())),
        )
        annotations.append(_Annotation(key, polygons, box))
    if other_types:
        log.info(
            "GeoJSON %s: skipped %s (imported object types: %s)",
            geojson,
            ", ".join(f"{n} {k} object(s)" for k, n in sorted(other_types.items())),
            ", ".join(sorted(wanted)),
        )
    if unknown:
        shown = ", ".join(f"{k!r} ({n})" for k, n in sorted(unknown.items()))
        warnings.warn(
            f"GeoJSON {geojson}: skipped features of classes not in class_map: {shown}",
            stacklevel=2,
        )
    if not_polygons:
        warnings.warn(
            f"GeoJSON {geojson}: skipped {not_polygons} feature(s) without polygon geometry",
            stacklevel=2,
        )
    if not annotations:
        skipped = (
            f" ({sum(other_types.values())} of other object types skipped)" if other_types else ""
        )
        raise ValueError(f"GeoJSON {geojson} has no polygon of a class in class_map{skipped}")
    return annotations


def _tissue_rois(reader, tissue, objs, outdir: Path, *, stem, patient, stain, roi_size,
                 margin_px, geojson, bar) -> list[dict]:  # fmt: skip
    """Write the ROIs of one tissue's objects (image and mask PNGs); their sheet rows."""
    rows = []
    width, height = reader.size
    slide = reader.path
    if not objs:
        return rows
    boxes = np.array([a.box for a in objs], dtype=np.int64)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    valid = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not valid.all():
        warnings.warn(
            f"GeoJSON {geojson}: {int((~valid).sum())} {tissue.key} object(s) lie "
            f"outside the slide {slide} ({width}x{height}) and are skipped",
            stacklevel=2,
        )
    objs = [a for a, v in zip(objs, valid, strict=True) if v]
    plans = plan_rois(clipped[valid], (width, height), roi_size, margin_px)
    for k, ((x, y, w, h), _) in enumerate(plans):
        # every polygon of this tissue touching the ROI, not only the ROI's members
        touching = [
            p
            for a in objs
            if a.box[0] < x + w and a.box[2] > x and a.box[1] < y + h and a.box[3] > y
            for p in a.polygons
        ]
        mask = rasterize(touching, x, y, h, w)
        roi_id = f"{stem}_{tissue.key}_{k:03d}"
        write_png(outdir / "images" / f"{roi_id}.png", reader.read(x, y, w, h))
        write_png(outdir / "masks" / f"{roi_id}.png", mask)
        bar.update()
        rows.append(
            {
                "roi_id": roi_id,
                "patient": patient,
                "stain": stain,
                "tissue": tissue.key,
                "image": f"images/{roi_id}.png",
                "mask": f"masks/{roi_id}.png",
                "slide": str(slide),
                "x": x,
                "y": y,
                "width": w,
                "height": h,
            }
        )
    return rows
