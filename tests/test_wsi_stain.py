"""Stain normalisation of slides (omniseg.wsi.stain): the training patches' reference, a slide's
density over its tissue mask, the gain, and reading a slide through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from omniseg import cli
from omniseg.data.patchset import PatchSetWriter
from omniseg.io import read_mask, write_png
from omniseg.resample import area_resize
from omniseg.steps import slides as steps
from omniseg.wsi import stain
from omniseg.wsi.sheet import load_slide_sheet
from omniseg.wsi.slide import Slide

MPP = 0.25
# colours of a tissue-like pixel: OD per channel of (120, 60, 150)
PINK = np.array([200, 110, 170], np.uint8)
PURPLE = np.array([120, 60, 150], np.uint8)
GLASS = np.array([245, 245, 245], np.uint8)


def od(rgb) -> np.ndarray:
    return -np.log(np.maximum(np.asarray(rgb, np.float64), 1.0) / 255.0)


def write_tiff(path: Path, image: np.ndarray, mpp: float = MPP) -> Path:
    res = 1e4 / mpp
    tifffile.imwrite(path, image, resolution=(res, res), resolutionunit="CENTIMETER")
    return path


def write_patch_set(path: Path, tissue, images, splits, stains) -> Path:
    n = len(images)
    with PatchSetWriter(path, tissue, images.shape[1]) as w:
        w.append(
            images,
            np.zeros(images.shape[:3], np.uint8),
            {"split": splits, "roi_id": [f"r{i}" for i in range(n)],
             "patient": [f"p{i}" for i in range(n)], "stain": stains},
        )  # fmt: skip
    return path


def filled(n: int, colour, size: int = 16) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (n, size, size, 3)).copy()


# -- optical density, gains and the lookup table --------------------------------------------------
def test_the_lookup_table_is_the_optical_density_formula():
    gain = [0.8, 1.0, 1.7]
    lut = stain.gain_lut(gain)
    values = np.arange(256)
    for c, g in enumerate(gain):
        expected = np.clip(np.rint(255 * np.exp(-od(values) * g)), 0, 255)
        assert np.abs(lut[:, c].astype(int) - expected).max() <= 1  # float32 vs float64
    assert (lut[255] == 255).all()  # glass and the outside of the slide stay white
    identity = stain.gain_lut([1, 1, 1])
    assert (identity[1:, :] == values[1:, None]).all() and (identity[0] == 1).all()

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = stain.apply_lut(rgb, lut)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    for c in range(3):
        assert (out[..., c] == lut[rgb[..., c], c]).all()


def test_gains_bring_a_density_to_the_reference():
    assert np.allclose(stain.stain_gain([0.4, 0.8, 0.4], [0.5, 0.4, 0.4]), [0.8, 2.0, 1.0])
    for bad in ([0.4, 0.0, 0.4], [0.4, np.nan, 0.4], [0.4, 0.8]):
        with pytest.raises(ValueError, match="three positive numbers"):
            stain.stain_gain([0.4, 0.8, 0.4], bad)
    with pytest.raises(ValueError, match="x.json: gain must be three positive numbers"):
        stain.check_gain([1.0, -1.0, 1.0], "x.json")


def test_density_counts_only_tissue_pixels_inside_the_kept_area():
    rgb = np.stack([np.tile(PURPLE, (4, 1)), np.tile(GLASS, (4, 1))])  # 2 x 4 pixels
    total, count = stain.density_sums(rgb)
    assert count == 4 and np.allclose(total / count, od(PURPLE), rtol=1e-6)
    keep = np.zeros((2, 4), bool)
    keep[0, :2] = True
    assert stain.density_sums(rgb, keep)[1] == 2
    assert stain.density_sums(np.tile(GLASS, (3, 3, 1)))[1] == 0


# -- the training reference -----------------------------------------------------------------------
def test_reference_uses_the_training_patches_of_each_stain(tmp_path, tissues):
    # training patches: he purple, pas pink; validation and test patches black (never counted)
    images = np.concatenate([filled(2, PURPLE), filled(1, PINK), filled(2, (0, 0, 0))])
    a = write_patch_set(tmp_path / "a.h5", tissues["dt"], images,
                        ["train", "train", "train", "val", "test"],
                        ["he", "he", "pas", "he", "pas"])  # fmt: skip
    # a second set: he glass-only patches add nothing, a he pink one adds to he
    b = write_patch_set(tmp_path / "b.h5", tissues["cap"],
                        np.concatenate([filled(1, GLASS), filled(1, PINK)]),
                        ["train", "train"], ["he", "he"])  # fmt: skip
    ref = stain.reference_densities([a, b])
    assert sorted(ref) == ["he", "pas"]
    assert ref["he"]["patches"] == 4 and ref["he"]["tissue_pixels"] == 3 * 256
    assert np.allclose(ref["he"]["density"], (2 * od(PURPLE) + od(PINK)) / 3, rtol=1e-5)
    assert np.allclose(ref["pas"]["density"], od(PINK), rtol=1e-5)

    out = steps.stain_reference([a, b], tmp_path / "ref.json")
    assert json.loads((tmp_path / "ref.json").read_text())["stains"] == out["stains"]


def test_reference_errors_name_the_file(tmp_path, tissues):
    glass = write_patch_set(tmp_path / "g.h5", tissues["dt"], filled(2, GLASS),
                            ["train", "train"], ["he", "he"])  # fmt: skip
    with pytest.raises(ValueError, match=r"g\.h5: no 'train' patch shows tissue"):
        stain.reference_densities([glass])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["images"] = np.zeros((1, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"other\.h5 lacks meta/stain, meta/split"):
        stain.reference_densities([other])
    text = tmp_path / "text.h5"
    text.write_text("not HDF5")
    with pytest.raises(ValueError, match=r"patch set .*text\.h5 cannot be read as HDF5"):
        stain.reference_densities([text])


# -- a slide's density and its gain ---------------------------------------------------------------
@pytest.fixture
def two_tone(tmp_path) -> dict:
    """A 40x slide: left half purple tissue, right half a pink 'pen mark' outside the mask,
    a glass border; the mask (at 4 um/px, downsample 16) covers the left half only."""
    h, w = 256, 512
    image = np.tile(GLASS, (h, w, 1))
    image[16:240, 16:256] = PURPLE
    image[16:240, 256:496] = PINK
    slide = write_tiff(tmp_path / "two_tone.tif", image)
    mask = np.zeros((h // 16, w // 16), bool)
    mask[:, :16] = True
    return {"slide": slide, "mask": mask, "downsample": 16.0}


def test_slide_density_is_measured_inside_the_mask_only(two_tone):
    with Slide(two_tone["slide"]) as s:
        density, pixels = stain.slide_density(s, two_tone["mask"], two_tone["downsample"])
        # bands of a few rows give the same answer as one read
        banded, n2 = stain.slide_density(s, two_tone["mask"], two_tone["downsample"],
                                         band_pixels=300)  # fmt: skip
    assert pixels == n2 > 0
    # 1 um/px: every tissue pixel inside the mask is purple, the pink half is outside it
    assert np.allclose(density, od(PURPLE), rtol=0.02)
    assert np.allclose(banded, density, rtol=1e-9)
    with Slide(two_tone["slide"]) as s:
        none, zero = stain.slide_density(s, np.zeros_like(two_tone["mask"]), 16.0)
    assert none is None and zero == 0


def _masked(tmp_path: Path, slide: Path) -> dict:
    out = tmp_path / "wsi"
    steps.mask_slide(slide, out / "tissue_mask.png", out / "tissue_mask.json", um_per_px=4.0,
                     min_area_um2=1000.0)  # fmt: skip
    return {"mask_png": out / "tissue_mask.png", "mask_json": out / "tissue_mask.json"}


def _reference(tmp_path: Path, density) -> Path:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"stains": {"he": {"density": list(density), "patches": 1,
                                                  "tissue_pixels": 1}}}))  # fmt: skip
    return path


def test_a_slide_read_through_its_gain_has_the_reference_density(tmp_path, tissues):
    """A synthetic H&E slide, its stain made 1.4x / 0.7x / 1.2x denser per channel: the gain
    undoes it, and the slide read through the gain measures the reference density."""
    slide = steps.synth_slide(tmp_path / "s.tif", tissues, seed=3, height=512, width=1024,
                              strips=2, tile=256, compression="deflate")["slide"]  # fmt: skip
    with Slide(slide) as s:
        w, h = s.dimensions
        plain = s.read_region(0, 0, w, h)
    factor = np.array([1.4, 0.7, 1.2])
    stained = write_tiff(tmp_path / "stained.tif", stain.apply_lut(plain, stain.gain_lut(factor)))
    mask = _masked(tmp_path, stained)
    with Slide(slide) as s:
        info = steps.read_mask_info(mask["mask_json"])
        mask_img = read_mask(mask["mask_png"])
        reference, _ = stain.slide_density(s, mask_img, info["downsample"])
    out = steps.slide_stain(stained, mask["mask_png"], mask["mask_json"],
                            _reference(tmp_path, reference), "he", tmp_path / "stain.json")  # fmt: skip
    saved = json.loads((tmp_path / "stain.json").read_text())
    assert saved == out and saved["stain"] == "he" and saved["tissue_pixels"] > 0
    assert np.allclose(out["gain"], 1 / factor, rtol=0.03)
    assert steps.read_stain_gain(tmp_path / "stain.json") == out["gain"]
    with Slide(stained, od_gain=out["gain"]) as s:
        normalised, _ = stain.slide_density(s, mask_img, info["downsample"])
        assert s.read_region(-8, -8, 4, 4).min() == 255  # outside the slide stays white
    assert np.allclose(normalised, reference, rtol=0.01)


def test_slide_read_through_a_gain_is_the_lookup_of_every_level(tmp_path, tissues):
    slide = steps.synth_slide(tmp_path / "s.tif", tissues, seed=2, height=512, width=1024,
                              tile=256)["slide"]  # fmt: skip
    gain = [0.9, 1.3, 0.6]
    lut = stain.gain_lut(gain)
    with Slide(slide) as plain, Slide(slide, od_gain=gain) as normed:
        assert plain.level_count > 1
        for level in range(plain.level_count):
            w, h = plain.level_dimensions[level]
            raw = plain.read_region(0, 0, w, h, level)
            assert (normed.read_region(0, 0, w, h, level) == stain.apply_lut(raw, lut)).all()
        # resampling comes after the lookup: the tiles of every scale are normalised alike
        level = plain.best_level(2.0)
        ds = plain.level_downsamples[level]
        a = normed.read_scaled(96, 64, 400, 320, 2.0)
        b = stain.apply_lut(plain.read_region(96, 64, round(400 / ds), round(320 / ds), level), lut)
        assert level > 0 and a.shape == (40, 50, 3)  # 2 um/px: 8 level-0 pixels per pixel
        assert (a == area_resize(b, 40, 50)).all()
    with pytest.raises(ValueError, match=r"s\.tif: gain must be three positive numbers"):
        Slide(slide, od_gain=[1.0, 0.0, 1.0])


def test_slide_stain_errors_and_warnings_are_named(tmp_path, two_tone, caplog):
    mask = _masked(tmp_path, two_tone["slide"])
    ref = _reference(tmp_path, od(PURPLE))
    with pytest.raises(ValueError, match=r"stain 'pas' has no training patches in .*ref\.json "
                       r"\(stains: he\)"):  # fmt: skip
        steps.slide_stain(two_tone["slide"], mask["mask_png"], mask["mask_json"], ref, "pas",
                          tmp_path / "x.json")  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"stain reference .*bad\.json cannot be read"):
        steps.slide_stain(two_tone["slide"], mask["mask_png"], mask["mask_json"], bad, "he",
                          tmp_path / "x.json")  # fmt: skip
    with pytest.raises(ValueError, match=r"stain file .*bad\.json cannot be read"):
        steps.read_stain_gain(bad)
    assert not (tmp_path / "x.json").exists()

    far = _reference(tmp_path, od(PINK) * 6)  # a slide far paler than its training stain
    with caplog.at_level(logging.WARNING, logger="omniseg"):
        out = steps.slide_stain(two_tone["slide"], mask["mask_png"], mask["mask_json"], far,
                                "he", tmp_path / "far.json")  # fmt: skip
    assert min(out["gain"]) > stain.GAIN_WARN
    assert "outside what was validated: is the stain right?" in caplog.text


def test_a_slide_without_tissue_keeps_its_colours(tmp_path, caplog):
    slide = write_tiff(tmp_path / "glass.tif", np.tile(GLASS, (128, 256, 1)))
    out = tmp_path / "wsi"
    write_png(out / "tissue_mask.png", np.zeros((8, 16), bool))
    (out / "tissue_mask.json").write_text(json.dumps({
        "slide": str(slide), "mpp": MPP, "level0_shape": [128, 256], "mask_um_per_px": 4.0,
        "downsample": 16.0, "mask_shape": [8, 16], "tissue_area_px": 0, "tissue_area_mm2": 0.0,
    }))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="omniseg"):
        result = steps.slide_stain(slide, out / "tissue_mask.png", out / "tissue_mask.json",
                                   _reference(tmp_path, od(PURPLE)), "he", out / "stain.json")  # fmt: skip
    assert result["gain"] == [1.0, 1.0, 1.0] and result["density"] is None
    assert "no tissue pixel to measure" in caplog.text


# -- prediction through the gain ------------------------------------------------------------------
def test_prediction_through_the_gain_equals_prediction_on_a_normalised_copy(tmp_path, tissues):
    """The same pixels through two paths: the slide read through stain.json, and a copy of the
    slide whose every level was normalised beforehand, read as decoded."""
    import torch

    from omniseg.checkpoint import save_model
    from omniseg.inference import PROB_GROUP
    from omniseg.models import build_model

    slide = steps.synth_slide(tmp_path / "s.tif", tissues, seed=1, height=512, width=1024,
                              tile=256, compression="deflate")["slide"]  # fmt: skip
    gain = [1.2, 0.8, 1.1]
    lut = stain.gain_lut(gain)
    copy = tmp_path / "copy.tif"
    with Slide(slide) as s, tifffile.TiffWriter(copy) as tw:
        for level in range(s.level_count):
            w, h = s.level_dimensions[level]
            res = 1e4 / s.level_mpp(level)
            tw.write(stain.apply_lut(s.read_region(0, 0, w, h, level), lut), tile=(256, 256),
                     photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if level == 0 else 1)  # fmt: skip
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model(model, build_model("omniseg", num_tissues=len(tissues), width=4), tissues)
    mask = _masked(tmp_path, slide)
    (tmp_path / "stain.json").write_text(json.dumps({"gain": gain}))
    probs = {}
    for name, path, stain_json in (("gain", slide, tmp_path / "stain.json"),
                                   ("copy", copy, None), ("plain", slide, None)):  # fmt: skip
        out = steps.predict_slide([model], path, mask["mask_png"], mask["mask_json"], tissues,
                                  "1", tmp_path / f"{name}.h5", tile=64, overlap=8,
                                  device="cpu", progress=False, stain_json=stain_json)  # fmt: skip
        with h5py.File(out, "r") as fh:
            group = fh[PROB_GROUP]
            probs[name] = {k: group[k][()] for k in group}
            probs[name]["_gain"] = list(fh.attrs["stain_gain"])
    assert probs["gain"]["_gain"] == pytest.approx(gain) and probs["copy"]["_gain"] == [1, 1, 1]
    keys = [k for k in probs["gain"] if not k.startswith("_")]
    assert sorted(keys) == ["dt", "pt", "ves"]
    assert all(np.array_equal(probs["gain"][k], probs["copy"][k]) for k in keys)
    assert any(not np.array_equal(probs["gain"][k], probs["plain"][k]) for k in keys)


# -- slide sheet and CLI --------------------------------------------------------------------------
def test_the_sheet_gives_each_slide_its_stain(tmp_path):
    write_png(tmp_path / "a.png", np.full((8, 8, 3), 240, np.uint8))
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("slide_id\tpath\tmpp\tstain\na\ta.png\t0.5\the\nb\ta.png\t0.5\t\n")
    df = load_slide_sheet(sheet)
    assert df["stain"].tolist() == ["he", ""]
    with pytest.raises(ValueError, match=r"row 2 \(slide_id 'b'\): column stain: empty"):
        load_slide_sheet(sheet, require_stain=True)
    plain = tmp_path / "plain.tsv"
    plain.write_text("slide_id\tpath\tmpp\na\ta.png\t0.5\n")
    assert load_slide_sheet(plain)["stain"].tolist() == [""]
    with pytest.raises(ValueError, match=r"row 1 \(slide_id 'a'\): column stain: empty"):
        load_slide_sheet(plain, require_stain=True)
    spaced = tmp_path / "spaced.tsv"
    spaced.write_text("slide_id\tpath\tmpp\tstain\na\ta.png\t0.5\th e\n")
    with pytest.raises(ValueError, match=r"row 1 \(slide_id 'a'\): column stain: 'h e' may hold"):
        load_slide_sheet(spaced)


def test_cli_stain_reference_wsi_stain_and_predict(tmp_path, tissues, two_tone, capsys):
    ps = write_patch_set(tmp_path / "dt.h5", tissues["dt"], filled(2, PURPLE),
                         ["train", "train"], ["he", "he"])  # fmt: skip
    ref = tmp_path / "ref.json"
    assert cli.main(["stain-reference", str(ps), "--out", str(ref)]) == 0
    assert np.allclose(json.loads(capsys.readouterr().out)["he"]["density"], od(PURPLE))
    out = tmp_path / "wsi"
    assert cli.main(["wsi-mask", str(two_tone["slide"]), str(out), "--min-area-um2", "1000"]) == 0
    capsys.readouterr()
    assert cli.main(["wsi-stain", str(two_tone["slide"]), str(out), "--reference", str(ref),
                     "--stain", "he"]) == 0  # fmt: skip
    assert json.loads((out / "stain.json").read_text())["stain"] == "he"
    capsys.readouterr()
    (out / "stain.json").unlink()
    code = cli.main(["wsi-predict", str(two_tone["slide"]), str(out), "--model", "m.pt",
                     "--stain-norm"])  # fmt: skip
    assert code == 1 and "stain.json missing: run `omniseg wsi-stain` first" in (
        capsys.readouterr().err
    )
