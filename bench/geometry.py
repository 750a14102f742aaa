r"""Benchmark of the GeoJSON polygon geometry: the shapely path (``omniseg.wsi.geometry``) against
the hand-written numpy Douglas-Peucker and edge-pair validity check it replaced (kept below, as
the baseline), in the same run, on one synthetic label window.

Prints one JSON object::

    python bench/geometry.py [--size 4096] [--repeats 3] [--seed 0]

The map: ``--size``\ :sup:`2` pixels of blobs with ragged outlines (a smoothed random field
thresholded), lumens punched into them (holes), each 8-connected object given one of 6 tissue
labels at random: a few thousand objects, like a busy ``labels_to_geojson`` window. Timed, best
of ``--repeats``, single-threaded: ``trace`` (:func:`trace_rings`, shared by both paths), the
geometry step alone (simplify + validity: ``old`` = numpy DP + grid-hashed edge pairs, ``new`` =
shapely.simplify + Objects + valid_outlines) and the whole window (``_window_geometries``: trace,
simplify, check, GeoJSON coordinate lists), at ``simplify_px`` 1 (the default) and 0 (exact
outlines, checked by neither path). ``all_valid_new``: every feature of the new path passes
``shapely.is_valid``. Ratios are new / old.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads: one thread

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import shapely  # noqa: E402
from scipy import ndimage  # noqa: E402

from omniseg.wsi.export import _window_geometries  # noqa: E402
from omniseg.wsi.geometry import (  # noqa: E402
    Objects,
    Rings,
    simplify_rings,
    trace_rings,
    valid_outlines,
)

EIGHT = np.ones((3, 3), bool)


# -- the synthetic window -------------------------------------------------------------------------
def synthetic_window(size: int, seed: int) -> SimpleNamespace:
    """A ``_Window``-like object: 4-connected parts of 8-connected objects of 6 tissues."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), 6)
    blobs = field > np.quantile(field, 0.72)
    lumen = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), 2.5)
    blobs &= ~(ndimage.binary_erosion(blobs, iterations=3) & (lumen > np.quantile(lumen, 0.85)))
    objects, n = ndimage.label(blobs, structure=EIGHT)
    tissue = np.r_[0, rng.integers(1, 7, n)].astype(np.uint8)[objects]
    parts = np.zeros((size, size), np.int32)
    part_object = [np.zeros(1, np.int64)]
    n_part = 0
    for t in range(1, 7):  # 4-connected parts per tissue, as export._scan makes them
        lab, k = ndimage.label(tissue == t)
        owner = np.zeros(k + 1, np.int64)
        owner[lab.ravel()] = objects.ravel()
        parts[lab > 0] = lab[lab > 0] + n_part
        part_object.append(owner[1:] - 1)
        n_part += k
    block = SimpleNamespace(wc0=0, wr0=0)
    return SimpleNamespace(
        parts=parts, part_object=np.concatenate(part_object), block=block, n_objects=n
    )


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def old_step(rings: Rings, part_object: np.ndarray, px: float):
    simple = old_simplify_rings(rings, px) if px > 0 else rings
    obj = part_object[rings.comp]
    hole = rings.area2() < 0
    order = np.lexsort((hole, rings.comp, obj))
    groups = np.split(order, np.flatnonzero(np.diff(obj[order])) + 1)
    ok = old_groups_valid(simple, groups) if simple is not rings else np.ones(len(groups), bool)
    return simple, ok


def new_step(rings: Rings, part_object: np.ndarray, px: float):
    objects = Objects.group(rings, part_object[rings.comp])
    if px <= 0:  # as export._window_geometries: exact outlines are valid by construction
        return rings, np.ones(len(objects), bool), {}
    simple = simplify_rings(rings, px)
    use_simple, repaired = valid_outlines(rings, simple, objects)
    return simple, use_simple, repaired


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    win = synthetic_window(args.size, args.seed)
    t_make = time.perf_counter() - t0
    t_trace, rings = best(lambda: trace_rings(win.parts), args.repeats)
    result = {
        "size": args.size,
        "objects": int(win.n_objects),
        "parts": int(len(win.part_object) - 1),
        "rings": len(rings),
        "holes": int((rings.area2() < 0).sum()),
        "vertices": len(rings.x),
        "make_map_s": round(t_make, 2),
        "trace_s": round(t_trace, 4),
    }
    for px in (1.0, 0.0):
        t_old, (old_simple, ok_old) = best(
            lambda px=px: old_step(rings, win.part_object, px), args.repeats
        )
        t_new, (new_simple, ok_new, repaired) = best(
            lambda px=px: new_step(rings, win.part_object, px), args.repeats
        )
        w_old, feats_old = best(lambda px=px: list(old_window_geometries(win, px)), args.repeats)
        w_new, feats_new = best(lambda px=px: list(_window_geometries(win, px)), args.repeats)
        geoms = shapely.from_geojson(
            json.dumps(
                {
                    "type": "GeometryCollection",
                    "geometries": [g for _, g in feats_new],
                }
            )
        )
        result[f"simplify_px={px:g}"] = {
            "vertices_old": len(old_simple.x),
            "vertices_new": len(new_simple.x),
            "fallback_old": int((~ok_old).sum()),
            "fallback_new": int((~ok_new).sum()) - len(repaired),
            "repaired_new": len(repaired),
            "all_valid_new": bool(shapely.is_valid(shapely.get_parts(geoms)).all()),
            "features": [len(feats_old), len(feats_new)],
            "step_old_s": round(t_old, 4),
            "step_new_s": round(t_new, 4),
            "step_ratio": round(t_new / t_old, 3),
            "window_old_s": round(w_old, 4),
            "window_new_s": round(w_new, 4),
            "window_ratio": round(w_new / w_old, 3),
        }
    result["shapely"] = shapely.__version__
    result["geos"] = shapely.geos_version_string
    result["numpy"] = np.__version__
    result["python"] = platform.python_version()
    result["threads"] = 1
    print(json.dumps(result, indent=2))


# -- the baseline: the hand-written geometry this replaced (omniseg before shapely) ----------------
def old_simplify_rings(rings: Rings, tolerance: float) -> Rings:
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


def old_rings_valid(rings: list[np.ndarray], chunk: int = 512) -> bool:
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


def old_groups_valid(rings: Rings, groups: list[np.ndarray], cell: int = 8) -> np.ndarray:
    """old_rings_valid for many groups of rings at once (one group = one object).

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


def old_window_geometries(win, simplify_px: float):
    """Yield ``(object index, GeoJSON geometry)`` for every owned object of a window."""
    rings = trace_rings(win.parts)
    if not len(rings):
        return
    simple = old_simplify_rings(rings, simplify_px) if simplify_px > 0 else rings
    obj = win.part_object[rings.comp]
    hole = rings.area2() < 0
    order = np.lexsort((hole, rings.comp, obj))  # object by object, each part's shell first
    bounds = np.flatnonzero(np.diff(obj[order])) + 1
    groups = np.split(order, bounds)
    ok = old_groups_valid(simple, groups) if simple is not rings else np.ones(len(groups), bool)
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


if __name__ == "__main__":
    main()
