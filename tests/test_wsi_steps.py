"""The whole-slide pipeline steps chained on a tiny synthetic slide, and their CLI subcommands."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from pandas.testing import assert_frame_equal

from omniseg import cli
from omniseg.checkpoint import save_model
from omniseg.io import read_mask, write_png
from omniseg.models import build_model
from omniseg.steps import slides as steps
from omniseg.tissues import TissueTable
from omniseg.wsi.aggregate import DEFAULT_RULES, aggregate_masks
from omniseg.wsi.export import label_map_info

REPO = Path(__file__).resolve().parents[1]
TISSUES_TSV = REPO / "config" / "tissues.tsv"
H, W = 512, 1024  # level-0 rows, cols of the test slide (0.25 um/px)
# the test slide's tissue is small: a finer mask and a smaller minimum area than the defaults
MASK = {"um_per_px": 4.0, "min_area_um2": 1000.0}
TILE, OVERLAP = 64, 8


@pytest.fixture(scope="module")
def slide(tmp_path_factory, tissues) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("slide") / "s.tif"
    return steps.synth_slide(
        out, tissues, seed=1, height=H, width=W, strips=2, focus=["cap", "ves"], tile=256
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tissues) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, build_model("omniseg", num_tissues=len(tissues), width=4), tissues)
    return path


@pytest.fixture(scope="module")
def masked(tmp_path_factory, slide) -> Path:
    out = tmp_path_factory.mktemp("wsi")
    steps.mask_slide(slide["slide"], out / "tissue_mask.png", out / "tissue_mask.json", **MASK)
    return out


@pytest.fixture(scope="module")
def predicted(masked, slide, model_file, tissues) -> list[Path]:
    return [
        steps.predict_slide(
            [model_file],
            slide["slide"],
            masked / "tissue_mask.png",
            masked / "tissue_mask.json",
            tissues,
            key,
            masked / f"prob_{key}.h5",
            tile=TILE,
            overlap=OVERLAP,
            batch_size=8,
            device="cpu",
            progress=False,
        )
        for key in steps.scale_keys(tissues)
    ]


def truth_reference(truth_h5: Path, tissues: TissueTable) -> np.ndarray:
    with h5py.File(truth_h5, "r") as fh:
        masks = {k: fh[k][()] > 0 for k in tissues.keys}
    return aggregate_masks(masks, tissues, DEFAULT_RULES)


def write_truth_as_prob(truth_h5: Path, tissues: TissueTable, out: Path) -> Path:
    """A 'prediction' at level 0 (factor 1) equal to the ground truth: 255 inside, 0 outside."""
    with h5py.File(truth_h5, "r") as src, h5py.File(out, "w") as fh:
        for key in tissues.keys:
            fh[f"prob/{key}"] = (src[key][()] > 0).astype(np.uint8) * 255
        fh.attrs.update(factor=1.0, level0_shape=np.asarray((H, W)), mpp=0.25, um_per_px=0.25)
    return out


# -- pure helpers ---------------------------------------------------------------------------------
def test_scale_keys_name_every_scale(tissues):
    assert steps.scale_keys(tissues) == ["0.25", "1", "2"]
    um, at = steps.tissues_at_scale_key(tissues, "2")
    assert um == 2.0 and [t.key for t in at] == ["cap", "tuft"]
    assert [t.key for t in steps.tissues_at_scale_key(tissues, "1")[1]] == ["dt", "pt", "ves"]
    with pytest.raises(ValueError, match="no tissue is segmented at scale '0.5'"):
        steps.tissues_at_scale_key(tissues, "0.5")


def test_default_class_map_takes_names_and_keys(tissues):
    cmap = steps.default_class_map(tissues)
    assert cmap["glomerular tuft"] == "tuft" and cmap["tuft"] == "tuft"
    assert set(cmap.values()) == set(tissues.keys) and len(cmap) == 2 * len(tissues)


# -- the chain ------------------------------------------------------------------------------------
def test_mask_info_describes_the_slide(masked, slide):
    info = json.loads((masked / "tissue_mask.json").read_text())
    assert info["level0_shape"] == [H, W] and info["mpp"] == 0.25
    assert info["downsample"] == 16.0  # 4 um/px mask over 0.25 um/px
    assert info["mask_shape"] == [H // 16, W // 16]
    mask = read_mask(masked / "tissue_mask.png")
    assert mask.shape == (H // 16, W // 16) and mask.any() and not mask.all()
    assert info["tissue_area_px"] == int(mask.sum()) * 16 * 16
    # the mask covers most of the true tissue region
    with h5py.File(slide["truth"], "r") as fh:
        region = fh["_region"][()] > 0
    up = np.repeat(np.repeat(mask, 16, 0), 16, 1)
    assert (up & region).sum() > 0.8 * region.sum()


def test_mpp_override_changes_the_geometry(tmp_path, slide):
    info = steps.mask_slide(
        slide["slide"], tmp_path / "m.png", tmp_path / "m.json", mpp=0.5, **MASK
    )
    assert info["mpp"] == 0.5 and info["downsample"] == 8.0 and info["mask_shape"] == [64, 128]


def test_prediction_per_scale(predicted, masked, tissues):
    mask = read_mask(masked / "tissue_mask.png")
    for path, um in zip(predicted, tissues.scales, strict=True):
        assert path.name == f"prob_{um:g}.h5"
        with h5py.File(path, "r") as fh:
            f = um / 0.25
            shape = (int(np.ceil(H / f)), int(np.ceil(W / f)))
            assert tuple(fh.attrs["shape"]) == shape and fh.attrs["factor"] == f
            assert sorted(fh["prob"]) == sorted(t.key for t in tissues.at_scale(um))
            stats = json.loads(fh.attrs["stats"])
            assert 0 < stats["tiles_predicted"] <= stats["tiles_total"]
            if um == 0.25:  # at 40x, tiles on bare glass are skipped (never read)
                assert stats["tiles_predicted"] < stats["tiles_total"]
            probs = [fh["prob"][k][()] for k in fh["prob"]]
        # nothing is predicted farther than a tile from the tissue mask
        far = ~_dilate(mask, TILE * f / 16 + 1)
        rows = np.minimum((np.arange(shape[0]) * f / 16).astype(int), mask.shape[0] - 1)
        cols = np.minimum((np.arange(shape[1]) * f / 16).astype(int), mask.shape[1] - 1)
        far_at_scale = far[rows[:, None], cols[None, :]]
        assert far_at_scale.any() or um > 0.25
        for p in probs:
            assert p[far_at_scale].max(initial=0) == 0
            assert p[~far_at_scale].max() > 0


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    from scipy import ndimage

    r = int(np.ceil(radius))
    return ndimage.binary_dilation(mask, np.ones((2 * r + 1, 2 * r + 1), bool))


def test_aggregate_export_and_score_of_the_prediction(predicted, masked, slide, tissues):
    labels_h5 = steps.aggregate_slide(
        predicted,
        masked / "tissue_mask.json",
        tissues,
        masked / "labels.h5",
        mask_png=masked / "tissue_mask.png",
    )
    info = json.loads((masked / "tissue_mask.json").read_text())
    with h5py.File(labels_h5, "r") as fh:
        labels = fh["labels"]
        assert labels.shape == (H, W) and labels.dtype == np.uint8
        # the area the labels may fill: the tissue mask grown by mask_margin_um
        assert labels.attrs["tissue_area_px"] >= info["tissue_area_px"]
        assert (labels[()] > 0).sum() <= labels.attrs["tissue_area_px"]
        assert set(np.unique(labels[()])) <= set(range(len(tissues) + 1))
    out = steps.export_slide(
        labels_h5,
        tissues,
        ome_tif=masked / "labels.ome.tif",
        overlay_png=masked / "overlay.png",
        geojson=masked / "tissues.geojson",
        areas_csv=masked / "areas.csv",
        slide=slide["slide"],
    )
    assert all(p.is_file() for p in out.values())
    with tifffile.TiffFile(out["ome_tif"]) as tif:
        assert tif.series[0].shape == (H, W)
    areas = pd.read_csv(out["areas"])
    assert list(areas["tissue"]) == tissues.keys
    scores = steps.score_slide(
        labels_h5,
        slide["truth"],
        tissues,
        masked / "scores.csv",
        prob_h5s=predicted,
        mask_png=masked / "tissue_mask.png",
        mask_json=masked / "tissue_mask.json",
        method="untrained",
        slide="s",
    )
    assert list(scores["tissue"]) == tissues.keys
    assert scores["dice"].between(0, 100).all() and scores["raw_dice"].between(0, 100).all()
    assert (scores["ref_px"] > 0).sum() >= 3  # the slide holds glomeruli and arteries
    assert (scores["method"] == "untrained").all() and (scores["slide"] == "s").all()
    # areas: false positives of the label map in mm^2 of 0.25 um pixels
    np.testing.assert_allclose(scores["fp_mm2"], scores["fp"] * 0.25**2 / 1e6)
    assert (scores["raw_fp"] >= 0).all() and (scores["raw_tp"] <= scores["raw_fp"] + 1e12).all()
    assert pd.read_csv(masked / "scores.csv").columns.tolist() == scores.columns.tolist()


def test_truth_through_aggregation_scores_100(tmp_path, masked, slide, tissues):
    """Known answer: a 'prediction' equal to the truth aggregates to the reference map."""
    prob = write_truth_as_prob(slide["truth"], tissues, tmp_path / "prob_truth.h5")
    labels_h5 = steps.aggregate_slide(
        [prob],
        masked / "tissue_mask.json",
        tissues,
        tmp_path / "labels.h5",
        mask_png=masked / "tissue_mask.png",
        rules=DEFAULT_RULES,
        mask_margin_um=4.0,
    )
    ref = truth_reference(slide["truth"], tissues)
    # the labels are the truth wherever the grown tissue mask lets them be, and nothing outside
    info = steps.read_mask_info(masked / "tissue_mask.json")
    inside = (
        steps._grown_mask(masked / "tissue_mask.png", info, masked / "tissue_mask.json", 4.0)
        .repeat(int(info["downsample"]), 0)
        .repeat(int(info["downsample"]), 1)[:H, :W]
    )
    with h5py.File(labels_h5, "r") as fh:
        np.testing.assert_array_equal(fh["labels"][()], labelled := np.where(inside, ref, 0))
    # the mask is tight but does not cut the tissue: almost all labelled truth lies inside it
    assert ((ref > 0) & ~inside).sum() < 0.005 * (ref > 0).sum()
    scores = steps.score_slide(
        labels_h5, slide["truth"], tissues, tmp_path / "scores.csv", prob_h5s=[prob],
        mask_png=masked / "tissue_mask.png", mask_json=masked / "tissue_mask.json",
        mask_margin_um=4.0,
    )  # fmt: skip
    # the only misses are the truth pixels the mask cut: Dice 2|in| / (|in| + |all|) per tissue
    for label, dice in zip(scores["label"], scores["dice"], strict=True):
        n_all, n_in = (ref == label).sum(), ((ref == label) & inside).sum()
        assert dice == pytest.approx(100 * 2 * n_in / (n_in + n_all) if n_all else 100.0)
    assert (scores["fp"] == 0).all()
    # each raw "head" is its own truth mask (the capsule includes the tuft there), scored inside
    # (cut by the mask like the label map)
    np.testing.assert_allclose(scores["raw_dice"], scores["dice"])
    assert (scores["raw_fp_mm2"] == 0).all()
    out = steps.export_slide(
        labels_h5,
        tissues,
        ome_tif=tmp_path / "labels.ome.tif",
        overlay_png=tmp_path / "overlay.png",
        geojson=tmp_path / "tissues.geojson",
        areas_csv=tmp_path / "areas.csv",
    )
    areas = pd.read_csv(out["areas"]).set_index("tissue")
    for t in tissues:
        assert areas.loc[t.key, "area_px"] == (labelled == t.label).sum()
    features = json.loads(out["geojson"].read_text())["features"]
    per_tissue = pd.Series([f["properties"]["tissue"] for f in features]).value_counts()
    for t in tissues:
        assert per_tissue.get(t.key, 0) == areas.loc[t.key, "objects"]
    # our own GeoJSON back in as QuPath annotations, classes mapped by the default class map
    sheet = steps.import_annotations(
        slide["slide"], out["geojson"], tmp_path / "rois", tissues, roi_size=256, margin_px=16
    )
    rois = pd.read_csv(sheet, sep="\t")
    assert set(rois["tissue"]) == {t for t in per_tissue.index}


# -- bad input ------------------------------------------------------------------------------------
def test_no_tissue_gives_empty_outputs_and_warnings(tmp_path, slide, model_file, tissues, caplog):
    write_png(tmp_path / "empty.png", np.zeros((8, 16), np.uint8))
    info = steps.mask_slide(
        slide["slide"], tmp_path / "m.png", tmp_path / "m.json", mask_image=tmp_path / "empty.png"
    )
    assert info["tissue_area_px"] == 0 and info["mask_image"] == str(tmp_path / "empty.png")
    assert "no tissue found" in caplog.text
    probs = []
    for key in steps.scale_keys(tissues):
        with pytest.warns(UserWarning, match="no tissue tile"):
            probs.append(
                steps.predict_slide(
                    model_file,
                    slide["slide"],
                    tmp_path / "m.png",
                    tmp_path / "m.json",
                    tissues,
                    key,
                    tmp_path / f"prob_{key}.h5",
                    tile=TILE,
                    overlap=OVERLAP,
                    device="cpu",
                    progress=False,
                )  # fmt: skip
            )
    labels_h5 = steps.aggregate_slide(
        probs, tmp_path / "m.json", tissues, tmp_path / "l.h5", mask_png=tmp_path / "m.png"
    )
    with h5py.File(labels_h5, "r") as fh:
        assert not fh["labels"][()].any()
    assert "the tissue mask is empty" in caplog.text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = steps.export_slide(
            labels_h5,
            tissues,
            ome_tif=tmp_path / "l.ome.tif",
            overlay_png=tmp_path / "o.png",
            geojson=tmp_path / "t.geojson",
            areas_csv=tmp_path / "a.csv",
        )
    assert any("no labelled pixel" in str(w.message) for w in caught)
    assert json.loads(out["geojson"].read_text())["features"] == []
    assert (pd.read_csv(out["areas"])["area_px"] == 0).all()


def test_model_for_another_tissue_table_is_refused(tmp_path, masked, slide, tissues):
    five = TissueTable.from_records(tissues.to_records()[:5])
    path = tmp_path / "five.pt"
    save_model(path, build_model("omniseg", num_tissues=5, width=4), five)
    with pytest.raises(ValueError, match=f"model checkpoint {path}.*tissue table"):
        steps.predict_slide(
            [path], slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json",
            tissues, "1", tmp_path / "p.h5", tile=TILE, overlap=OVERLAP, device="cpu",
        )  # fmt: skip
    assert not (tmp_path / "p.h5").exists()


def test_two_files_serving_one_tissue_are_refused(tmp_path, masked, slide, model_file, tissues):
    with pytest.raises(ValueError, match="both serve tissue"):
        steps.predict_slide(
            [model_file, model_file], slide["slide"], masked / "tissue_mask.png",
            masked / "tissue_mask.json", tissues, "1", tmp_path / "p.h5", device="cpu",
        )  # fmt: skip


def _per_tissue_models(tmp_path, tissues, keys, patch_size=None) -> list[Path]:
    """One tiny binary U-Net per tissue, as a multi-network method trains them."""
    files = []
    for i, key in enumerate(keys):
        torch.manual_seed(i)
        path = tmp_path / f"{key}.pt"
        extra = {"trained_tissues": [key]}
        if patch_size:
            extra["patch_size"] = patch_size
        save_model(path, build_model("unet", num_tissues=len(tissues), width=4), tissues, extra)
        files.append(path)
    return files


def test_per_tissue_networks_each_predict_their_tissue(tmp_path, masked, slide, tissues):
    """A multi-network method on a slide: each tissue's own network at its scale, the tile from
    the checkpoints' training patch size."""
    at_10x = [t.key for t in tissues.at_scale(1.0)]
    files = _per_tissue_models(tmp_path, tissues, at_10x, patch_size=48)
    out = steps.predict_slide(
        files, slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json",
        tissues, "1", tmp_path / "p.h5", device="cpu", progress=False,
    )  # fmt: skip
    with h5py.File(out, "r") as fh:
        assert json.loads(fh.attrs["tissues"]) == at_10x
        assert fh.attrs["tile"] == 48 and fh.attrs["overlap"] == 6  # training size, tile / 8
        maps = {k: fh["prob"][k][()] for k in at_10x}
    assert len({m.tobytes() for m in maps.values()}) == len(at_10x)  # distinct networks
    # the files in another order: every tissue still gets its own network's map
    again = steps.predict_slide(
        files[::-1], slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json",
        tissues, "1", tmp_path / "p1.h5", device="cpu", progress=False,
    )  # fmt: skip
    with h5py.File(again, "r") as fh:
        for k in at_10x:
            np.testing.assert_array_equal(fh["prob"][k][()], maps[k])
    # a tissue of the scale without a network
    with pytest.raises(ValueError, match=rf"trained on tissue\(s\) {at_10x[-1]}"):
        steps.predict_slide(
            files[:-1], slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json",
            tissues, "1", tmp_path / "p2.h5", device="cpu", progress=False,
        )  # fmt: skip


def test_slide_tiling_defaults_to_the_training_patch_size():
    assert steps.slide_tiling([128]) == (128, 16)
    assert steps.slide_tiling([128, 128], overlap=32) == (128, 32)
    with warnings.catch_warnings():  # another tile is a choice: the pooling keeps its window
        warnings.simplefilter("error")
        assert steps.slide_tiling([128], tile=256) == (256, 32)
    with pytest.warns(UserWarning, match="does not record its training patch size"):
        assert steps.slide_tiling([None]) == (steps.FALLBACK_TILE, steps.FALLBACK_TILE // 8)
    with pytest.warns(UserWarning, match="does not record"):
        assert steps.slide_tiling([None], tile=64) == (64, 8)
    with pytest.warns(UserWarning, match="different patch sizes"):
        assert steps.slide_tiling([64, 128]) == (128, 16)
    assert steps.slide_tiling([40], multiple=16) == (48, 6)  # rounded up to the model's multiple


def test_mask_of_another_slide_is_refused(tmp_path, masked, slide, model_file, tissues):
    steps.mask_slide(slide["slide"], tmp_path / "m.png", tmp_path / "m.json", mpp=0.5, **MASK)
    with pytest.raises(ValueError, match="describes a"):
        steps.predict_slide(
            model_file, slide["slide"], tmp_path / "m.png", tmp_path / "m.json", tissues, "1",
            tmp_path / "p.h5", tile=TILE, overlap=OVERLAP, device="cpu", progress=False,
        )  # fmt: skip


def test_truncated_slide_is_named(tmp_path, slide):
    bad = tmp_path / "bad.tif"
    data = Path(slide["slide"]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"slide {bad}"):
        steps.mask_slide(bad, tmp_path / "m.png", tmp_path / "m.json")
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "m.json").exists()


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_synth_slide_and_mask(tmp_path, capsys):
    slide = tmp_path / "cli.tif"
    common = ["--tissues", str(TISSUES_TSV)]
    rc = cli.main(["synth-slide", str(slide), *common, "--height", "512", "--width", "768",
                   "--tile", "256", "--seed", "2"])  # fmt: skip
    assert rc == 0
    written = json.loads(capsys.readouterr().out)
    assert written == {"slide": str(slide), "truth": str(tmp_path / "cli_truth.h5")}
    with tifffile.TiffFile(slide) as tif:
        assert tif.pages[0].shape[:2] == (512, 768)
    rc = cli.main(["wsi-mask", str(slide), str(tmp_path / "out"), *common,
                   "--um-per-px", "4", "--min-area-um2", "1000"])  # fmt: skip
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["downsample"] == 16.0 and info["mask_shape"] == [32, 48]
    assert read_mask(tmp_path / "out" / "tissue_mask.png").any()
    assert json.loads((tmp_path / "out" / "tissue_mask.json").read_text()) == info
    # a missing slide: exit status 1 and the file named
    rc = cli.main(["wsi-mask", str(tmp_path / "nope.tif"), str(tmp_path / "o2"), *common])
    assert rc == 1 and "nope.tif" in capsys.readouterr().err


def test_negative_mask_margin_is_refused(tmp_path, masked, tissues):
    with pytest.raises(ValueError, match="mask_margin_um must be >= 0"):
        steps.aggregate_slide(
            [], masked / "tissue_mask.json", tissues, tmp_path / "labels.h5",
            mask_png=masked / "tissue_mask.png", mask_margin_um=-1.0,
        )  # fmt: skip
    assert not (tmp_path / "labels.h5").exists()


def test_scoring_uses_the_margin_the_label_map_records(tmp_path, masked, slide, tissues, caplog):
    """The label map records its tissue-mask margin and scoring reads it back, so the raw heads
    are scored over the area the labels could fill (a second, disagreeing option is refused)."""
    prob = write_truth_as_prob(slide["truth"], tissues, tmp_path / "prob_truth.h5")
    mask = {"mask_png": masked / "tissue_mask.png", "mask_json": masked / "tissue_mask.json"}
    labels_h5 = steps.aggregate_slide(
        [prob], mask["mask_json"], tissues, tmp_path / "labels.h5", mask_png=mask["mask_png"],
        rules=DEFAULT_RULES, mask_margin_um=0.0,
    )  # fmt: skip
    with h5py.File(labels_h5, "r") as fh:
        assert fh["labels"].attrs["mask_margin_um"] == 0.0
    assert label_map_info(labels_h5).mask_margin_um == 0.0

    def score(name, **kw):
        return steps.score_slide(
            labels_h5, slide["truth"], tissues, tmp_path / name, prob_h5s=[prob], **mask, **kw
        )

    recorded = score("recorded.csv")
    assert (recorded["dice"] < 100).any()  # the ungrown mask cuts some truth
    with pytest.raises(ValueError, match=r"labels\.h5.*grown by 0 um.*4 um"):
        score("other.csv", mask_margin_um=4.0)
    assert not (tmp_path / "other.csv").exists()
    # a label map of an older version records none: the given margin, else the default + warning
    with h5py.File(labels_h5, "a") as fh:
        del fh["labels"].attrs["mask_margin_um"]
    assert_frame_equal(score("given.csv", mask_margin_um=0.0), recorded)
    with caplog.at_level(logging.WARNING, logger="omniseg"):
        old = score("old.csv")
    assert "records no tissue-mask margin" in caplog.text
    # scored at 4 um, the raw heads keep truth that the 0 um label map lost: the recorded
    # margin, not the default, gave the scores above
    assert (old["raw_dice"] > recorded["raw_dice"]).any()
    assert_frame_equal(old[["dice", "fp"]], recorded[["dice", "fp"]])
    # an unreadable label map is named, and nothing is written
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk\.h5 is not a readable HDF5"):
        steps.score_slide(
            tmp_path / "junk.h5", slide["truth"], tissues, tmp_path / "junk.csv", **mask
        )
    assert not (tmp_path / "junk.csv").exists()


def test_adapt_norm_reestimates_the_first_batchnorm_layers_on_the_slide(
    tmp_path, masked, slide, tissues
):
    """``adapt_norm``: the same network, its first BatchNorm statistics taken from the slide:
    other probabilities, the same on a second call, the model file untouched."""
    torch.manual_seed(0)
    path = tmp_path / "bn.pt"
    model = build_model("omniseg", num_tissues=len(tissues), width=4, norm="batch")
    with torch.no_grad():  # trained-looking statistics, far from the slide's
        first = dict(model.named_modules())["backbone.encoder.stages.0.0.body.0.0"]
        first.running_mean.fill_(2.0)
    save_model(path, model, tissues, {"patch_size": TILE})
    stored = path.read_bytes()
    args = (path, slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json", tissues)
    kw = {"overlap": OVERLAP, "device": "cpu", "progress": False}
    plain = steps.predict_slide(*args, "1", tmp_path / "p0.h5", **kw)
    runs = [
        steps.predict_slide(*args, "1", tmp_path / f"p{k}.h5", adapt_norm=2, **kw) for k in (1, 2)
    ]

    def probs(h5):
        with h5py.File(h5, "r") as fh:
            return {k: fh["prob"][k][()] for k in fh["prob"]}

    p0, p1, p2 = probs(plain), probs(runs[0]), probs(runs[1])
    for h5, recorded in ((plain, 0), (runs[0], 2)):
        with h5py.File(h5, "r") as fh:
            assert fh.attrs["adapt_norm"] == recorded
    assert all(np.abs(p1[k] - p0[k]).max() > 0.01 for k in p0)
    for k in p0:
        np.testing.assert_array_equal(p1[k], p2[k])  # seeded tiles: the same adaptation
    assert path.read_bytes() == stored


def test_adapt_norm_errors_are_named(tmp_path, masked, slide, model_file, tissues):
    args = (slide["slide"], masked / "tissue_mask.png", masked / "tissue_mask.json", tissues)
    kw = {"tile": TILE, "overlap": OVERLAP, "device": "cpu", "progress": False}
    with pytest.raises(ValueError, match=rf"{model_file}: adapt_norm 2 .*GroupNorm"):
        steps.predict_slide(model_file, *args, "1", tmp_path / "p.h5", adapt_norm=2, **kw)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="adapt_norm must be an integer >= 0"):
            steps.predict_slide(model_file, *args, "1", tmp_path / "p.h5", adapt_norm=bad, **kw)
    assert not (tmp_path / "p.h5").exists()
