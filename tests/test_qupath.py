"""Tests of omniseg.wsi.qupath: GeoJSON parsing, rasterisation, ROI planning, import round trip."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from omniseg.data.sheet import load_sheet
from omniseg.io import read_image, read_mask, write_png
from omniseg.wsi.export import labels_to_geojson
from omniseg.wsi.qupath import (
    SlideRegionReader,
    feature_class,
    feature_polygons,
    import_qupath,
    plan_rois,
    rasterize,
    rasterize_polygon,
    read_geojson_features,
)

MPP = 0.25


def disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def make_map(tissues, shape=(1200, 1000)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    L = {t.key: t.label for t in tissues}
    lab[disc(shape, 150, 150, 40)] = L["dt"]
    lab[disc(shape, 260, 330, 30)] = L["dt"]  # near the first: same ROI
    lab[disc(shape, 1000, 850, 35)] = L["dt"]  # far away: its own ROI
    ring = disc(shape, 600, 500, 70) & ~disc(shape, 600, 500, 30)
    lab[ring] = L["pt"]
    lab[400:410, 100:110] = L["ves"]  # two squares touching at a corner
    lab[410:420, 110:120] = L["ves"]
    lab[1150:1200, 0:60] = L["cap"]  # at the slide's corner
    return lab


def write_labels(path: Path, labels: np.ndarray, tissues) -> Path:
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("labels", data=labels, chunks=(256, 256), compression="gzip")
        dset.attrs["mpp"] = MPP
        dset.attrs["label_table"] = json.dumps(
            {str(k): v for k, v in tissues.label_table().items()}
        )
        dset.attrs["tissues"] = tissues.to_json()
    return path


def slide_pixels(shape) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def write_tiled_slide(path: Path, img: np.ndarray, mpp: float = MPP) -> Path:
    """A small tiled RGB TIFF with resolution tags (OpenSlide opens it as generic-tiff)."""
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return path


# -- GeoJSON parsing ----------------------------------------------------------------------------
def test_read_features_forms(tmp_path):
    feat = {"type": "Feature", "geometry": None, "properties": {"classification": "Tumor"}}
    for data in ({"type": "FeatureCollection", "features": [feat]}, [feat], feat):
        path = tmp_path / "a.geojson"
        path.write_text(json.dumps(data))
        assert read_geojson_features(path) == [feat]
    assert feature_class(feat) == "Tumor"  # legacy string form
    assert feature_class({"properties": {"classification": {"name": "Glom"}}}) == "Glom"
    assert feature_class({"properties": {}}) is None


def test_read_features_errors(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.geojson is not valid JSON"):
        read_geojson_features(bad)
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="empty.geojson has no features"):
        read_geojson_features(empty)
    other = tmp_path / "other.geojson"
    other.write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(ValueError, match="other.geojson"):
        read_geojson_features(other)


def test_feature_polygons():
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    hole = [[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]]
    polys = feature_polygons({"type": "Polygon", "coordinates": [square, hole]})
    assert len(polys) == 1 and len(polys[0]) == 2 and polys[0][0].shape == (4, 2)
    multi = {"type": "MultiPolygon", "coordinates": [[square], [hole]]}
    assert len(feature_polygons(multi)) == 2
    coll = {"type": "GeometryCollection", "geometries": [multi, {"type": "Point"}]}
    assert len(feature_polygons(coll)) == 2
    assert feature_polygons({"type": "LineString", "coordinates": square}) == []


# -- rasterisation ------------------------------------------------------------------------------
def test_rasterize_pixel_corner_square_with_hole():
    square = np.array([[2, 1], [6, 1], [6, 5], [2, 5]], float)  # x 2..6, y 1..5
    hole = np.array([[3, 2], [3, 3], [4, 3], [4, 2]], float)  # the pixel (row 2, col 3)
    got = rasterize_polygon([square, hole], 0, 0, 7, 8)
    want = np.zeros((7, 8), bool)
    want[1:5, 2:6] = True
    want[2, 3] = False
    assert np.array_equal(got, want)
    # a window offset and clipping: the same polygon seen from (x0=3, y0=2), 2 x 10
    window = rasterize_polygon([square, hole], 3, 2, 2, 10)  # offset, reaching past x = 8
    assert np.array_equal(window, np.pad(want[2:4, 3:], ((0, 0), (0, 5))))


def test_rasterize_triangle_centres():
    tri = np.array([[0.2, 0], [10.3, 0], [0.2, 10.1]])  # x > 0.2, y > 0, x + y < 10.3
    got = rasterize_polygon([tri], 0, 0, 12, 12)
    y, x = np.mgrid[:12, :12] + 0.5
    assert np.array_equal(got, x + y < 10.3)


def test_rasterize_union_of_overlapping_polygons():
    a = [np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)]
    b = [np.array([[2, 2], [6, 2], [6, 6], [2, 6]], float)]
    got = rasterize([a, b], 0, 0, 8, 8)
    assert got[3, 3] and got.sum() == 16 + 16 - 4  # union, not even-odd across polygons


# -- ROI planning -------------------------------------------------------------------------------
def test_plan_rois_groups_and_clamps():
    boxes = np.array(
        [
            [100, 100, 150, 150],  # seed 1
            [300, 300, 350, 350],  # inside ROI 1 (x 50..562)
            [900, 900, 950, 950],  # far: ROI 2, clamped to the slide
            [0, 600, 700, 700],  # wider than roi_size: ROI = bbox + margin
        ]
    )
    plans = plan_rois(boxes, (1000, 1000), roi_size=512, margin=50)
    rois = {tuple(m.tolist()): r for r, m in plans}
    assert rois[(0, 1)] == (50, 50, 512, 512)
    assert rois[(3,)] == (0, 488, 800, 512)  # 550 clamped: 550 + 512 > 1000
    assert rois[(2,)] == (488, 488, 512, 512)  # clamped: 850 + 512 > 1000
    assert len(plans) == 3


# -- slide reading ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiled", "strips", "png", "planar", "memmap"])
def test_slide_reader(tmp_path, kind, monkeypatch):
    img = slide_pixels((300, 260))
    path = tmp_path / "s.tif"
    if kind == "tiled":
        write_tiled_slide(path, img)
    elif kind == "strips":  # OpenSlide cannot open it: tifffile reads the strips it needs
        tifffile.imwrite(path, img, photometric="rgb", compression="zlib", rowsperstrip=16)
    elif kind == "planar":  # read whole (small enough)
        tifffile.imwrite(path, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate")
    elif kind == "memmap":  # one strip above the cap, uncompressed: memory-mapped
        tifffile.imwrite(path, img, photometric="rgb")
        monkeypatch.setattr("omniseg.wsi.qupath.MAX_PLAIN_PIXELS", 1000)
    else:
        path = tmp_path / "s.png"
        write_png(path, img)
    with SlideRegionReader(path) as reader:
        assert reader.size == (260, 300)
        assert np.array_equal(reader.read(37, 100, 150, 90), img[100:190, 37:187])
        assert np.array_equal(reader.read(0, 0, 260, 300), img)
        with pytest.raises(ValueError, match="outside"):
            reader.read(200, 0, 100, 10)
    if kind == "tiled":
        assert SlideRegionReader(path).mpp == pytest.approx(MPP)


def test_slide_reader_size_cap(tmp_path, monkeypatch):
    path = tmp_path / "planar.tif"
    tifffile.imwrite(
        path,
        np.zeros((3, 300, 260), np.uint8),
        photometric="rgb",
        planarconfig="separate",
        compression="zlib",
    )
    monkeypatch.setattr("omniseg.wsi.qupath.MAX_PLAIN_PIXELS", 1000)
    with pytest.raises(ValueError, match="planar.tif is 260x300.*too large"):
        SlideRegionReader(path)
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        SlideRegionReader(tmp_path / "missing.tif")


# -- import -------------------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path, tissues):
    """A slide, its label map and our own GeoJSON export of it (exact pixel outlines)."""
    labels = make_map(tissues)
    img = slide_pixels(labels.shape)
    slide = write_tiled_slide(tmp_path / "case 01.tif", img)
    h5 = write_labels(tmp_path / "labels.h5", labels, tissues)
    geojson = labels_to_geojson(h5, tmp_path / "tissues.geojson", tissues, simplify_px=0)
    return slide, geojson, labels, img


def test_import_round_trip(tmp_path, tissues, exported):
    slide, geojson, labels, img = exported
    class_map = {t.name: t.key for t in tissues}
    sheet = import_qupath(
        slide,
        geojson,
        tmp_path / "rois",
        tissues,
        class_map=class_map,
        roi_size=400,
        margin_px=32,
        stain="pas",
    )
    assert sheet == tmp_path / "rois" / "rois.tsv"
    df = load_sheet(sheet, tissues)
    present = {t.key for t in tissues if (labels == t.label).any()}
    assert set(df["tissue"]) == present
    assert (df["patient"] == "case_01").all() and (df["stain"] == "pas").all()
    assert df["roi_id"].is_unique
    assert (df["tissue"] == "dt").sum() == 2  # two near discs share a ROI, the far one not
    for row in df.itertuples():
        x, y, w, h = int(row.x), int(row.y), int(row.width), int(row.height)
        assert 0 <= x and x + w <= labels.shape[1] and 0 <= y and y + h <= labels.shape[0]
        assert w >= 400 and h >= 400  # roi_size (the slide is larger)
        truth = labels[y : y + h, x : x + w] == tissues[row.tissue].label
        assert np.array_equal(read_mask(row.mask), truth), row.roi_id
        assert np.array_equal(read_image(row.image), img[y : y + h, x : x + w])
        assert truth.any()
    # every labelled pixel of every tissue is in some ROI mask
    for t in tissues:
        covered = np.zeros(labels.shape, bool)
        for row in df[df["tissue"] == t.key].itertuples():
            x, y, w, h = int(row.x), int(row.y), int(row.width), int(row.height)
            covered[y : y + h, x : x + w] |= read_mask(row.mask)
        assert np.array_equal(covered, labels == t.label), t.key


def test_import_unknown_classes_warn(tmp_path, tissues, exported):
    slide, geojson, labels, _ = exported
    class_map = {tissues["dt"].name: "dt"}
    with pytest.warns(UserWarning, match="not in class_map.*proximal tubule"):
        sheet = import_qupath(slide, geojson, tmp_path / "o", tissues, class_map=class_map)
    df = load_sheet(sheet, tissues)
    assert set(df["tissue"]) == {"dt"}
    assert len(df) == 1 and int(df["width"][0]) == 1000  # roi_size 2048 clamped to the slide


def test_import_errors(tmp_path, tissues, exported):
    slide, geojson, _, img = exported
    with pytest.raises(ValueError, match="unknown tissue key"):
        import_qupath(slide, geojson, tmp_path / "o", tissues, class_map={"x": "nope"})
    with pytest.raises(ValueError, match="no polygon of a class in class_map"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import_qupath(slide, geojson, tmp_path / "o", tissues, class_map={"x": "dt"})
    bad = tmp_path / "bad.geojson"
    bad.write_text("[")
    with pytest.raises(ValueError, match="bad.geojson"):
        import_qupath(slide, bad, tmp_path / "o", tissues, class_map={"x": "dt"})
    slide20x = write_tiled_slide(tmp_path / "s20.tif", img, mpp=0.5)
    class_map = {t.name: t.key for t in tissues}
    with pytest.raises(ValueError, match="s20.tif has 0.5 um/px"):
        import_qupath(slide20x, geojson, tmp_path / "o", tissues, class_map=class_map)


# -- QuPath conventions: derived classes, object types, the hierarchy --------------------------
def _square(x, y, side=40):
    ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


def _feature(x, y, classification, object_type="annotation", side=40):
    props = {"objectType": object_type, "classification": classification}
    return {"type": "Feature", "geometry": _square(x, y, side or 40), "properties": props}


def test_feature_class_reads_derived_class_names():
    """QuPath >= 0.4 writes `names` (the parts of a derived class) instead of `name`."""
    assert feature_class(_feature(0, 0, {"names": ["Glomerulus", "Tuft"]})) == "Glomerulus: Tuft"
    assert feature_class(_feature(0, 0, {"names": ["tuft"], "color": [1, 2, 3]})) == "tuft"
    assert feature_class(_feature(0, 0, {"name": "tuft", "names": ["x"]})) == "tuft"
    assert feature_class(_feature(0, 0, {"names": []})) is None


def _slide(tmp_path):
    return write_tiled_slide(tmp_path / "s.tif", slide_pixels((600, 600)))


def test_import_only_annotations_by_default(tmp_path, tissues, caplog):
    geojson = tmp_path / "objects.geojson"
    features = [
        _feature(100, 100, {"name": "tuft"}),
        _feature(300, 300, {"name": "tuft"}, "detection"),
        _feature(320, 100, {"name": "tuft"}, "cell"),
        _feature(400, 400, {"name": "tuft"}, "cell"),
    ]
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with caplog.at_level("INFO", logger="omniseg.wsi.qupath"):
        sheet = import_qupath(
            _slide(tmp_path),
            geojson,
            tmp_path / "o",
            tissues,
            class_map={"tuft": "tuft"},
            roi_size=64,
            margin_px=0,
        )
    df = load_sheet(sheet, tissues)
    assert len(df) == 1 and int(df["x"][0]) == 100  # the annotation only
    assert "2 cell object(s), 1 detection object(s)" in caplog.text
    both = import_qupath(
        _slide(tmp_path),
        geojson,
        tmp_path / "o2",
        tissues,
        class_map={"tuft": "tuft"},
        roi_size=64,
        margin_px=0,
        object_types=("annotation", "detection"),
    )
    assert len(load_sheet(both, tissues)) == 2


def test_import_walks_child_objects_and_derived_classes(tmp_path, tissues):
    parent = _feature(100, 100, {"names": ["Glomerulus", "Capsule"]})
    child = _feature(110, 110, {"names": ["Glomerulus", "Tuft"]}, side=None)
    child["geometry"] = _square(110, 110, side=20)
    grandchild = _feature(400, 400, {"name": "tuft"})
    child["properties"]["childObjects"] = [grandchild]  # QuPath nests children in properties
    parent["childObjects"] = [child]  # or in the feature itself
    geojson = tmp_path / "tree.geojson"
    geojson.write_text(json.dumps([parent]))
    sheet = import_qupath(
        _slide(tmp_path),
        geojson,
        tmp_path / "o",
        tissues,
        class_map={"Capsule": "cap", "Tuft": "tuft", "tuft": "tuft"},
        roi_size=64,
        margin_px=0,
    )
    df = load_sheet(sheet, tissues)
    assert sorted(df["tissue"]) == ["cap", "tuft", "tuft"]


def test_import_shows_progress(tmp_path, tissues, exported, capsys):
    slide, geojson, _, _ = exported
    import_qupath(
        slide, geojson, tmp_path / "o", tissues, class_map={t.name: t.key for t in tissues}
    )
    assert "QuPath ROIs" in capsys.readouterr().err
