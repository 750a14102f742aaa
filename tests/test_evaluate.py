"""Tests of omniseg.evaluate: outputs of a tiny evaluation, perfect and empty models, errors."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import omniseg.evaluate as ev
from omniseg.checkpoint import save_model
from omniseg.data.patchset import PatchSetWriter, read_patch_set
from omniseg.metrics import dice_batch
from omniseg.models import build_model

P = 32
SPLIT_OF = ["train", "test", "val", "test", "test", "train", "test", "test"]  # 5 test patches


def make_patch_set(path: Path, tissue, seed: int) -> None:
    """8 patches; channel 0 of the image is the mask (255/0), so a model can copy it.

    Test patches: index 1 (within test) has an empty mask; the rest hold one square each.
    """
    rng = np.random.default_rng(seed)
    n = len(SPLIT_OF)
    masks = np.zeros((n, P, P), np.uint8)
    test_rank = np.cumsum([s == "test" for s in SPLIT_OF]) - 1
    for i in range(n):
        if SPLIT_OF[i] == "test" and test_rank[i] == 1:
            continue
        r, c = rng.integers(2, P - 12, size=2)
        masks[i, r : r + 8 + i % 3, c : c + 6] = 1
    images = rng.integers(0, 256, size=(n, P, P, 3), dtype=np.uint8)
    images[..., 0] = masks * 255
    with PatchSetWriter(path, tissue, P) as w:
        w.append(
            images,
            masks,
            {
                "split": SPLIT_OF,
                "roi_id": [f"roi{i // 2}" for i in range(n)],
                "patient": [f"pat{i // 4}" for i in range(n)],
                "stain": ["he", "pas"] * (n // 2),
            },
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tissues):
    """Patch sets for tuft (2 um/px) and ptc (0.25 um/px), an untrained tiny Omni-Seg file."""
    root = tmp_path_factory.mktemp("eval")
    sets = []
    for seed, key in enumerate(("tuft", "ptc")):
        path = root / f"{key}.h5"
        make_patch_set(path, tissues[key], seed)
        sets.append(path)
    torch.manual_seed(0)
    model = build_model("omniseg", num_tissues=len(tissues), width=8)
    model_path = root / "model.pt"
    save_model(model_path, model, tissues, extra={"method": "omniseg"})
    return root, sets, model_path


class CopyChannel0(torch.nn.Module):
    """A 'perfect' model: channel 0 of the image is the ground-truth mask."""

    def predict_proba(self, x, tissues):
        return (x[:, :1] > 0.5).float().repeat(1, len(tissues), 1, 1)


class Background(torch.nn.Module):
    """Predicts nothing anywhere."""

    def predict_proba(self, x, tissues):
        return torch.zeros(x.shape[0], len(tissues), *x.shape[2:])


def patch_loader(monkeypatch, model, calls=None):
    def fake_load(path, tissues=None, device="cpu"):
        if calls is not None:
            calls.append(Path(path))
        return model, {}

    monkeypatch.setattr(ev, "load_model", fake_load)


def test_untrained_model_outputs(tmp_path, setup, tissues):
    _, sets, model_path = setup
    models = {key: model_path for key in tissues.keys}
    with pytest.warns(UserWarning, match="no 'test' patches"):
        out = ev.evaluate(
            models,
            sets,
            tissues,
            method="omniseg",
            out_dir=tmp_path,
            device="cpu",
            batch_size=3,
            progress=False,
        )
    assert set(out) == {"per_patch", "summary", "summary_md", "predictions"}
    per_patch = pd.read_csv(out["per_patch"])
    assert list(per_patch.columns) == list(ev.PER_PATCH_COLUMNS)
    assert per_patch.groupby("tissue").size().to_dict() == {"tuft": 5, "ptc": 5}
    assert list(per_patch["tissue"].unique()) == ["tuft", "ptc"]  # registry order
    assert per_patch["dice"].between(0, 100).all()
    assert (per_patch["method"] == "omniseg").all()
    assert list(per_patch.loc[per_patch.tissue == "tuft", "index"]) == [0, 1, 2, 3, 4]
    undefined = per_patch["hd_um"].isna()
    assert (undefined == (per_patch["empty"] != "none")).all()
    assert (undefined == per_patch["msd_um"].isna()).all()
    # provenance follows the patch set's test rows
    meta = read_patch_set(sets[0], "test")["meta"]
    tuft = per_patch[per_patch.tissue == "tuft"]
    assert list(tuft["roi_id"]) == list(meta["roi_id"])
    assert list(tuft["stain"]) == list(meta["stain"])

    summary = pd.read_csv(out["summary"])
    assert list(summary.columns) == list(ev.SUMMARY_COLUMNS)
    assert list(summary["tissue"]) == [*tissues.keys, "average"]
    rows = summary.set_index("tissue")
    assert rows.loc["dt", "n"] == 0 and math.isnan(rows.loc["dt", "dice_pct"])
    assert rows.loc["tuft", "n"] == 5 and rows.loc["average", "n"] == 10
    empties = rows[["n_empty_both", "n_empty_pred", "n_empty_gt"]].sum(axis=1)
    assert (rows["n_hd_undefined"] == empties).all()
    assert rows.loc["tuft", "dice_pct"] == pytest.approx(tuft["dice"].mean())
    assert rows.loc["average", "dice_pct"] == pytest.approx(
        rows.loc[["tuft", "ptc"], "dice_pct"].mean()
    )

    md = out["summary_md"].read_text()
    assert "| Method | DT | PT | CAP | TUFT | VES | PTC | Average |" in md
    assert "omniseg" in md and "Undefined" in md

    # predictions: uint8 {0,1}, per_patch order, and their Dice is the per-patch Dice
    with h5py.File(out["predictions"], "r") as h5:
        assert set(h5) == {"tuft", "ptc"}
        pred = h5["tuft"][()]
        assert h5["tuft"].attrs["um_per_px"] == tissues["tuft"].um_per_px
    assert pred.dtype == np.uint8 and pred.shape == (5, P, P) and set(np.unique(pred)) <= {0, 1}
    gt = read_patch_set(sets[0], "test")["masks"]
    np.testing.assert_allclose(dice_batch(pred, gt), tuft["dice"], atol=1e-9)


def test_perfect_model(monkeypatch, tmp_path, setup, tissues):
    _, sets, model_path = setup
    calls: list[Path] = []
    patch_loader(monkeypatch, CopyChannel0(), calls)
    models = {"tuft": model_path, "ptc": model_path}
    out = ev.evaluate(
        models,
        sets,
        tissues,
        method="perfect",
        out_dir=tmp_path,
        device="cpu",
        batch_size=2,
        save_predictions=False,
        progress=False,
    )
    assert len(calls) == 1  # one distinct model file, loaded once
    assert "predictions" not in out and not (tmp_path / "predictions.h5").exists()
    per_patch = pd.read_csv(out["per_patch"])
    assert (per_patch["dice"] == 100.0).all()
    defined = per_patch[per_patch["empty"] == "none"]
    assert len(defined) == 8 and (defined["hd_um"] == 0).all() and (defined["msd_um"] == 0).all()
    summary = pd.read_csv(out["summary"]).set_index("tissue")
    assert list(summary.index) == ["tuft", "ptc", "average"]
    assert (summary["dice_pct"] == 100.0).all()
    assert (summary["hd_um"] == 0.0).all()
    assert (summary["n_empty_both"] == [1, 1, 2]).all()
    assert (summary["n_hd_undefined"] == [1, 1, 2]).all()


def test_background_model_and_per_tissue_files(monkeypatch, tmp_path, setup, tissues):
    root, sets, model_path = setup
    other = root / "other.pt"
    other.write_bytes(model_path.read_bytes())
    calls: list[Path] = []
    patch_loader(monkeypatch, Background(), calls)
    out = ev.evaluate(
        {"tuft": model_path, "ptc": other},
        sets,
        tissues,
        method="bg",
        out_dir=tmp_path,
        device="cpu",
        progress=False,
    )
    assert sorted(calls) == sorted([model_path.resolve(), other.resolve()])
    per_patch = pd.read_csv(out["per_patch"])
    # 4 non-empty ground truths per tissue -> Dice 0, empty pred; the empty one -> Dice 100
    assert sorted(per_patch["dice"]) == [0.0] * 8 + [100.0] * 2
    summary = pd.read_csv(out["summary"]).set_index("tissue")
    assert list(summary["n_empty_pred"]) == [4, 4, 8]
    assert list(summary["n_empty_both"]) == [1, 1, 2]
    assert summary["n_hd_undefined"].tolist() == [5, 5, 10]
    assert summary["hd_um"].isna().all()
    assert summary.loc["tuft", "dice_pct"] == pytest.approx(20.0)
    with h5py.File(out["predictions"], "r") as h5:
        assert not h5["ptc"][()].any()


def test_spacing_is_the_tissue_scale(monkeypatch, tmp_path, setup, tissues):
    """A prediction shifted by one pixel: HD = 1 px = the tissue's um/px."""

    class Shifted(torch.nn.Module):
        def predict_proba(self, x, tissues):
            return torch.roll((x[:, :1] > 0.5).float(), shifts=1, dims=3).repeat(
                1, len(tissues), 1, 1
            )

    _, sets, model_path = setup
    patch_loader(monkeypatch, Shifted())
    out = ev.evaluate(
        {"tuft": model_path, "ptc": model_path},
        sets,
        tissues,
        method="s",
        out_dir=tmp_path,
        device="cpu",
        save_predictions=False,
        progress=False,
    )
    summary = pd.read_csv(out["summary"]).set_index("tissue")
    assert summary.loc["tuft", "hd_um"] == pytest.approx(tissues["tuft"].um_per_px)
    assert summary.loc["ptc", "hd_um"] == pytest.approx(tissues["ptc"].um_per_px)


def test_bad_output_shape(monkeypatch, tmp_path, setup, tissues):
    class Wrong(torch.nn.Module):
        def predict_proba(self, x, tissues):
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    _, sets, model_path = setup
    patch_loader(monkeypatch, Wrong())
    with pytest.raises(ValueError, match="predict_proba returned"):
        ev.evaluate(
            {"tuft": model_path},
            sets,
            tissues,
            method="w",
            out_dir=tmp_path,
            device="cpu",
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_argument_errors(tmp_path, setup, tissues):
    _, sets, model_path = setup
    kw = {"method": "m", "out_dir": tmp_path, "device": "cpu", "progress": False}
    with pytest.raises(ValueError, match="unknown tissue"):
        ev.evaluate({"kidney": model_path}, sets, tissues, **kw)
    with pytest.raises(FileNotFoundError, match="patch set"):
        ev.evaluate({"tuft": model_path}, [tmp_path / "nope.h5"], tissues, **kw)
    with pytest.raises(FileNotFoundError, match="model file"):
        ev.evaluate({"tuft": tmp_path / "nope.pt"}, sets, tissues, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        ev.evaluate({"tuft": model_path}, sets, tissues, batch_size=0, **kw)
    not_h5 = tmp_path / "x.h5"
    not_h5.write_text("hello")
    with pytest.raises(ValueError, match="x.h5"):
        ev.evaluate({"tuft": model_path}, [not_h5], tissues, **kw)


def test_summarize_known_values():
    per_patch = pd.DataFrame(
        {
            "tissue": ["a", "a", "a", "b"],
            "dice": [100.0, 50.0, 0.0, 80.0],
            "hd_um": [0.0, 4.0, math.nan, 2.0],
            "msd_um": [0.0, 2.0, math.nan, 1.0],
            "empty": ["none", "none", "pred", "none"],
        }
    )
    s = ev.summarize(per_patch, ["a", "b", "c"], method="m").set_index("tissue")
    assert s.loc["a", "dice_pct"] == pytest.approx(50.0)
    assert s.loc["a", "hd_um"] == pytest.approx(2.0)  # nan left out
    assert s.loc["a", "n_hd_undefined"] == 1 and s.loc["a", "n_empty_pred"] == 1
    assert s.loc["c", "n"] == 0 and math.isnan(s.loc["c", "hd_um"])
    assert s.loc["average", "dice_pct"] == pytest.approx(65.0)  # mean of 50 and 80
    assert s.loc["average", "hd_um"] == pytest.approx(2.0)  # mean of 2 and 2
    assert s.loc["average", "n"] == 4


def test_channels_last_path_gives_same_scores(monkeypatch, tmp_path, setup, tissues):
    """The channels-last layout (model and input; the CPU's and CUDA's default) scores as the
    contiguous one does."""
    _, sets, model_path = setup
    kw = {"method": "m", "device": "cpu", "save_predictions": False, "progress": False}
    models = {"tuft": model_path}
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "0")
    base = pd.read_csv(
        ev.evaluate(models, sets, tissues, out_dir=tmp_path / "a", **kw)["per_patch"]
    )
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "1")
    cl = pd.read_csv(ev.evaluate(models, sets, tissues, out_dir=tmp_path / "b", **kw)["per_patch"])
    pd.testing.assert_frame_equal(base, cl)


class Everywhere(torch.nn.Module):
    """Predicts the tissue everywhere: every empty mask becomes a false-positive patch."""

    def predict_proba(self, x, tissues):
        return torch.ones(x.shape[0], len(tissues), *x.shape[2:])


@pytest.mark.parametrize(
    ("model", "nonempty_dice", "fp"),
    [
        (CopyChannel0(), 100.0, 0),  # perfect: the empty mask is left empty
        (Background(), 0.0, 0),  # empty everywhere: Dice 20 over all patches, 0 where it counts
        (Everywhere(), None, 1),  # fires on the empty mask
    ],
)
def test_nonempty_dice_and_false_positive_patches(
    monkeypatch, tmp_path, setup, tissues, model, nonempty_dice, fp
):
    _, sets, model_path = setup
    patch_loader(monkeypatch, model)
    out = ev.evaluate(
        {"tuft": model_path, "ptc": model_path},
        sets,
        tissues,
        method="m",
        out_dir=tmp_path,
        device="cpu",
        save_predictions=False,
        progress=False,
    )
    per_patch = pd.read_csv(out["per_patch"])
    s = pd.read_csv(out["summary"]).set_index("tissue")
    # each tissue: 5 test patches, 4 with the tissue, 1 empty mask
    assert s["n_nonempty"].tolist() == [4, 4, 8] and s["n_empty_mask"].tolist() == [1, 1, 2]
    assert s["n_fp_empty"].tolist() == [fp, fp, 2 * fp]
    assert s.loc["tuft", "n_fp_empty"] == s.loc["tuft", "n_empty_gt"]
    tuft = per_patch[per_patch.tissue == "tuft"]
    expected = tuft.loc[tuft["empty"].isin(["none", "pred"]), "dice"].mean()
    assert s.loc["tuft", "dice_nonempty_pct"] == pytest.approx(expected)
    if nonempty_dice is not None:
        assert s.loc["tuft", "dice_nonempty_pct"] == pytest.approx(nonempty_dice)
    assert s.loc["average", "dice_nonempty_pct"] == pytest.approx(
        s.loc[["tuft", "ptc"], "dice_nonempty_pct"].mean()
    )
    md = out["summary_md"].read_text()
    assert "non-empty masks only" in md
    assert f"| m |  |  |  | {fp}/1 |  | {fp}/1 | {2 * fp}/2 |" in md  # DT PT CAP TUFT VES PTC


def test_outputs_go_where_they_are_named(tmp_path):
    from omniseg.evaluate import output_paths

    named = {"summary": tmp_path / "a" / "s.csv", "per_patch": tmp_path / "p.csv",
             "summary_md": tmp_path / "s.md", "predictions": tmp_path / "x.h5"}  # fmt: skip
    assert output_paths(None, named, predictions=True) == named
    mixed = output_paths(tmp_path / "d", {"summary": tmp_path / "s.csv"}, predictions=False)
    assert mixed == {"per_patch": tmp_path / "d" / "per_patch.csv", "summary": tmp_path / "s.csv",
                     "summary_md": tmp_path / "d" / "summary.md"}  # fmt: skip
    with pytest.raises(ValueError, match="no path for output"):
        output_paths(None, {"summary": tmp_path / "s.csv"}, predictions=True)
    with pytest.raises(ValueError, match="unknown output"):
        output_paths(tmp_path, {"table": tmp_path / "t.csv"}, predictions=True)
