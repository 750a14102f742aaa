"""Tests of the synthetic cohort generator (omniseg.synthetic.cohort / omniseg.synthetic.render)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from omniseg.io import read_image, read_mask
from omniseg.synthetic import render
from omniseg.synthetic.cohort import (
    SHEET_COLUMNS,
    STAINS,
    load_truth,
    render_tissue,
    save_truth,
    synthesize_cohort,
)
from omniseg.tissues import TissueTable

UM = 0.25


@pytest.fixture(scope="module")
def rendered(tissues):
    """One 512^2 ROI per focus tissue, with instance ids: {key: (image, masks, instances)}."""
    out = {}
    for i, key in enumerate(tissues.keys):
        rng = np.random.default_rng(100 + i)
        image, masks, inst = render._render(rng, (512, 512), STAINS[i % 4], key, UM, None, True)
        out[key] = (image, masks, inst)
    return out


def _render(tissues, seed=0, shape=(256, 256), stain="he", focus=None, **kw):
    return render_tissue(np.random.default_rng(seed), shape, stain, tissues, focus=focus, **kw)


def test_shapes_dtypes_and_keys(tissues):
    image, masks = _render(tissues, shape=(200, 300), stain="pas", focus="pt")
    assert image.shape == (200, 300, 3) and image.dtype == np.uint8
    assert list(masks) == tissues.keys
    for m in masks.values():
        assert m.shape == (200, 300) and m.dtype == bool
    assert 60 < image.mean() < 250  # neither black nor blank


def test_deterministic_per_seed(tissues):
    a_img, a_masks = _render(tissues, seed=7, focus="pt")
    b_img, b_masks = _render(tissues, seed=7, focus="pt")
    c_img, c_masks = _render(tissues, seed=8, focus="pt")
    assert np.array_equal(a_img, b_img)
    assert all(np.array_equal(a_masks[k], b_masks[k]) for k in tissues.keys)
    assert not np.array_equal(a_img, c_img)
    assert any(not np.array_equal(a_masks[k], c_masks[k]) for k in tissues.keys)


@pytest.mark.parametrize("key", ["dt", "pt", "cap", "tuft", "ves", "ptc"])
def test_focus_tissue_present_near_centre(rendered, key):
    _, masks, _ = rendered[key]
    m = masks[key]
    assert m.any()
    # an object of the focus tissue reaches the central third of the ROI
    assert m[171:341, 171:341].any()


def test_tuft_inside_capsule(rendered):
    for key in ("cap", "tuft"):
        _, masks, _ = rendered[key]
        assert masks["tuft"].any()
        assert not (masks["tuft"] & ~masks["cap"]).any()
        assert masks["cap"].sum() > masks["tuft"].sum()  # capsule wall + Bowman's space


def test_distinct_objects_do_not_overlap(rendered):
    for _, masks, inst in rendered.values():
        others = ["dt", "pt", "ves", "ptc"]
        for i, a in enumerate(others):
            for b in others[i + 1 :] + ["cap"]:
                assert not (masks[a] & masks[b]).any(), (a, b)
        # instances (single tubules, capillaries, arteries) never touch, even diagonally
        for da, db in (
            (inst[1:], inst[:-1]),
            (inst[:, 1:], inst[:, :-1]),
            (inst[1:, 1:], inst[:-1, :-1]),
            (inst[1:, :-1], inst[:-1, 1:]),
        ):
            touching = (da > 0) & (db > 0) & (da != db)
            assert not touching.any()
        tubules = masks["pt"] | masks["dt"]
        assert np.array_equal(tubules, (inst > 0) & (inst < 1_000_000))


def test_many_tubules_of_plausible_size(rendered):
    _, masks, inst = rendered["pt"]
    ids, areas = np.unique(inst[(inst > 0) & (inst < 1_000_000)], return_counts=True)
    assert len(ids) >= 10  # 128 um square holds many tubules
    diam_um = 2 * np.sqrt(areas.max() / np.pi) * UM
    assert diam_um < 80  # no giant tubule (merged pairs allowed)


def test_ptc_masks_are_small(rendered):
    n = 0
    for _, masks, _ in rendered.values():
        lab, k = ndi.label(masks["ptc"])
        n += k
        for sl in ndi.find_objects(lab):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            assert max(h, w) * UM <= 17.0  # lumen <= 15 um (+ outline wobble)
        if k:
            area = np.bincount(lab.ravel())[1:] * UM**2
            assert area.max() < np.pi * 8.0 * 4.0
    assert n >= 6  # capillaries are everywhere in the interstitium


def test_tissue_mask_gives_glass_and_empty_masks(tissues):
    tm = np.zeros((256, 256), bool)
    tm[:, :128] = True
    image, masks = _render(tissues, focus="pt", tissue_mask=tm)
    glass = image[:, 140:]  # past the blur margin
    assert np.abs(glass.astype(int) - render.GLASS_RGB).max() <= 12
    for m in masks.values():
        assert not m[:, 128:].any()
    assert masks["pt"].any()


def test_tiled_rendering_equals_whole(tissues, monkeypatch):
    rng = np.random.default_rng(3)
    whole, masks_w, _ = render._render(rng, (300, 520), "tri", "ptc", UM, None)
    monkeypatch.setattr(render, "_TILE", 128)
    rng = np.random.default_rng(3)
    tiled, masks_t, _ = render._render(rng, (300, 520), "tri", "ptc", UM, None)
    assert np.array_equal(whole, tiled)
    assert all(np.array_equal(masks_w[k], masks_t[k]) for k in masks_w)


def test_other_resolution(tissues):
    # 10x (1 um/px): a 256 px ROI is 256 um and holds a whole glomerulus
    image, masks = _render(tissues, shape=(256, 256), focus="tuft", um_per_px=1.0)
    assert masks["tuft"].any() and not (masks["tuft"] & ~masks["cap"]).any()
    diam_um = 2 * np.sqrt(masks["cap"].sum() / np.pi)
    assert 100 < diam_um < 260


def test_stains_differ(tissues):
    means = [_render(tissues, seed=1, stain=s)[0].reshape(-1, 3).mean(0) for s in STAINS]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 5, (STAINS[i], STAINS[j])
    tri = _render(tissues, seed=1, stain="tri")[0]
    assert tri[..., 2].mean() > tri[..., 1].mean()  # blue collagen, red cytoplasm


def test_bad_arguments(tissues):
    with pytest.raises(ValueError, match="unknown stain"):
        _render(tissues, stain="gram")
    with pytest.raises(ValueError, match="focus"):
        _render(tissues, focus="liver")
    with pytest.raises(ValueError, match="tissue_mask"):
        _render(tissues, tissue_mask=np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="shape"):
        _render(tissues, shape=(0, 10))


def _extended(tissues) -> TissueTable:
    rec = tissues.to_records()
    rec.append(
        {**rec[0], "id": len(rec), "key": "foo", "release_folder": "6_1_foo", "mask_suffix": "foo"}
    )
    return TissueTable.from_records(rec)


def test_unknown_tissue_key(tissues, tmp_path):
    ext = _extended(tissues)
    _, masks = _render(ext, focus="pt")
    assert "foo" in masks and not masks["foo"].any()
    with pytest.raises(ValueError, match="cannot draw"):
        _render(ext, focus="foo")
    with pytest.raises(ValueError, match="cannot draw"):
        synthesize_cohort(tmp_path, ext, patients=1, roi_size=64, progress=False)


def _cohort(tmp_path, tissues, name, **kw):
    args = dict(seed=5, patients=2, roi_size=192, progress=False)
    args.update(kw)
    return synthesize_cohort(tmp_path / name, tissues, **args)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cohort_layout_and_sheet(tissues, tmp_path):
    sheet = _cohort(tmp_path, tissues, "c", stains=("he", "sil"))
    assert sheet == tmp_path / "c" / "rois.tsv"
    with open(sheet, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert tuple(rows[0]) == SHEET_COLUMNS
    assert len(rows) == 2 * len(tissues)
    assert {r["roi_id"] for r in rows} == {f"p0{p}_{k}_0" for p in (1, 2) for k in tissues.keys}
    stains, by_tissue = {}, {}
    for r in rows:
        assert r["roi_id"] == f"{r['patient']}_{r['tissue']}_0"
        stains.setdefault(r["patient"], set()).add(r["stain"])
        by_tissue.setdefault(r["tissue"], []).append(r["stain"])
        for col in ("image", "mask", "truth"):
            assert not Path(r[col]).is_absolute()
            assert (sheet.parent / r[col]).is_file()
        image = read_image(sheet.parent / r["image"])
        mask = read_mask(sheet.parent / r["mask"])
        truth = load_truth(sheet.parent / r["truth"])
        assert image.shape == (192, 192, 3)
        assert list(truth) == tissues.keys
        assert np.array_equal(mask, truth[r["tissue"]])
        assert mask.any()
    # a patient's sections cycle through the stains, shifted by one per patient: both patients
    # hold both stains, and each tissue has a different stain in each patient
    assert all(s == {"he", "sil"} for s in stains.values())
    assert all(sorted(v) == ["he", "sil"] for v in by_tissue.values())


def test_cohort_is_reproducible_and_thread_independent(tissues, tmp_path):
    a = _digest(_cohort(tmp_path, tissues, "a", patients=1).parent)
    b = _digest(_cohort(tmp_path, tissues, "b", patients=1, threads=2).parent)
    assert a == b and len(a) == 1 + 3 * len(tissues)
    c = _digest(_cohort(tmp_path, tissues, "c", patients=1, seed=6).parent)
    assert c.keys() == a.keys() and c["images/p01_pt_0.png"] != a["images/p01_pt_0.png"]


def test_edge_mask_is_a_ragged_band_through_the_centre():
    from omniseg.synthetic.slide import edge_tissue_mask

    um = 2.0  # 1000 um square region
    for seed in range(6):
        m = edge_tissue_mask(np.random.default_rng(seed), (500, 500), um)
        assert m.dtype == bool and m.shape == (500, 500)
        assert m[240:261, 240:261].all()  # the centre (its focus structure) is tissue
        assert 0.15 < m.mean() < 0.95  # glass on at least one side, tissue across the middle
        lab, _n = ndi.label(m)  # one band (the ragged edge may leave a few crumbs)
        assert np.bincount(lab.ravel())[1:].max() > 0.95 * m.sum()
        # ragged, not straight: the boundary wanders in both directions around its line
        edge = m ^ ndi.binary_erosion(m)
        assert edge.sum() > 1.05 * 500
    same = [edge_tissue_mask(np.random.default_rng(1), (64, 80), 1.0) for _ in range(2)]
    assert np.array_equal(*same)
    with pytest.raises(ValueError, match="reach_um"):
        edge_tissue_mask(np.random.default_rng(0), (64, 64), 1.0, reach_um=(50.0, 10.0))


def test_cohort_edge_fraction_cuts_rois_and_keeps_the_rest(tissues, tmp_path):
    # 1600 px = 400 um: a band 200-800 um wide through the centre leaves glass in most ROIs
    kw = dict(patients=1, roi_size=1600)
    plain = _cohort(tmp_path, tissues, "plain", **kw)
    cut = _cohort(tmp_path, tissues, "cut", edge_fraction=1.0, **kw)
    half = _cohort(tmp_path, tissues, "half", edge_fraction=0.5, **kw)
    glass_rgb = np.asarray(render.GLASS_RGB)
    with open(cut, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    shares = []
    for r in rows:
        image = read_image(cut.parent / r["image"]).astype(int)
        truth = load_truth(cut.parent / r["truth"])
        glass = np.abs(image - glass_rgb).max(axis=2) <= 12
        shares.append(glass.mean())
        assert truth[r["tissue"]].any(), r["roi_id"]  # the focus structure survives the cut
        # nothing labelled on the glass: open glass, not a lumen (eroded by 20 um at 1 um/px)
        labelled = np.logical_or.reduce(list(truth.values()))[::4, ::4]
        open_glass = ndi.binary_erosion(glass[::4, ::4], iterations=20)
        assert not (labelled & open_glass).any(), r["roi_id"]
    assert sum(s > 0.05 for s in shares) >= len(shares) // 2, shares
    # ROIs left uncut are byte-identical to the same ROIs of a cohort without edges
    a, b = _digest(plain.parent), _digest(half.parent)
    images = [k for k in a if k.startswith("images/")]
    same = [k for k in images if a[k] == b[k]]
    assert 0 < len(same) < len(images)  # at 0.5, some of the six ROIs are cut, some not
    with pytest.raises(ValueError, match="edge_fraction"):
        synthesize_cohort(tmp_path / "bad", tissues, edge_fraction=1.5, progress=False)


def test_cohort_bad_arguments(tissues, tmp_path):
    with pytest.raises(ValueError, match="unknown stain"):
        synthesize_cohort(tmp_path, tissues, stains=("he", "xyz"), progress=False)
    with pytest.raises(ValueError, match="patients"):
        synthesize_cohort(tmp_path, tissues, patients=0, progress=False)
    assert not (tmp_path / "rois.tsv").exists()


def test_truth_roundtrip_and_errors(tmp_path):
    masks = {"a": np.eye(4, dtype=bool), "b": np.zeros((4, 4), bool)}
    save_truth(tmp_path / "t.npz", masks)
    back = load_truth(tmp_path / "t.npz")
    assert list(back) == ["a", "b"] and np.array_equal(back["a"], masks["a"])
    with pytest.raises(ValueError, match="does not exist"):
        load_truth(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        load_truth(tmp_path / "junk.npz")
    np.savez(tmp_path / "u8.npz", a=np.ones((2, 2), np.uint8))
    with pytest.raises(ValueError, match="not bool"):
        load_truth(tmp_path / "u8.npz")
