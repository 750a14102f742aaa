"""bench/stain_norm.py: the identity copy of a slide reads the same pixels at every level, the
normalised copy's tissue has the reference's mean optical density, the reference comes from the
training ROIs of the stain, and both copies are scored through the pipeline's wiring."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from omniseg.steps import slides as steps
from omniseg.wsi import stain as od_stain
from omniseg.wsi.slide import Slide

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def sn(bench):
    return bench("stain_norm")


@pytest.fixture(scope="module")
def slide(tmp_path_factory, tissues):
    """A small synthetic results folder: one demo slide with its truth and tissue mask."""
    root = tmp_path_factory.mktemp("results")
    made = steps.synth_slide(
        root / "slides" / "s.tif", tissues, seed=1, height=512, width=1024, strips=2,
        focus=["cap", "ves"], tile=128,
    )  # fmt: skip
    steps.mask_slide(
        made["slide"], root / "wsi" / "s" / "tissue_mask.png",
        root / "wsi" / "s" / "tissue_mask.json", um_per_px=4.0, min_area_um2=1000.0,
    )  # fmt: skip
    return root


def _cohort(root: Path, images: dict[str, tuple[str, str, tuple[int, int, int]]]) -> None:
    """``cohort/rois.tsv`` and ``split/patients.tsv`` with one flat-coloured ROI per entry:
    ``roi_id -> (stain, split, rgb)``; patient ``p_{roi_id}``."""
    (root / "cohort" / "images").mkdir(parents=True, exist_ok=True)
    (root / "split").mkdir(parents=True, exist_ok=True)
    rois, patients = [], []
    for roi_id, (stain, split, rgb) in images.items():
        img = np.zeros((16, 16, 3), np.uint8) + np.asarray(rgb, np.uint8)
        img[:4] = 255  # glass: not tissue, must not move the reference
        (root / "cohort" / "images" / f"{roi_id}.png").write_bytes(imagecodecs.png_encode(img))
        rois.append({"roi_id": roi_id, "patient": f"p_{roi_id}", "stain": stain,
                     "tissue": "dt", "image": f"images/{roi_id}.png"})  # fmt: skip
        patients.append({"patient": f"p_{roi_id}", "split": split, "rois": 1})
    pd.DataFrame(rois).to_csv(root / "cohort" / "rois.tsv", sep="\t", index=False)
    pd.DataFrame(patients).to_csv(root / "split" / "patients.tsv", sep="\t", index=False)


def test_reference_is_the_tissue_density_of_the_training_rois_of_the_stain(sn, tmp_path):
    _cohort(tmp_path, {
        "a": ("he", "train", (200, 100, 150)),
        "b": ("he", "train", (100, 200, 150)),
        "c": ("he", "test", (20, 20, 20)),  # another split: left out
        "d": ("pas", "train", (20, 20, 20)),  # another stain: left out
    })  # fmt: skip
    expected = od_stain.optical_density(np.array([[200, 100, 150], [100, 200, 150]])).mean(0)
    np.testing.assert_allclose(sn.reference_density(tmp_path, "he"), expected, rtol=1e-6)
    with pytest.raises(SystemExit, match=r"rois.tsv: no training ROI stained 'sil'.*he.*pas"):
        sn.reference_density(tmp_path, "sil")
    with pytest.raises(SystemExit, match="nowhere/cohort/rois.tsv: not found"):
        sn.reference_density(tmp_path / "nowhere", "he")
    # a user's sheet elsewhere: its images are relative to its own folder
    own = tmp_path / "own"
    _cohort(own, {"a": ("he", "train", (60, 60, 60))})
    np.testing.assert_allclose(
        sn.reference_density(tmp_path, "he", own / "cohort" / "rois.tsv"),
        od_stain.optical_density(np.array([[60, 60, 60]]))[0],
        rtol=1e-6,
    )


def test_the_identity_copy_reads_the_same_pixels_at_every_level(sn, slide, tmp_path):
    sn.write_copy(slide / "slides" / "s.tif", tmp_path / "copy.tif", None)
    with Slide(slide / "slides" / "s.tif") as a, Slide(tmp_path / "copy.tif") as b:
        assert a.level_count == b.level_count > 1
        assert a.level_dimensions == b.level_dimensions and a.mpp == pytest.approx(b.mpp)
        for level in range(a.level_count):
            w, h = a.level_dimensions[level]
            assert b.level_mpp(level) == pytest.approx(a.level_mpp(level))
            np.testing.assert_array_equal(
                a.read_region(0, 0, w, h, level), b.read_region(0, 0, w, h, level)
            )


def test_the_normalised_copy_has_the_reference_density(sn, slide, tmp_path):
    with Slide(slide / "slides" / "s.tif") as s:
        w, h = s.level_dimensions[0]
        before = s.read_region(0, 0, w, h)
        original = s.read_region(0, 0, *s.level_dimensions[1], 1)
    total, count = od_stain.density_sums(before)
    density = total / count
    reference = density * np.array([0.8, 1.1, 1.25])
    sn.write_copy(slide / "slides" / "s.tif", tmp_path / "norm.tif", reference / density)
    with Slide(tmp_path / "norm.tif") as s:
        after = s.read_region(0, 0, w, h)
        coarse = s.read_region(0, 0, *s.level_dimensions[1], 1)
    # over the original's tissue pixels the mean density is the reference's (uint8 rounding)
    od_before, od_after = od_stain.optical_density(before), od_stain.optical_density(after)
    tissue = od_before.sum(-1) > od_stain.TISSUE_OD
    mean_after = od_after[tissue].mean(0, dtype=np.float64)
    np.testing.assert_allclose(mean_after, reference, rtol=0.01)
    assert not np.allclose(mean_after, density, rtol=0.05)
    # glass stays glass: its density is small and scaled, not shifted
    glass = od_before.sum(-1) < 0.1
    assert glass.any() and od_after[glass].sum(-1).max() < 0.2
    # every level is transformed, not only level 0
    np.testing.assert_array_equal(
        coarse, od_stain.apply_lut(original, od_stain.gain_lut(reference / density))
    )


def test_both_copies_are_scored_through_the_pipelines_wiring(
    sn, bench, slide, tissues, tmp_path, monkeypatch, truth_as_prediction
):
    """Known answer: probability maps equal to the truth score ~100 after aggregation on both
    copies (the copies carry the truth and tissue mask); the report names the gains."""
    _cohort(slide, {"a": ("he", "train", (200, 120, 180))})
    model = slide / "models" / "omniseg" / "all" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(b"")
    rob, more = bench("robustness"), bench("more_slides")
    monkeypatch.setattr(rob, "predict_slide", truth_as_prediction)
    monkeypatch.setattr(sn, "_bench", {"robustness": rob, "more_slides": more}.get)
    report = sn.run(
        [slide], CONFIG, REPO / "config" / "tissues.tsv", ["omniseg"], "he", tmp_path / "o", 1
    )
    assert truth_as_prediction.models and all(m == [model] for m in truth_as_prediction.models)
    gains = report["slides"]["s"]["gain"]
    assert len(gains) == 3 and all(0.2 < g < 5 for g in gains) and len(set(gains)) == 3
    for variant in sn.VARIANTS:
        scores = report["methods"]["omniseg"][variant]
        assert (tmp_path / "o" / variant / "slides" / "s.tif").is_file()
        present = [k for k, v in scores["slide_dice"].items() if not np.isnan(v)]
        assert len(present) >= 4
        assert all(scores["slide_dice"][k] >= 95 for k in present), scores
    # a second call reuses the copies: the same report
    again = sn.run(
        [slide], CONFIG, REPO / "config" / "tissues.tsv", ["omniseg"], "he", tmp_path / "o", 1
    )
    assert again == report


def test_a_slide_without_tissue_is_named(sn, tmp_path):
    """A slide with no pixel dense enough to be tissue has no density to normalise: named."""
    blank = tmp_path / "blank.tif"
    tifffile.imwrite(
        blank, np.full((64, 64, 3), 250, np.uint8), photometric="rgb",
        resolution=(40000, 40000), resolutionunit="CENTIMETER",
    )  # fmt: skip
    entry = {"name": "blank", "slide": blank}
    with pytest.raises(SystemExit, match=r"blank.tif: no tissue pixels"):
        sn.make_copies([entry], np.array([0.3, 0.7, 0.4]), tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written for a slide it refused
