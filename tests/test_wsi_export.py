"""Tests of omniseg.wsi.export: OME-TIFF pyramid, overlay, GeoJSON polygons, tissue areas."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
from scipy import ndimage
from shapely.geometry import shape

from omniseg.io import read_image
from omniseg.wsi import export
from omniseg.wsi.export import (
    LABEL_TABLE_NAMESPACE,
    label_map_info,
    labels_to_geojson,
    pyramid_shapes,
    tissue_areas,
    write_label_pyramid,
    write_overlay,
)
from omniseg.wsi.geometry import Objects, Rings, simplify_rings, trace_rings, valid_outlines

MPP = 0.25
EIGHT = np.ones((3, 3), bool)


def write_labels(path: Path, labels: np.ndarray, tissues, *, tissue_area_px=None, chunks=256):
    """A labels.h5 as the aggregation step writes it."""
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset(
            "labels",
            data=labels,
            chunks=(min(chunks, labels.shape[0]), min(chunks, labels.shape[1])),
            compression="gzip",
        )
        dset.attrs["mpp"] = MPP
        dset.attrs["label_table"] = json.dumps(
            {str(k): v for k, v in tissues.label_table().items()}
        )
        dset.attrs["tissues"] = tissues.to_json()
        if tissue_area_px is not None:
            dset.attrs["tissue_area_px"] = tissue_area_px
    return path


def disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def make_map(tissues) -> np.ndarray:
    """1500 x 1300 map: discs, a rectangle, a ring with a hole, an object crossing the 512 strip
    border, diagonally touching squares, small objects (one below min_area_px)."""
    shape = (1500, 1300)
    lab = np.zeros(shape, np.uint8)
    L = {t.key: t.label for t in tissues}
    lab[disc(shape, 200, 200, 40)] = L["dt"]
    lab[100:120, 300:340] = L["dt"]  # rows 100-119, cols 300-339
    ring = disc(shape, 700, 400, 60) & ~disc(shape, 700, 400, 25)
    lab[ring] = L["pt"]
    lab[disc(shape, 700, 400, 10)] = L["pt"]  # an island inside the hole: a separate object
    lab[470:560, 700:760] = L["cap"]  # crosses row 512
    lab[disc(shape, 515, 730, 20)] = L["tuft"]  # tuft inside the capsule, crossing row 512
    lab[900:910, 100:110] = L["ves"]  # two squares touching at one corner: one object
    lab[910:920, 110:120] = L["ves"]
    lab[1200:1203, 1000:1006] = L["ptc"]
    lab[1250:1255, 1290:1300] = L["ptc"]  # touches the right edge of the slide
    lab[1495:1500, 20:30] = L["ptc"]  # touches the bottom edge
    lab[1300, 1000:1002] = L["ptc"]  # 2 px: below min_area_px
    lab[505:520, 505:520] = L["ptc"]  # crosses both block borders at 512
    return lab


@pytest.fixture(scope="module")
def label_map(tissues):
    return make_map(tissues)


@pytest.fixture
def labels_h5(tmp_path, label_map, tissues):
    return write_labels(tmp_path / "labels.h5", label_map, tissues, tissue_area_px=1_000_000)


def shoelace2(ring) -> int:
    a = np.asarray(ring[:-1], dtype=np.int64)
    b = np.asarray(ring[1:], dtype=np.int64)
    return int((a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1]).sum())


def polygons_of(geometry):
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def expected_objects(label_map, label, min_area=16):
    lab, n = ndimage.label(label_map == label, structure=EIGHT)
    sizes = np.bincount(lab.ravel())[1:]
    return sorted(int(s) for s in sizes if s >= min_area)


# -- label file ---------------------------------------------------------------------------------
def test_label_map_info(labels_h5, tissues):
    info = label_map_info(labels_h5)
    assert info.shape == (1500, 1300)
    assert info.mpp == MPP
    assert info.label_table == tissues.label_table()
    assert info.tissues == tissues
    assert info.tissue_area_px == 1_000_000


def test_label_map_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        label_map_info(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.h5"):
        label_map_info(bad)
    with h5py.File(tmp_path / "nolab.h5", "w") as fh:
        fh["other"] = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="no dataset 'labels'"):
        label_map_info(tmp_path / "nolab.h5")
    with h5py.File(tmp_path / "noattr.h5", "w") as fh:
        fh["labels"] = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="noattr.h5.*mpp"):
        label_map_info(tmp_path / "noattr.h5")


def test_tissue_table_mismatch(labels_h5, tissues, tmp_path):
    from omniseg.tissues import TissueTable

    fewer = TissueTable(list(tissues)[:3])
    with pytest.raises(ValueError, match="label table"):
        labels_to_geojson(labels_h5, tmp_path / "x.geojson", fewer)


# -- pyramid ------------------------------------------------------------------------------------
def test_pyramid_shapes():
    assert pyramid_shapes((1500, 1300), 256) == [(1500, 1300), (750, 650), (375, 325), (188, 163)]
    assert pyramid_shapes((100, 50), 256) == [(100, 50)]
    assert pyramid_shapes((3, 513), 256) == [(3, 513), (2, 257), (1, 129)]


def test_label_pyramid_reads_back(labels_h5, label_map, tmp_path):
    out = write_label_pyramid(labels_h5, tmp_path / "labels.ome.tif", tile=256, min_size=256)
    assert out == tmp_path / "labels.ome.tif"
    assert np.array_equal(tifffile.imread(out), label_map)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == pyramid_shapes(label_map.shape, 256)
        for k, lv in enumerate(levels):
            assert np.array_equal(lv.asarray(), label_map[:: 2**k, :: 2**k]), k
            page = lv.keyframe
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.dtype == np.uint8
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(tif.pages) == 1  # reduced levels live in SubIFDs
        xml = tif.ome_metadata
    assert re.search(r'PhysicalSizeX="0\.25"', xml)
    assert re.search(r'PhysicalSizeY="0\.25"', xml)
    assert LABEL_TABLE_NAMESPACE in xml
    assert '<M K="4">tuft</M>' in xml
    assert not list(tmp_path.glob(".*"))  # no staging or temporary files left


def test_label_pyramid_rejects_bad_tile(labels_h5, tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        write_label_pyramid(labels_h5, tmp_path / "x.ome.tif", tile=100)


# -- overlay ------------------------------------------------------------------------------------
def test_overlay(labels_h5, label_map, tissues, tmp_path):
    thumb = np.zeros((150, 130, 3), np.uint8)
    thumb[:, :, 1] = 200  # a green slide
    out = write_overlay(labels_h5, tmp_path / "overlay.png", tissues, thumbnail=thumb, max_side=400)
    png = read_image(out)
    step = 4  # ceil(1500 / 400)
    h, w = -(-1500 // step), -(-1300 // step)
    assert png.shape[0] >= h and png.shape[1] > w + 100  # image plus legend on the right
    img = png[:h, :w].astype(int)
    small = label_map[::step, ::step]
    assert np.array_equal(img[small == 0], np.broadcast_to([0, 200, 0], img[small == 0].shape))
    t = tissues["pt"]
    blended = np.rint(0.5 * np.array([0, 200, 0]) + 0.5 * np.array(t.rgb))
    assert np.array_equal(img[small == t.label][0], blended)
    legend = png[:, w:].reshape(-1, 3)
    for t in tissues:  # every tissue colour is in the legend
        assert (legend == t.rgb).all(axis=1).sum() > 20, t.key
    assert (legend < 100).all(axis=1).sum() > 200  # dark text


def test_overlay_white_without_thumbnail(labels_h5, tissues, tmp_path):
    out = write_overlay(labels_h5, tmp_path / "o.png", tissues, max_side=300, alpha=1.0)
    png = read_image(out)
    assert (png[0, 0] == 255).all()
    assert (png == tissues["dt"].rgb).all(axis=2).any()


# -- GeoJSON ------------------------------------------------------------------------------------
def load_features(path):
    data = json.loads(Path(path).read_text())
    assert data["type"] == "FeatureCollection"
    return data["features"]


def check_geometry(feature):
    geom = feature["geometry"]
    assert geom["type"] in ("Polygon", "MultiPolygon")
    for poly in polygons_of(geom):
        for i, ring in enumerate(poly):
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed, >= 3 distinct corners
            assert (shoelace2(ring) > 0) == (i == 0)  # outer ring first, holes after
            assert all(type(v) is int for xy in ring for v in xy)  # integral pixel corners
    assert shapely.is_valid(shape(geom)), shapely.is_valid_reason(shape(geom))  # OGC, as QuPath
    return sum(shoelace2(r) for p in polygons_of(geom) for r in p) // 2


@pytest.mark.parametrize("strip,margin", [(512, 128), (300, 128), (4096, 512)])
def test_geojson_objects_and_exact_areas(labels_h5, label_map, tissues, tmp_path, strip, margin):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every object fits the margin: nothing is clipped
        out = labels_to_geojson(
            labels_h5, tmp_path / "t.geojson", tissues, strip=strip, margin=margin, simplify_px=0
        )
    features = load_features(out)
    for t in tissues:
        mine = [f for f in features if f["properties"]["tissue"] == t.key]
        areas = sorted(check_geometry(f) for f in mine)
        assert areas == expected_objects(label_map, t.label), t.key  # once each, exact
        for f in mine:
            p = f["properties"]
            assert p["objectType"] == "annotation"
            assert p["classification"] == {"name": t.name, "color": list(t.rgb)}
            assert p["measurements"]["area_um2"] == pytest.approx(
                p["measurements"]["area_px"] * MPP**2
            )
            assert "clipped" not in p


def test_geojson_level0_coordinates_and_shapes(labels_h5, tissues, tmp_path):
    out = labels_to_geojson(labels_h5, tmp_path / "t.geojson", tissues, strip=512, margin=128)
    features = load_features(out)
    rect = [f for f in features if f["properties"]["measurements"]["area_px"] == 800]
    assert len(rect) == 1
    (ring,) = rect[0]["geometry"]["coordinates"]
    xy = np.array(ring)
    assert (xy[:, 0].min(), xy[:, 0].max(), xy[:, 1].min(), xy[:, 1].max()) == (300, 340, 100, 120)
    assert len(ring) == 5  # a rectangle keeps its 4 corners, even simplified
    pt = [f for f in features if f["properties"]["tissue"] == "pt"]
    assert sorted(len(f["geometry"]["coordinates"]) for f in pt) == [1, 2]  # island; ring + hole
    (ves,) = [f for f in features if f["properties"]["tissue"] == "ves"]
    assert ves["geometry"]["type"] == "MultiPolygon"  # corner-touching squares
    assert len(ves["geometry"]["coordinates"]) == 2
    assert ves["properties"]["measurements"]["area_px"] == 200


def test_geojson_simplified_is_valid_and_close(labels_h5, label_map, tissues, tmp_path):
    exact = load_features(
        labels_to_geojson(labels_h5, tmp_path / "a.geojson", tissues, simplify_px=0)
    )
    simple = load_features(labels_to_geojson(labels_h5, tmp_path / "b.geojson", tissues))
    assert len(exact) == len(simple)
    n_exact = sum(len(r) for f in exact for p in polygons_of(f["geometry"]) for r in p)
    n_simple = sum(len(r) for f in simple for p in polygons_of(f["geometry"]) for r in p)
    assert n_simple < 0.5 * n_exact
    for f in simple:
        area = check_geometry(f)
        perimeter_bound = 2 * np.sqrt(f["properties"]["measurements"]["area_px"]) * 4
        assert abs(area - f["properties"]["measurements"]["area_px"]) <= perimeter_bound


def test_geojson_clipped_objects_warn(labels_h5, tissues, tmp_path):
    with pytest.warns(UserWarning, match="clipped"):
        out = labels_to_geojson(labels_h5, tmp_path / "t.geojson", tissues, strip=256, margin=32)
    assert any(f["properties"].get("clipped") for f in load_features(out))


def test_geojson_min_area(labels_h5, tissues, tmp_path):
    features = load_features(
        labels_to_geojson(labels_h5, tmp_path / "t.geojson", tissues, min_area_px=1)
    )
    assert min(f["properties"]["measurements"]["area_px"] for f in features) == 2


# -- tracing, simplification, validity ---------------------------------------------------------
def objects_of(mask):
    """Rings of a mask's 4-connected parts, grouped into its 8-connected objects."""
    parts, _ = ndimage.label(mask)
    objects, _ = ndimage.label(mask, structure=EIGHT)
    part_object = np.zeros(parts.max() + 1, np.int64)
    part_object[parts.ravel()] = objects.ravel()
    rings = trace_rings(parts)
    return rings, Objects.group(rings, part_object[rings.comp]), objects


@pytest.mark.parametrize("seed", range(5))
def test_trace_random_masks(seed):
    """Random masks (many diagonal touches): areas exact per 4-component, every 8-connected
    object's exact outline (a MultiPolygon of its 4-connected parts) is valid for GEOS."""
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 50)) < 0.45
    comp, n = ndimage.label(mask)
    rings = trace_rings(comp)
    area2 = rings.area2()
    assert area2.sum() == 2 * mask.sum()
    assert np.array_equal(np.bincount(rings.comp[area2 > 0], minlength=n + 1)[1:], np.ones(n))
    per_comp = np.bincount(rings.comp, weights=area2, minlength=n + 1)[1:] / 2
    assert np.array_equal(per_comp, np.bincount(comp.ravel())[1:])
    rings, objects, labelled = objects_of(mask)
    geoms = objects.geometries(rings)
    assert shapely.is_valid(geoms).all()
    assert np.array_equal(shapely.area(geoms), np.bincount(labelled.ravel())[1:])
    use_simple, repaired = valid_outlines(rings, rings, objects)
    assert use_simple.all() and not repaired


def test_trace_unit_square_and_simplify():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    rings = trace_rings(mask.astype(int))
    assert rings.ring(0).tolist() == [[1, 1], [2, 1], [2, 2], [1, 2]]
    assert np.array_equal(simplify_rings(rings, 5.0).ring(0), rings.ring(0))  # never degenerate


def blobs(seed, shape=(256, 256), sigma=1.5, fraction=0.45):
    """Random blobs with ragged outlines and holes covering ``fraction`` of the mask."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return np.pad(field > np.quantile(field, 1 - fraction), 1)


@pytest.mark.parametrize("seed", range(3))
def test_simplify_keeps_a_subset_of_vertices(seed):
    """Douglas-Peucker keeps vertices of the pixel outline, in order, and each ring's
    orientation; it removes most of them."""
    rings, _, _ = objects_of(blobs(seed))
    simple = simplify_rings(rings, 1.0)
    assert np.array_equal(simple.comp, rings.comp)
    assert np.array_equal(np.sign(simple.area2()), np.sign(rings.area2()))
    assert (np.diff(simple.start) >= 3).all()
    assert len(simple.x) < 0.6 * len(rings.x)
    for i in range(len(rings)):
        ring = [tuple(v) for v in rings.ring(i).tolist()]
        where = [ring.index(tuple(v)) for v in simple.ring(i).tolist()]  # raises if not a vertex
        steps = np.diff(where + [where[0] + len(ring)]) % len(ring)
        assert steps.sum() == len(ring)  # one turn around the ring, in order


# A 22-pixel object whose Douglas-Peucker outline at 1 px crosses itself near (x, y) = (9, 2).
SELF_CROSSING = """
..........
....#####.
.######...
..#####...
...###....
...##.....
...#......
..........
"""


def parse_mask(text):
    return np.array([[c == "#" for c in row] for row in text.strip().splitlines()])


def test_simplification_that_self_intersects_falls_back_to_the_exact_outline():
    mask = parse_mask(SELF_CROSSING)
    rings, objects, _ = objects_of(mask)
    simple = simplify_rings(rings, 1.0)
    assert not shapely.is_valid(objects.geometries(simple)[0])  # the case this test is about
    use_simple, repaired = valid_outlines(rings, simple, objects)
    assert use_simple.tolist() == [False] and not repaired


def test_geojson_self_crossing_simplification_falls_back(tmp_path, tissues):
    lab = np.zeros((64, 64), np.uint8)
    lab[20:28, 30:40][parse_mask(SELF_CROSSING)] = tissues["dt"].label
    path = write_labels(tmp_path / "l.h5", lab, tissues)
    exact = load_features(labels_to_geojson(path, tmp_path / "e.geojson", tissues, simplify_px=0))
    (feature,) = load_features(labels_to_geojson(path, tmp_path / "s.geojson", tissues))
    assert feature["geometry"] == exact[0]["geometry"]  # the exact outline, in level-0 frame
    assert check_geometry(feature) == 22


def test_geojson_random_blobs_are_valid_with_close_areas(tmp_path, tissues):
    """Many simplified objects, a few of which fall back: all valid, areas close."""
    lab = np.zeros((600, 500), np.uint8)
    lab[blobs(0, (598, 498), fraction=0.3)] = tissues["pt"].label
    lab[blobs(1, (598, 498), fraction=0.3) & (lab == 0)] = tissues["dt"].label
    path = write_labels(tmp_path / "l.h5", lab, tissues)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing clipped
        out = labels_to_geojson(path, tmp_path / "s.geojson", tissues, strip=256, margin=128)
    features = load_features(out)
    assert len(features) > 300
    total = 0
    for f in features:
        area, px = check_geometry(f), f["properties"]["measurements"]["area_px"]
        assert abs(area - px) <= 0.5 * np.sqrt(px) * 4 + 2  # about a pixel row per side
        total += area
    px = sum(f["properties"]["measurements"]["area_px"] for f in features)
    assert abs(total - px) < 0.03 * px  # corners cut: a small bias inwards


def test_diagonal_touches_give_valid_geojson(tmp_path, tissues):
    """Pixels touching only at corners: two squares sharing a point (a MultiPolygon), a hole
    touching its shell at a corner, two holes touching each other, a checkerboard."""
    lab = np.zeros((80, 80), np.uint8)
    dt, pt, cap, ves = (tissues[k].label for k in ("dt", "pt", "cap", "ves"))
    lab[10:14, 10:14] = dt
    lab[14:18, 14:18] = dt  # touches the first square at one corner
    lab[30:40, 10:20] = pt
    lab[33:35, 13:15] = 0  # a hole ...
    lab[35:37, 15:17] = 0  # ... and a second one touching it at a corner
    lab[30:40, 40:50] = cap
    lab[35:40, 45:50] = 0  # notch ...
    lab[33:35, 43:45] = 0  # ... with a hole touching it (the outside) at a corner
    checker = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)
    lab[60:68, 60:68][checker] = ves
    path = write_labels(tmp_path / "l.h5", lab, tissues)
    for px in (0, 1.0):
        out = labels_to_geojson(
            path, tmp_path / f"t{px}.geojson", tissues, simplify_px=px, min_area_px=1
        )
        features = {f["properties"]["tissue"]: f for f in load_features(out)}
        assert sorted(features) == ["cap", "dt", "pt", "ves"]
        for f in features.values():
            assert check_geometry(f) == f["properties"]["measurements"]["area_px"]
        assert features["dt"]["geometry"]["type"] == "MultiPolygon"
        assert len(features["pt"]["geometry"]["coordinates"]) == 3  # shell and two holes
        assert len(features["ves"]["geometry"]["coordinates"]) == 32  # one square per pixel


def figure_eight(x0=0, y0=0):
    """Two pixels touching at a corner as ONE ring through that corner twice (what an
    8-connected tracer would give): invalid for GEOS (ring self-intersection)."""
    ring = np.array([[0, 0], [1, 0], [1, 1], [2, 1], [2, 2], [1, 2], [1, 1], [0, 1]])
    ring = ring + [x0, y0]
    return Rings(ring[:, 0], ring[:, 1], np.array([0, 8]), np.array([1]))


def test_invalid_exact_outline_is_repaired():
    rings = figure_eight()
    objects = Objects.group(rings, np.array([0]))
    assert not shapely.is_valid(objects.geometries(rings)[0])
    use_simple, repaired = valid_outlines(rings, rings, objects)
    assert not use_simple[0]
    fixed = repaired[0]
    assert shapely.is_valid(fixed) and fixed.area == 2 and len(fixed.geoms) == 2
    assert np.array_equal(shapely.get_coordinates(fixed) % 1, np.zeros((10, 2)))
    for p in fixed.geoms:
        assert p.exterior.is_ccw  # positive shoelace area, like trace_rings' shells
        assert shoelace2(np.asarray(p.exterior.coords, np.int64)) > 0


def test_geojson_repairs_an_invalid_outline(tmp_path, tissues, monkeypatch):
    """An (hypothetically) invalid exact outline is repaired: valid, level-0 coordinates."""
    lab = np.zeros((600, 600), np.uint8)
    lab[520, 540] = lab[521, 541] = tissues["dt"].label  # in the second 512-block
    path = write_labels(tmp_path / "l.h5", lab, tissues)

    def traced(parts):
        rows, cols = np.nonzero(parts)
        rings = figure_eight(cols.min(), rows.min())
        rings.comp[:] = parts[rows[0], cols[0]]
        return rings

    monkeypatch.setattr(export, "trace_rings", traced)
    out = labels_to_geojson(path, tmp_path / "t.geojson", tissues, strip=512, min_area_px=1)
    (feature,) = load_features(out)
    assert check_geometry(feature) == 2
    assert feature["geometry"]["type"] == "MultiPolygon"
    xy = np.concatenate([np.asarray(r) for p in feature["geometry"]["coordinates"] for r in p])
    assert (xy.min(axis=0).tolist(), xy.max(axis=0).tolist()) == ([540, 520], [542, 522])


# -- areas --------------------------------------------------------------------------------------
def test_tissue_areas(labels_h5, label_map, tissues, tmp_path):
    df = tissue_areas(labels_h5, tmp_path / "areas.csv", tissues, strip=512, margin=128)
    back = pd.read_csv(tmp_path / "areas.csv")
    assert list(back["tissue"]) == tissues.keys
    for t in tissues:
        row = df.set_index("tissue").loc[t.key]
        n_px = int((label_map == t.label).sum())
        assert row["objects"] == len(expected_objects(label_map, t.label))
        assert row["area_px"] == n_px
        assert row["area_mm2"] == pytest.approx(n_px * MPP**2 / 1e6)
        assert row["fraction_of_tissue"] == pytest.approx(n_px / 1_000_000)
    assert df.set_index("tissue").loc["ptc", "objects"] == 4  # the 2-px object is not counted
    assert np.allclose(back["area_mm2"], df["area_mm2"])


def test_tissue_areas_unknown_tissue_area(tmp_path, label_map, tissues):
    path = write_labels(tmp_path / "l.h5", label_map, tissues)
    df = tissue_areas(path, tmp_path / "areas.csv", tissues)
    assert df["fraction_of_tissue"].isna().all()


# -- empty map ----------------------------------------------------------------------------------
def test_empty_map(tmp_path, tissues):
    path = write_labels(tmp_path / "e.h5", np.zeros((300, 200), np.uint8), tissues)
    with pytest.warns(UserWarning, match="no labelled pixel"):
        out = labels_to_geojson(path, tmp_path / "e.geojson", tissues)
    assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}
    with pytest.warns(UserWarning, match="no labelled pixel"):
        df = tissue_areas(path, tmp_path / "e.csv", tissues)
    assert (df["objects"] == 0).all() and (df["area_mm2"] == 0).all()
    with pytest.warns(UserWarning, match="no labelled pixel"):
        write_overlay(path, tmp_path / "e.png", tissues)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tif = write_label_pyramid(path, tmp_path / "e.ome.tif")
    assert not tifffile.imread(tif).any()


# -- QuPath: object type, measurements; progress -----------------------------------------------
def test_geojson_numbers_are_measurements_and_object_type_is_a_choice(labels_h5, tissues, tmp_path):
    """QuPath keeps per-object numbers under `measurements` and drops other keys on import."""
    out = labels_to_geojson(labels_h5, tmp_path / "d.geojson", tissues, object_type="detection")
    features = load_features(out)
    assert features and all(f["properties"]["objectType"] == "detection" for f in features)
    for f in features:
        props = f["properties"]
        assert set(props["measurements"]) == {"area_um2", "area_px"}
        assert all(isinstance(v, int | float) for v in props["measurements"].values())
        assert not {"area_um2", "area_px"} & set(props)
    default = load_features(labels_to_geojson(labels_h5, tmp_path / "a.geojson", tissues))
    assert {f["properties"]["objectType"] for f in default} == {"annotation"}
    with pytest.raises(ValueError, match="object_type must be one of annotation, detection"):
        labels_to_geojson(labels_h5, tmp_path / "x.geojson", tissues, object_type="cell")


def test_exports_show_progress(labels_h5, tissues, tmp_path, capsys):
    write_label_pyramid(labels_h5, tmp_path / "l.ome.tif")
    labels_to_geojson(labels_h5, tmp_path / "t.geojson", tissues)
    tissue_areas(labels_h5, tmp_path / "a.csv", tissues)
    err = capsys.readouterr().err
    assert "labels.ome.tif" in err and "tissues.geojson" in err and "areas" in err
    tissue_areas(labels_h5, tmp_path / "b.csv", tissues, progress=False)
    assert "areas" not in capsys.readouterr().err
