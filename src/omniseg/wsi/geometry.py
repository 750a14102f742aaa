"""Polygon geometry of label maps: pixel-corner outlines of regions (vectorised numpy, no
per-pixel loop), their simplification and the OGC validity of the objects they outline (shapely,
i.e. GEOS, the C++ port of the JTS library QuPath uses, vectorised over rings and objects).

Used by :func:`omniseg.wsi.export.labels_to_geojson`. Vertices are ``(x, y) = (col, row)`` of
pixel *corners*, so a one-pixel region is a unit square and ring areas equal pixel counts.

Validity is GEOS's (OGC Simple Features): rings closed and simple, holes inside their shell,
rings touching at most at single points, a polygon's interior connected, the polygons of one
object not overlapping (touching at points allowed). The exact pixel outlines of
:func:`trace_rings` are valid by construction when regions are 4-connected and an object is a
MultiPolygon of its 4-connected parts (two pixels touching only at a corner are two squares
sharing one point, not one self-touching ring); Douglas-Peucker simplification may break that,
so :func:`valid_outlines` checks every object and falls back to its exact outline, and repairs
(``shapely.make_valid``) an exact outline that is invalid after all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.polygon import orient


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


# -- simplification -------------------------------------------------------------------------------
def simplify_rings(rings: Rings, tolerance: float) -> Rings:
    """Douglas-Peucker simplification of every ring (``shapely.simplify`` without topology
    preservation, on LinearRings, so GEOS neither repairs nor moves anything).

    Kept vertices are a subset of the original ones, so coordinates stay integral. A ring that
    would keep fewer than 3 vertices, or whose signed area would change sign or vanish, is
    returned unchanged. Validity is not checked here (see :func:`valid_outlines`).

    Args:
        rings: input rings.
        tolerance: maximum distance in pixels between a removed vertex and the simplified ring.
    """
    r = len(rings)
    if r == 0 or tolerance <= 0:
        return rings
    lengths = np.diff(rings.start)
    xy = np.stack([rings.x, rings.y], axis=1).astype(np.float64)
    lines = shapely.linearrings(xy, indices=np.repeat(np.arange(r), lengths))
    simple = shapely.simplify(lines, tolerance, preserve_topology=False)
    sxy, sid = shapely.get_coordinates(simple, return_index=True)
    # every result is closed (DP keeps the end points): drop each ring's closing coordinate
    last = np.r_[sid[1:] != sid[:-1], True] if len(sid) else np.zeros(0, bool)
    count = np.bincount(sid[~last], minlength=r)
    cross = sxy[:-1, 0] * sxy[1:, 1] - sxy[1:, 0] * sxy[:-1, 1]  # within a ring unless `last`
    area2 = np.bincount(sid[:-1][~last[:-1]], weights=cross[~last[:-1]], minlength=r)
    revert = (count < 3) | (np.sign(area2) != np.sign(rings.area2()))
    keep_s = ~last & ~revert[sid]
    keep_o = np.repeat(revert, lengths)
    ring_of = np.r_[sid[keep_s], np.repeat(np.arange(r), lengths)[keep_o]]
    order = np.argsort(ring_of, kind="stable")  # each ring comes from one source, in order
    x = np.r_[sxy[keep_s, 0].astype(np.int64), rings.x[keep_o]][order]
    y = np.r_[sxy[keep_s, 1].astype(np.int64), rings.y[keep_o]][order]
    counts = np.where(revert, lengths, count)
    return Rings(x, y, np.r_[0, np.cumsum(counts)].astype(np.int64), rings.comp)


# -- objects and their validity -------------------------------------------------------------------
@dataclass
class Objects:
    """Rings grouped into objects, each a MultiPolygon of polygons (a shell and its holes).

    Attributes:
        order: int64 ``(M,)`` ring indices object by object, in each object polygon by polygon,
            each polygon's shell first.
        polygon: int64 ``(M,)`` polygon number of each entry of ``order`` (non-decreasing).
        start: int64 ``(K + 1,)``: object ``k`` has the rings ``order[start[k]:start[k+1]]``.
    """

    order: np.ndarray
    polygon: np.ndarray
    start: np.ndarray

    def __len__(self) -> int:
        return len(self.start) - 1

    @classmethod
    def group(cls, rings: Rings, obj: np.ndarray) -> Objects:
        """Group rings by object: ``obj`` is each ring's object id; a region (``rings.comp``)
        is one polygon, its positive ring the shell and its negative rings the holes."""
        hole = rings.area2() < 0
        order = np.lexsort((hole, rings.comp, obj))
        polygon = np.cumsum(~hole[order]) - 1
        o = obj[order]
        start = np.flatnonzero(np.r_[True, o[1:] != o[:-1]]) if len(o) else np.zeros(0, np.int64)
        return cls(order, polygon, np.r_[start, len(o)].astype(np.int64))

    def geometries(self, rings: Rings, objects: np.ndarray | None = None) -> np.ndarray:
        """One shapely MultiPolygon per object (of ``objects``, default all), in order."""
        sizes = np.diff(self.start)
        if objects is None:
            objects = np.arange(len(self))
        sel = np.repeat(np.isin(np.arange(len(self)), objects), sizes)
        order, polygon = self.order[sel], self.polygon[sel]
        obj = np.repeat(np.arange(len(self)), sizes)[sel]
        if not len(order):
            return np.empty(0, object)
        lengths = np.diff(rings.start)[order]
        entry = np.repeat(np.arange(len(order)), lengths)
        vertex = (
            rings.start[order][entry]
            + np.arange(len(entry))
            - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        xy = np.stack([rings.x[vertex], rings.y[vertex]], axis=1).astype(np.float64)
        lines = shapely.linearrings(xy, indices=entry)
        new_poly = np.r_[True, polygon[1:] != polygon[:-1]]
        polys = shapely.polygons(lines, indices=np.cumsum(new_poly) - 1)
        shell_obj = obj[new_poly]
        return shapely.multipolygons(
            polys, indices=np.cumsum(np.r_[True, np.diff(shell_obj) != 0]) - 1
        )


def valid_outlines(
    rings: Rings, simple: Rings, objects: Objects
) -> tuple[np.ndarray, dict[int, shapely.Geometry]]:
    """Choose a valid outline for every object.

    An object keeps its ``simple`` rings if they form a valid MultiPolygon; else it falls back
    to its exact ``rings``; if those are invalid too (not expected from :func:`trace_rings`, see
    the module docstring), it is repaired with ``shapely.make_valid`` (polygonal parts only,
    shells counter-clockwise in the ``(x, y)`` frame, holes clockwise). Coordinates of a repair
    are integral too: it only splits axis-parallel pixel edges where they meet.

    Returns:
        ``use_simple`` bool ``(K,)`` and ``repaired``: object index -> polygonal geometry, for the
        objects whose exact outline is invalid; the others use ``rings``.
    """
    use_simple = shapely.is_valid(objects.geometries(simple))
    bad = np.flatnonzero(~use_simple)
    if simple is not rings and bad.size:
        exact = objects.geometries(rings, bad)
        invalid = ~shapely.is_valid(exact)
        bad, broken = bad[invalid], exact[invalid]
    else:
        broken = objects.geometries(rings, bad)
    return use_simple, {int(k): _repair(g) for k, g in zip(bad, broken, strict=True)}


def _repair(geometry: shapely.Geometry) -> shapely.Geometry:
    """``make_valid``, keeping polygons only; shells of positive shoelace area (counter-clockwise
    in the ``(x, y)`` frame, as :func:`trace_rings` traces them), holes negative."""
    parts = shapely.get_parts(shapely.make_valid(geometry))
    polys = shapely.get_parts(parts[np.isin(shapely.get_type_id(parts), (3, 6))])  # (Multi)Polygon
    return shapely.MultiPolygon([orient(p, 1.0) for p in polys if not p.is_empty])
