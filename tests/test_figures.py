"""Tests of the result figures (Figure 4: parameters vs. Dice; Figure 3: qualitative patches)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from omniseg.data.patchset import PatchSetWriter
from omniseg.figures import (
    OVERLAY_ALPHA,
    OVERLAY_COLORS,
    method_key,
    paper_mean_dice,
    params_vs_dice,
    qualitative,
)
from omniseg.tables import paper_table1
from omniseg.tissues import Tissue

POINTS = [
    {"method": "Omni-Seg", "params": 5.96e6, "dice": 80.0},
    {"method": "Multi U-Net", "params": 6 * 31.0e6, "dice": 75.5},
    {"method": "Multi-class", "params": 5.91e6, "dice": 60.0},
    {"method": "TAL", "params": 5.92e6, "dice": float("nan")},
]

PAPER_CSV = """method,tissue,dice_pct,hd_um,msd_um
Multi U-Net (Jayapandian et al. 2021),DT,78.0,1,1
Multi U-Net (Jayapandian et al. 2021),Average,84.77,70.4,21.91
Omni-Seg (Deng et al. 2022),DT,81.0,1,1
Omni-Seg (Deng et al. 2022),Average,87.70,58.24,12.45
Med3D (Chen et al. 2019),Average,62.34,129.63,60.06
"""


def check_png(path, min_side=200):
    img = imread(path)
    assert img.shape[0] >= min_side and img.shape[1] >= min_side
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


def test_method_key():
    assert method_key("Multi U-Net (Jayapandian et al. 2021)") == "multiunet"
    assert method_key("multi_unet") == "multiunet"
    assert method_key("Omni-Seg") == method_key("omniseg") == "omniseg"
    assert method_key("Multi-class (Gonzalez et al. 2018)") == "multiclass"


def test_method_keys_match_the_published_table():
    csv = Path(__file__).parents[2] / "shared/data/paper_table1.csv"
    if not csv.is_file():
        pytest.skip(f"{csv} not available")
    paper = paper_mean_dice(paper_table1(csv))
    ours = ["omniseg", "multi_unet", "multi_deeplabv3", "tal", "med3d", "multiclass"]
    assert {method_key(m) for m in ours} == set(paper)
    assert paper[method_key("Omni-Seg")] == pytest.approx(87.70)


def test_paper_mean_dice_reads_every_form(tmp_path):
    csv = tmp_path / "paper.csv"
    csv.write_text(PAPER_CSV)
    expected = {"multiunet": 84.77, "omniseg": 87.70, "med3d": 62.34}
    assert paper_mean_dice(pd.read_csv(csv)) == expected
    assert paper_mean_dice(paper_table1(csv)) == expected
    one = pd.DataFrame({"dice": [1.0]}, index=pd.Index(["TAL"], name="method"))
    assert paper_mean_dice(one) == {"tal": 1.0}
    with pytest.raises(ValueError, match="dice_pct"):
        paper_mean_dice(pd.DataFrame({"method": ["x"], "hd": [1.0]}))


def test_params_vs_dice(tmp_path):
    csv = tmp_path / "paper.csv"
    csv.write_text(PAPER_CSV)
    png, svg = tmp_path / "fig" / "p.png", tmp_path / "fig" / "p.svg"
    table = params_vs_dice(POINTS, png, svg, paper=paper_table1(csv))
    # Sorted by parameters: the x positions are monotone.
    assert table["params"].is_monotonic_increasing
    assert list(table["method"]) == ["Multi-class", "TAL", "Omni-Seg", "Multi U-Net"]
    assert table.set_index("method")["paper_dice"].to_dict() == pytest.approx(
        {"Multi-class": np.nan, "TAL": np.nan, "Omni-Seg": 87.70, "Multi U-Net": 84.77},
        nan_ok=True,
    )
    check_png(png)
    text = svg.read_text()
    for label in ("Omni-Seg", "Multi U-Net", "Multi-class", "TAL (n/a)", "paper"):
        assert label in text
    assert "Med3D" not in text  # a paper method without a point is not drawn
    assert not list(tmp_path.glob("fig/.*"))  # no temporary files left


def test_params_vs_dice_without_paper_and_bad_points(tmp_path):
    png, svg = tmp_path / "a.png", tmp_path / "a.svg"
    table = params_vs_dice(POINTS[:2], png, svg)
    assert table["paper_dice"].isna().all()
    assert "paper" not in svg.read_text()
    with pytest.raises(ValueError, match="at least one"):
        params_vs_dice([], png, svg)
    with pytest.raises(ValueError, match="params must be > 0"):
        params_vs_dice([{"method": "x", "params": 0, "dice": 1.0}], png, svg)
    with pytest.raises(ValueError, match="lacks dice"):
        params_vs_dice([{"method": "x", "params": 10}], png, svg)
    with pytest.raises(ValueError, match="given twice"):
        params_vs_dice([POINTS[0], POINTS[0]], png, svg)


# -- qualitative --------------------------------------------------------------------------------
TISSUE = Tissue(3, "tuft", "glomerular tuft", "5x", 2.0, "3_0_tuft", "tuft", "#d62728")
P = 24


@pytest.fixture
def qual_inputs(tmp_path):
    """A patch set of 5 test (+ 2 train) patches and two methods' tables and predictions."""
    rng = np.random.default_rng(0)
    n = 5
    yy, xx = np.mgrid[:P, :P]
    masks = np.stack([(yy - 12) ** 2 + (xx - 12) ** 2 <= (3 + i) ** 2 for i in range(n)])
    images = rng.integers(0, 255, (n, P, P, 3), dtype=np.uint8)
    images[masks] = (200, 40, 60)
    patch_set = tmp_path / "tuft.h5"
    with PatchSetWriter(patch_set, TISSUE, P) as w:
        meta = {"roi_id": ["r"] * 2, "patient": ["p"] * 2, "stain": ["he"] * 2}
        w.append(images[:2], masks[:2], {"split": ["train"] * 2, **meta})
        meta = {k: [v[0]] * n for k, v in meta.items()}
        w.append(images, masks, {"split": ["test"] * n, **meta})
    per_patch, predictions = {}, {}
    # Reference Dice by test index: 2 best, 1 median, 0 worst.
    dice = {"omniseg": [10.0, 50.0, 95.0, 30.0, 60.0], "unet": [20.0, 20.0, 20.0, 20.0, 20.0]}
    for method, shift in (("omniseg", 1), ("unet", 3)):
        rows = pd.DataFrame(
            {"method": method, "tissue": "tuft", "index": np.arange(n), "dice": dice[method]}
        )
        other = pd.DataFrame({"method": method, "tissue": ["cap"], "index": [0], "dice": [1.0]})
        per_patch[method] = pd.concat([other, rows], ignore_index=True)
        pred = np.roll(masks, shift, axis=2).astype(np.uint8)  # FP on one side, FN on the other
        predictions[method] = tmp_path / f"{method}.h5"
        with h5py.File(predictions[method], "w") as h5:
            h5["tuft"] = pred
    return {"per_patch": per_patch, "predictions": predictions, "patch_set": patch_set}


def test_qualitative(tmp_path, qual_inputs):
    out = tmp_path / "q.png"
    chosen = qualitative(TISSUE, out_png=out, **qual_inputs)
    assert list(chosen["rank"]) == ["best", "median", "worst"]
    assert list(chosen["index"]) == [2, 1, 0]
    assert list(chosen["dice_omniseg"]) == [95.0, 50.0, 10.0]
    assert list(chosen["dice_unet"]) == [20.0, 20.0, 20.0]
    img = check_png(out)
    # 3 rows x 4 columns: wider than high; every overlay colour appears in the picture.
    assert img.shape[1] > img.shape[0]
    # True positives and false negatives lie on the object (image colour (200, 40, 60), drawn
    # in grey under the overlays).
    rgb = img[..., :3].reshape(-1, 3)
    grey = (0.299 * 200 + 0.587 * 40 + 0.114 * 60) / 255
    for name in ("true positive", "false negative"):
        target = OVERLAY_ALPHA * np.asarray(OVERLAY_COLORS[name]) + (1 - OVERLAY_ALPHA) * grey
        assert (np.abs(rgb - target).max(axis=1) < 0.03).any(), name


def test_qualitative_reads_csv_paths_and_ranks_by_reference(tmp_path, qual_inputs):
    paths = {}
    for method, frame in qual_inputs["per_patch"].items():
        paths[method] = tmp_path / f"{method}.csv"
        frame.to_csv(paths[method], index=False)
    chosen = qualitative(
        TISSUE,
        paths,
        qual_inputs["predictions"],
        qual_inputs["patch_set"],
        tmp_path / "q.png",
        reference="unet",
    )
    # All unet Dice values tie: lower index first.
    assert list(chosen["index"]) == [0, 2, 4]


def test_qualitative_errors(tmp_path, qual_inputs):
    out = tmp_path / "q.png"
    args = dict(qual_inputs)
    with pytest.raises(ValueError, match="reference method 'tal'"):
        qualitative(TISSUE, out_png=out, reference="tal", **args)
    with pytest.raises(ValueError, match="no predictions file for method"):
        qualitative(TISSUE, out_png=out, **{**args, "predictions": {"omniseg": "x.h5"}})
    cap = Tissue(2, "cap", "capsule", "5x", 2.0, "2_0_capsule", "capsule", "#ff7f0e")
    with pytest.raises(ValueError, match="tuft.h5 is of tissue 'tuft', not 'cap'"):
        qualitative(cap, out_png=out, **args)
    with h5py.File(args["predictions"]["omniseg"], "a") as h5:
        h5["kept"] = h5["tuft"][()]
        del h5["tuft"]
    with pytest.raises(ValueError, match="omniseg.h5 have no dataset /tuft"):
        qualitative(TISSUE, out_png=out, **args)
    with h5py.File(args["predictions"]["omniseg"], "a") as h5:
        h5["tuft"] = h5["kept"][()]
    with h5py.File(args["predictions"]["unet"], "a") as h5:
        del h5["tuft"]
        h5["tuft"] = np.zeros((4, P, P), np.uint8)
    with pytest.raises(ValueError, match="unet.h5: /tuft is"):
        qualitative(TISSUE, out_png=out, **args)
    assert not out.exists()
