"""bench/slide_gap.py: the region picked is where the method errs, the panels show the slide and
the label maps in the tissues' colours, the region's Dice and the stain table are right, and
missing inputs are named."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

SIZE = (96, 128)  # slide rows, cols
MPP = 0.25


@pytest.fixture(scope="module")
def gap(bench):
    return bench("slide_gap")


def _results(tmp: Path, tissues) -> tuple[Path, np.ndarray]:
    """A finished run's files for one slide: the truth has a DT block and a PT block; "good"
    labels both right, "bad" misses the DT block and labels its own DT block elsewhere."""
    results = tmp / "results"
    (results / "slides").mkdir(parents=True)
    img = np.full((*SIZE, 3), 200, np.uint8)
    img[..., 0] = np.arange(SIZE[1], dtype=np.uint8)[None, :]  # columns tell apart
    tifffile.imwrite(results / "slides" / "s.tif", img, photometric="rgb",
                     resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")  # fmt: skip
    dt, pt = np.zeros(SIZE, np.uint8), np.zeros(SIZE, np.uint8)
    dt[60:90, 90:120] = 1
    pt[5:25, 5:25] = 1
    with h5py.File(results / "slides" / "s_truth.h5", "w") as h:
        for t in tissues:
            h[t.key] = dt if t.key == "dt" else pt if t.key == "pt" else np.zeros(SIZE, np.uint8)
        h.attrs["stain"] = "he"
    good = dt * tissues["dt"].label + pt * tissues["pt"].label
    bad = pt * tissues["pt"].label
    bad[60:90, 0:30] = tissues["dt"].label  # a false positive far from the truth
    for name, labels in (("good", good), ("bad", bad)):
        (results / "wsi" / "s" / name).mkdir(parents=True)
        with h5py.File(results / "wsi" / "s" / name / "labels.h5", "w") as h:
            h["labels"] = labels.astype(np.uint8)
            h["labels"].attrs["tissues"] = tissues.to_json()
        (results / "eval" / name).mkdir(parents=True)
        rows = [(name, "dt", "sil", 50.0), (name, "dt", "sil", 70.0), (name, "dt", "tri", 80.0)]
        pd.DataFrame(rows, columns=["method", "tissue", "stain", "dice"]).to_csv(
            results / "eval" / name / "per_patch.csv", index=False
        )
    return results, img


def test_worst_window_finds_the_densest_errors(gap):
    errors = np.zeros((50, 60), bool)
    errors[30:40, 44:56] = True
    errors[0:3, 0:3] = True
    row, col, n = gap.worst_window(errors, 16, 4)
    assert n == 120 and row <= 30 and row + 16 >= 40 and col <= 44 and col + 16 >= 56
    # a window larger than the image is clipped to 50 x 50; the last column start (10) is tried
    # even though the step (40) skips it, and it holds the whole block
    assert gap.worst_window(errors, 100, 40) == (0, 10, 120)


def test_region_panels_dice_and_stain_table(gap, tissues, tmp_path):
    results, img = _results(tmp_path, tissues)
    out = tmp_path / "gap.png"
    report = gap.run(results, "s", "dt", "bad", ["good", "bad"], 48, out)
    assert report["slide_stain"] == "he" and report["panels"] == ["slide", "truth", "good", "bad"]
    r = report["region"]
    # the 48-px window with the most DT errors of "bad" holds its false positive or its miss
    assert r["size"] == 48 and r["errors_px"] == 900
    win = np.s_[r["row"] : r["row"] + 48, r["col"] : r["col"] + 48]
    panels = np.asarray(Image.open(out))
    gap_px = max(4, 48 // 64)
    assert panels.shape == (48, 4 * 48 + 3 * gap_px, 3)
    assert np.array_equal(panels[:, :48], img[win])  # the slide itself first
    truth_panel = panels[:, 48 + gap_px : 96 + gap_px]
    dt_truth = np.zeros(SIZE, bool)
    dt_truth[60:90, 90:120] = True
    blended = np.round((1 - gap.ALPHA) * img[win].astype(np.float32)
                       + gap.ALPHA * np.asarray(tissues["dt"].rgb, np.float32))  # fmt: skip
    assert np.array_equal(truth_panel[dt_truth[win]], blended[dt_truth[win]].astype(np.uint8))
    dice = report["dice_in_region"]
    assert dice["bad"] == 0.0 and dice["good"] in (100.0, None)
    assert report["test_dice_by_stain"]["bad"]["dt"] == {"sil": 60.0, "tri": 80.0}
    json.dumps(report)  # printable


def test_missing_inputs_and_unknown_tissue_are_named(gap, tissues, tmp_path, capsys):
    results, _ = _results(tmp_path, tissues)
    with pytest.raises(SystemExit, match=r"wsi/s/nope/labels\.h5: not found"):
        gap.run(results, "s", "dt", "nope", ["good"], 48, tmp_path / "x.png")
    with pytest.raises(SystemExit, match="--tissue 'glom'"):
        gap.run(results, "s", "glom", "good", ["good"], 48, tmp_path / "x.png")
    with pytest.raises(SystemExit):
        gap.main([str(results), "--slide", "s", "--size", "8"])
    assert "--size must be >= 16, got 8" in capsys.readouterr().err


def test_label_maps_and_evaluation_elsewhere(gap, tissues, tmp_path):
    """--labels and --eval: bench/more_slides.py's layout (maps/{method}/{slide}/labels.h5)."""
    results, _ = _results(tmp_path, tissues)
    moved = tmp_path / "more"
    (moved / "maps" / "bad" / "s").mkdir(parents=True)
    (results / "slides").rename(moved / "slides")
    (results / "wsi" / "s" / "bad" / "labels.h5").rename(moved / "maps" / "bad" / "s" / "labels.h5")
    report = gap.run(moved, "s", "dt", "bad", ["bad"], 48, tmp_path / "g.png",
                     "maps/{method}/{slide}/labels.h5", results / "eval")  # fmt: skip
    assert report["region"]["errors_px"] == 900 and report["dice_in_region"] == {"bad": 0.0}
    with pytest.raises(SystemExit, match="no \\*/per_patch.csv"):
        gap.run(moved, "s", "dt", "bad", ["bad"], 48, tmp_path / "g.png",
                "maps/{method}/{slide}/labels.h5")  # fmt: skip
