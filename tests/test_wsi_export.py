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
import tifffile
from scipy import ndimage

from omniseg.io import read_image
from omniseg.wsi.export import (
    LABEL_TABLE_NAMESPACE,
    label_map_info,
    labels_to_geojson,
    pyramid_shapes,
    tissue_areas,
    write_label_pyramid,
    write_overlay,
)
from omniseg.wsi.geometry import Rings, groups_valid, rings_valid, simplify_rings, trace_rings

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
    rings = []
    for poly in polygons_of(geom):
        for i, ring in enumerate(poly):
            assert len(ring) >= 5 and ring[0] == ring[-1]  # closed, >= 4 distinct corners
            assert (shoelace2(ring) > 0) == (i == 0)  # outer ring first, holes after
            rings.append(np.asarray(ring[:-1]))
    assert rings_valid(rings)
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


# -- tracing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_trace_random_masks(seed):
    """Random masks (many diagonal touches): rings are simple, areas exact per 4-component."""
    rng = np.random.default_rng(seed)
    mask = rng.random((40, 50)) < 0.45
    comp, n = ndimage.label(mask)
    rings = trace_rings(comp)
    area2 = rings.area2()
    assert area2.sum() == 2 * mask.sum()
    assert np.array_equal(np.bincount(rings.comp[area2 > 0], minlength=n + 1)[1:], np.ones(n))
    per_comp = np.bincount(rings.comp, weights=area2, minlength=n + 1)[1:] / 2
    assert np.array_equal(per_comp, np.bincount(comp.ravel())[1:])
    for c in range(1, n + 1):
        assert rings_valid([rings.ring(i) for i in np.flatnonzero(rings.comp == c)])


def test_trace_unit_square_and_simplify():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    rings = trace_rings(mask.astype(int))
    assert rings.ring(0).tolist() == [[1, 1], [2, 1], [2, 2], [1, 2]]
    assert np.array_equal(simplify_rings(rings, 5.0).ring(0), rings.ring(0))  # never degenerate


def test_grouped_validity_matches_brute_force():
    """The grid-hashed check over many objects agrees with the all-pairs check."""
    rng = np.random.default_rng(3)
    rings, groups = [], []
    for _ in range(200):
        members = []
        for _ in range(rng.integers(1, 3)):
            rings.append(rng.integers(0, 30, (rng.integers(3, 8), 2)))
            members.append(len(rings) - 1)
        groups.append(np.array(members))
    packed = Rings(
        np.concatenate([r[:, 0] for r in rings]),
        np.concatenate([r[:, 1] for r in rings]),
        np.r_[0, np.cumsum([len(r) for r in rings])],
        np.zeros(len(rings), np.int64),
    )
    want = np.array([rings_valid([rings[i] for i in g]) for g in groups])
    assert 0 < want.sum() < len(want)  # both kinds present
    for cell in (1, 4, 8, 64):
        assert np.array_equal(groups_valid(packed, groups, cell=cell), want)


def test_rings_valid_detects_crossing():
    bowtie = np.array([[0, 0], [2, 0], [0, 2], [2, 2]])
    assert not rings_valid([bowtie])
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2]])
    assert rings_valid([square])
    assert not rings_valid([square, square + 1])  # overlapping rings cross


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
