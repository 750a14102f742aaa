"""Polygon geometry of label maps: pixel-corner outlines of regions, their simplification and a
validity check, all vectorised with numpy (no per-pixel or per-vertex Python loop).

Used by :func:`omniseg.wsi.export.labels_to_geojson`. Vertices are ``(x, y) = (col, row)`` of
pixel *corners*, so a one-pixel region is a unit square and ring areas equal pixel counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


def groups_valid(rings: Rings, groups: list[np.ndarray], cell: int = 8) -> np.ndarray:
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
