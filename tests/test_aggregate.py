"""Tests of complete-label aggregation and its scoring (omniseg.wsi.aggregate)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from omniseg.tissues import load_tissues
from omniseg.wsi.aggregate import (
    DEFAULT_RULES,
    PAPER_RULES,
    aggregate,
    aggregate_masks,
    check_rules,
    nested_labels,
    score_aggregation,
    upsample_window,
)
from omniseg.wsi.export import label_map_info

ROOT = Path(__file__).resolve().parents[1]
T = load_tissues(ROOT / "config" / "tissues.tsv")
L = {t.key: t.label for t in T}  # dt 1, pt 2, cap 3, tuft 4, ves 5, ptc 6


def _masks(cells: dict[str, list[int]], n: int = 8) -> dict[str, np.ndarray]:
    """One row of ``n`` pixels; ``cells[key]`` lists the pixels that tissue claims."""
    out = {}
    for key, idx in cells.items():
        m = np.zeros((1, n), bool)
        m[0, idx] = True
        out[key] = m
    return out


# pixel:             0      1      2     3      4      5        6      7
# claims:            -     cap  cap+tuft tuft  dt   dt+pt  tuft+cap+dt  ptc
CELLS = {"cap": [1, 2, 6], "tuft": [2, 3, 6], "dt": [4, 5, 6], "pt": [5], "ptc": [7]}


@pytest.mark.parametrize(
    "rules, expect",
    [
        # the paper: tuft wins over capsule; other multiple claims are background
        (PAPER_RULES, [0, L["cap"], L["tuft"], L["tuft"], L["dt"], 0, 0, L["ptc"]]),
        # no nested pair: capsule + tuft is a conflict too
        (
            {"nested": [], "conflict": "background"},
            [0, L["cap"], 0, L["tuft"], L["dt"], 0, 0, L["ptc"]],
        ),
        # the rule is data: reversed, the capsule wins
        (
            {"nested": [["cap", "tuft"]]},
            [0, L["cap"], L["cap"], L["tuft"], L["dt"], 0, 0, L["ptc"]],
        ),
        # tuft over cap and pt over dt; pixel 6 keeps tuft and dt -> still a conflict
        (
            {"nested": [["tuft", "cap"], ["pt", "dt"]]},
            [0, L["cap"], L["tuft"], L["tuft"], L["dt"], L["pt"], 0, L["ptc"]],
        ),
    ],
)
def test_aggregate_masks_table(rules, expect):
    labels = aggregate_masks(_masks(CELLS), T, rules)
    assert labels.dtype == np.uint8 and labels.tolist() == [expect]


def test_conflict_max_gives_the_pixel_to_the_most_confident_tissue():
    masks = _masks(CELLS)
    scores = {k: np.zeros((1, 8), np.float32) for k in masks}
    scores["dt"][0] = [0, 0, 0, 0, 0.9, 0.6, 0.7, 0]
    scores["pt"][0] = [0, 0, 0, 0, 0, 0.8, 0, 0]
    scores["tuft"][0] = [0, 0, 0.6, 0.9, 0, 0, 0.9, 0]
    scores["cap"][0] = [0, 0.9, 0.95, 0, 0, 0, 0.99, 0]
    rules = {"nested": [["tuft", "cap"]], "conflict": "max"}
    labels = aggregate_masks(masks, T, rules, scores)
    # pixel 2: the nested rule first (tuft, though cap is more confident); 5: pt 0.8 > dt 0.6;
    # 6: cap drops out (nested), the tuft label stands for both: 0.99 > dt 0.7
    assert labels.tolist() == [
        [0, L["cap"], L["tuft"], L["tuft"], L["dt"], L["pt"], L["tuft"], L["ptc"]]
    ]
    # the unit competes at its surer claim: dt 0.95 beats the tuft's 0.9 but not the cap's 0.99
    scores["dt"][0, 6] = 0.95
    assert aggregate_masks(masks, T, rules, scores)[0, 6] == L["tuft"]
    scores["dt"][0, 6] = 0.995
    assert aggregate_masks(masks, T, rules, scores)[0, 6] == L["dt"]
    # the paper's rule ignores the scores; a truth (no scores) has no ranking: background
    assert (
        aggregate_masks(masks, T, PAPER_RULES, scores).tolist()
        == aggregate_masks(masks, T, PAPER_RULES).tolist()
    )
    assert (
        aggregate_masks(masks, T, rules).tolist() == aggregate_masks(masks, T, PAPER_RULES).tolist()
    )


def test_conflict_max_ranks_a_nested_unit_by_its_surer_claim():
    """A glomerulus whose capsule head is sure (0.9) and tuft head unsure (0.6) keeps its
    pixels against an artery head at 0.8: the tuft label stands for both claims. Ranked at the
    tuft's own score it lost them (the artery label on Omni-Seg's glomeruli, demo slides)."""
    masks = _masks({"cap": [0, 1, 2], "tuft": [0, 1], "ves": [0, 1, 2, 3]})
    scores = {k: np.zeros((1, 8), np.float32) for k in masks}
    scores["cap"][0, :3] = [0.9, 0.7, 0.9]
    scores["tuft"][0, :2] = [0.6, 0.6]
    scores["ves"][0, :4] = [0.8, 0.8, 0.8, 0.8]
    rules = {"nested": [["tuft", "cap"]], "conflict": "max"}
    labels = aggregate_masks(masks, T, rules, scores)
    # 0: max(tuft 0.6, cap 0.9) > ves 0.8; 1: max(0.6, 0.7) < 0.8; 2: cap alone 0.9 > 0.8
    assert labels.tolist() == [[L["tuft"], L["ves"], L["cap"], L["ves"], 0, 0, 0, 0]]
    # the outer tissue's score counts only where both claim: a tuft pixel the capsule head
    # misses competes at the tuft's own score
    masks["cap"][0, 0] = False
    assert aggregate_masks(masks, T, rules, scores)[0, 0] == L["ves"]


def test_conflict_max_nested_ranking_is_order_free():
    m = _masks({"dt": [0, 1], "pt": [0, 1, 2], "ves": [0, 1, 2, 3], "ptc": [0, 1, 2, 3]})
    scores = {k: np.zeros((1, 8), np.float32) for k in m}
    scores["dt"][0, :2] = [0.55, 0.6]
    scores["pt"][0, :3] = [0.9, 0.6, 0.6]
    scores["ves"][0, :4] = [0.6, 0.95, 0.7, 0.7]
    scores["ptc"][0, :4] = [0.8, 0.9, 0.8, 0.6]
    chain = [["dt", "pt"], ["pt", "ves"]]
    a = aggregate_masks(m, T, {"nested": chain, "conflict": "max"}, scores)
    b = aggregate_masks(m, T, {"nested": chain[::-1], "conflict": "max"}, scores)
    assert np.array_equal(a, b)
    # 0: dt stands for dt+pt at 0.9 > ptc 0.8; 1: dt at max(dt, pt) = 0.6 < ptc 0.9 (the ves
    # claim is not dt's outer: it does not count); 2: pt at max(pt, ves) 0.7 < ptc 0.8; 3: ves
    assert a.tolist() == [[L["dt"], L["ptc"], L["ptc"], L["ves"], 0, 0, 0, 0]]


def test_nested_pairs_use_the_original_masks_order_free():
    m = _masks({"dt": [0, 1], "pt": [0, 1, 2], "ves": [0, 2, 3]})
    chain = [["dt", "pt"], ["pt", "ves"]]
    a = aggregate_masks(m, T, {"nested": chain})
    b = aggregate_masks(m, T, {"nested": chain[::-1]})
    assert np.array_equal(a, b)
    # pixel 0: dt beats pt, pt (original claim) beats ves -> dt; pixel 2: pt beats ves -> pt
    assert a.tolist() == [[L["dt"], L["dt"], L["pt"], L["ves"], 0, 0, 0, 0]]


def test_missing_masks_claim_nothing():
    labels = aggregate_masks({"ves": np.ones((2, 2), bool)}, T)
    assert (labels == L["ves"]).all()


@pytest.mark.parametrize(
    "rules, match",
    [
        ({"nested": [["tuft", "glom"]]}, "not in the tissue table"),
        ({"nested": [["tuft"]]}, r"must be \[inner, outer\]"),
        ({"nested": [["cap", "cap"]]}, r"must be \[inner, outer\]"),
        ({"conflict": "first"}, "conflict must be one of"),
        ({"nested": [], "priority": []}, "unknown entr"),
    ],
)
def test_bad_rules(rules, match):
    with pytest.raises(ValueError, match=match):
        check_rules(rules, T)


def test_aggregate_masks_bad_input():
    with pytest.raises(ValueError, match="unknown tissue"):
        aggregate_masks({"glom": np.ones((2, 2), bool)}, T)
    with pytest.raises(ValueError, match="different shapes"):
        aggregate_masks({"dt": np.ones((2, 2), bool), "pt": np.ones((2, 3), bool)}, T)


def test_upsample_window_nearest_and_bilinear():
    prob = np.array([[0, 255], [255, 0]], np.uint8)
    near = upsample_window(prob, 4.0, (0, 8), (0, 8), "nearest")
    assert np.array_equal(near, np.kron(prob / 255.0, np.ones((4, 4))).astype(np.float32))
    # window offsets: the same values from a sub-window
    assert np.array_equal(upsample_window(prob, 4.0, (3, 6), (2, 7), "nearest"), near[3:6, 2:7])
    lin = upsample_window(prob, 4.0, (0, 8), (0, 8), "bilinear")
    # level-0 pixel r samples u = (r + 0.5) / 4 - 0.5: clamped to 0 for r <= 1, 1 for r >= 6
    row = lin[0]
    assert row[:2].tolist() == [0, 0] and row[6:].tolist() == [1, 1]
    assert row[2:6] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert np.allclose(upsample_window(prob, 1.0, (0, 2), (0, 2)), prob / 255.0)
    assert np.allclose(lin, lin.T)
    assert upsample_window(prob * 0 + 100, 4.0, (0, 8), (0, 8), skip_below=0.5) is None
    flat = upsample_window(np.full((3, 3), 51, np.uint8), 3.0, (0, 9), (0, 9))
    assert np.allclose(flat, 0.2)


def _prob_file(path: Path, keys, factor: float, probs: dict[str, np.ndarray], level0_shape):
    with h5py.File(path, "w") as fh:
        for k in keys:
            fh.create_dataset(
                f"prob/{k}", data=np.rint(probs[k] * 255).astype(np.uint8), chunks=True
            )
        fh.attrs["factor"] = factor
        fh.attrs["level0_shape"] = np.asarray(level0_shape)
        fh.attrs["tissues"] = json.dumps(list(keys))
    return path


@pytest.fixture
def prob_files(tmp_path):
    """A 64 x 96 level-0 slide; hand-made probabilities at each scale of the table."""
    h0, w0 = 64, 96
    files = []
    expect = np.zeros((h0, w0), np.uint8)
    for um in T.scales:
        f = um / 0.25
        hs, ws = int(np.ceil(h0 / f)), int(np.ceil(w0 / f))
        tissues = T.at_scale(um)
        probs = {t.key: np.zeros((hs, ws)) for t in tissues}
        files.append((tissues, f, probs, (hs, ws)))
    # 5x (factor 8, 8 x 12): capsule over scale cols 0..5, tuft over cols 3..5 (rows 0..3)
    _, _, p5, _ = files[2]
    p5["cap"][0:4, 0:6] = 0.9
    p5["tuft"][0:4, 3:6] = 0.8
    # 10x (factor 4, 16 x 24): dt on rows 10..15 cols 0..11, pt overlapping cols 6..11
    _, _, p10, _ = files[1]
    p10["dt"][10:16, 0:12] = 0.7
    p10["pt"][10:16, 6:12] = 0.8
    p10["ves"][0:4, 20:24] = 0.4  # below threshold
    # 40x: one ptc square
    _, _, p40, _ = files[0]
    p40["ptc"][0:8, 80:88] = 1.0
    expect[0:32, 0:24] = L["cap"]
    expect[0:32, 24:48] = L["tuft"]
    expect[40:64, 0:24] = L["dt"]
    expect[40:64, 24:48] = L["pt"]  # claimed by dt (0.7) and pt (0.8): conflict "max"
    expect[0:8, 80:88] = L["ptc"]
    paths = [
        _prob_file(tmp_path / f"p{i}.h5", [t.key for t in ts], f, pr, (h0, w0))
        for i, (ts, f, pr, _) in enumerate(files)
    ]
    return paths, expect


def test_aggregate_end_to_end(prob_files, tmp_path):
    paths, expect = prob_files
    out = aggregate(
        paths,
        T,
        tmp_path / "labels.h5",
        level0_shape=(64, 96),
        mpp=0.25,
        chunk=32,
        tissue_area_px=5000,
        upsample="nearest",
    )
    with h5py.File(out, "r") as fh:
        labels = fh["labels"][()]
        attrs = dict(fh["labels"].attrs)
        assert fh["labels"].chunks == (32, 32)
    assert np.array_equal(labels, expect)
    info = label_map_info(out)  # W2's reader accepts the contract
    assert info.shape == (64, 96) and info.mpp == 0.25 and info.tissue_area_px == 5000
    assert info.label_table == {0: "background", **{t.label: t.key for t in T}}
    assert info.tissues == T
    assert json.loads(attrs["rules"]) == DEFAULT_RULES and attrs["threshold"] == 0.5
    # the paper's rule: the pixels both dt and pt claim are background
    paper = aggregate(
        paths, T, tmp_path / "paper.h5", level0_shape=(64, 96), mpp=0.25, chunk=32,
        upsample="nearest", rules=PAPER_RULES, progress=False,
    )  # fmt: skip
    with h5py.File(paper, "r") as fh:
        expect[40:64, 24:48] = 0
        assert np.array_equal(fh["labels"][()], expect)


def test_tissue_mask_limits_the_labels(prob_files, tmp_path):
    paths, expect = prob_files
    mask = np.zeros((8, 12), bool)  # downsample 8: one mask pixel = 8x8 level-0 pixels
    mask[2:6, 3:9] = True
    out = aggregate(
        paths, T, tmp_path / "labels.h5", level0_shape=(64, 96), mpp=0.25, chunk=32,
        upsample="nearest", tissue_mask=mask, mask_downsample=8,
    )  # fmt: skip
    with h5py.File(out, "r") as fh:
        labels = fh["labels"][()]
    inside = np.kron(mask, np.ones((8, 8), bool))
    assert np.array_equal(labels[inside], expect[inside])
    assert not labels[~inside].any() and expect[~inside].any()
    with pytest.raises(ValueError, match="mask_downsample"):
        aggregate(paths, T, tmp_path / "x.h5", level0_shape=(64, 96), mpp=0.25, tissue_mask=mask)


def test_aggregate_bilinear_keeps_block_interiors(prob_files, tmp_path):
    paths, expect = prob_files
    out = aggregate(paths, T, tmp_path / "labels.h5", level0_shape=(64, 96), mpp=0.25, chunk=40)
    with h5py.File(out, "r") as fh:
        labels = fh["labels"][()]
        assert "tissue_area_px" not in fh["labels"].attrs
    # away from object borders bilinear and nearest agree; borders move by < half a scale pixel
    assert (labels[4:28, 4:20] == L["cap"]).all() and (labels[4:28, 28:44] == L["tuft"]).all()
    assert (labels[44:64, 2:22] == L["dt"]).all() and (labels[44:64, 26:46] == L["pt"]).all()
    assert (labels == expect).mean() > 0.9


def test_aggregate_errors(prob_files, tmp_path):
    paths, _ = prob_files
    kw = dict(level0_shape=(64, 96), mpp=0.25)
    with pytest.raises(ValueError, match=r"no probability map for tissue\(s\) \['ptc'\]"):
        aggregate(paths[1:], T, tmp_path / "l.h5", **kw)
    with pytest.raises(ValueError, match=r"p0.h5 was predicted for a \(64, 96\) slide"):
        aggregate(paths, T, tmp_path / "l.h5", level0_shape=(64, 97), mpp=0.25)
    with pytest.raises(ValueError, match="in two files"):
        aggregate([*paths, paths[0]], T, tmp_path / "l.h5", **kw)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.h5 is not a readable HDF5"):
        aggregate([*paths, tmp_path / "junk.h5"], T, tmp_path / "l.h5", **kw)
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["x"] = 1
    with pytest.raises(ValueError, match="other.h5 lacks the 'prob' group"):
        aggregate([*paths, tmp_path / "other.h5"], T, tmp_path / "l.h5", **kw)
    with pytest.raises(ValueError, match="threshold"):
        aggregate(paths, T, tmp_path / "l.h5", threshold=1.5, **kw)
    assert not (tmp_path / "l.h5").exists()


def _truth_file(path: Path, masks: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as fh:
        for k, m in masks.items():
            fh.create_dataset(k, data=m.astype(np.uint8))
    return path


def _labels_file(path: Path, labels: np.ndarray, mpp: float | None = None) -> Path:
    with h5py.File(path, "w") as fh:
        dset = fh.create_dataset("labels", data=labels, chunks=True)
        if mpp is not None:
            dset.attrs["mpp"] = mpp
    return path


def test_score_aggregation_known_counts(tmp_path):
    h, w = 4, 10
    truth = {k: np.zeros((h, w), bool) for k in T.keys}
    truth["cap"][:, 0:6] = True
    truth["tuft"][:, 2:4] = True  # reference: cap at cols 0,1,4,5; tuft at 2,3
    truth["dt"][:, 8:10] = True
    truth["pt"][:, 9] = True  # reference: dt+pt conflict at col 9 -> background
    pred = np.zeros((h, w), np.uint8)
    pred[:, 0:2] = L["cap"]
    pred[:, 2:5] = L["tuft"]  # col 4 is a capsule pixel taken as tuft
    pred[:, 8] = L["dt"]
    pred[:, 9] = L["pt"]  # false positive: the reference says background
    df = score_aggregation(
        _labels_file(tmp_path / "l.h5", pred, mpp=0.5),
        _truth_file(tmp_path / "t.h5", truth),
        T,
        tmp_path / "s.csv",
        chunk=3,
    )
    row = df.set_index("tissue")
    assert row.loc["tuft", "fp_mm2"] == pytest.approx(4 * 0.25 / 1e6)  # 4 pixels of 0.5 um
    # the glomerular unit as the map shows it: capsule and tuft labels (cols 0-4) against the
    # unit's truth (cols 0-5); col 4, labelled tuft, lies inside the unit
    assert row.loc["cap", ["tp", "fp", "fn"]].tolist() == [20, 0, 4]
    assert row.loc["cap", "dice"] == pytest.approx(200 * 20 / (20 + 24))
    assert row.loc["cap", "fp_mm2"] == 0
    assert row.loc["tuft", ["tp", "fp", "fn"]].tolist() == [8, 4, 0]
    assert row.loc["dt", "dice"] == pytest.approx(100.0)
    assert row.loc["pt", ["tp", "fp", "fn", "dice"]].tolist() == [0, 4, 0, 0.0]
    assert row.loc["ves", "dice"] == 100.0  # absent from both
    assert pd.read_csv(tmp_path / "s.csv").shape == (len(T), 9)


def test_nested_labels_follow_the_rules():
    pairs = check_rules({"nested": [["tuft", "cap"]]}, T)
    shows = nested_labels(T, pairs)
    assert shows["cap"] == sorted([L["cap"], L["tuft"]]) and shows["tuft"] == [L["tuft"]]
    assert all(shows[k] == [L[k]] for k in T.keys if k not in ("cap", "tuft"))
    # chains close transitively; without rules every tissue is its own label
    chain = nested_labels(T, check_rules({"nested": [["tuft", "cap"], ["cap", "ves"]]}, T))
    assert chain["ves"] == sorted([L["ves"], L["cap"], L["tuft"]])
    assert nested_labels(T, []) == {k: [L[k]] for k in T.keys}


def test_score_aggregation_unit_of_a_nested_pair_is_its_own_truth(tmp_path):
    """A map that draws a whole glomerulus as tuft scores the unit perfectly and the tuft not."""
    h, w = 4, 10
    truth = {k: np.zeros((h, w), bool) for k in T.keys}
    truth["cap"][:, 0:6] = True
    truth["tuft"][:, 2:4] = True
    pred = np.zeros((h, w), np.uint8)
    pred[:, 0:6] = L["tuft"]
    df = score_aggregation(
        _labels_file(tmp_path / "l.h5", pred, mpp=1.0),
        _truth_file(tmp_path / "t.h5", truth),
        T,
        None,
    ).set_index("tissue")
    assert df.loc["cap", "dice"] == 100.0
    assert df.loc["tuft", ["tp", "fp", "fn"]].tolist() == [8, 16, 0]
    # with the paper's rules too (same nesting), and without nesting the capsule ring alone
    flat = score_aggregation(
        tmp_path / "l.h5", tmp_path / "t.h5", T, None, rules={"conflict": "max"}
    ).set_index("tissue")
    assert flat.loc["cap", ["tp", "pred_px"]].tolist() == [0, 0]


def test_score_aggregation_of_raw_heads_known_counts(tmp_path):
    """Each head is scored before aggregation against its own truth mask (cap includes tuft),
    limited to the tissue mask."""
    h, w = 4, 8
    truth = {k: np.zeros((h, w), bool) for k in T.keys}
    truth["cap"][:, 0:6] = True
    truth["tuft"][:, 2:4] = True
    probs = {k: np.zeros((h, w), np.float32) for k in T.keys}
    probs["cap"][:, 0:8] = 0.9  # 6 columns right, 2 columns false positive
    probs["tuft"][:, 2:5] = 0.7  # 2 right, 1 false positive
    probs["ves"][:, 6:8] = 0.4  # below the threshold: nothing
    prob = _prob_file(tmp_path / "p.h5", T.keys, 1.0, probs, (h, w))
    labels = aggregate_masks({k: p > 0.5 for k, p in probs.items()}, T)
    tissue_mask = np.ones((h, w), bool)
    tissue_mask[:, 7] = False  # outside the tissue: not counted
    df = score_aggregation(
        _labels_file(tmp_path / "l.h5", labels, mpp=1.0),
        _truth_file(tmp_path / "t.h5", truth),
        T,
        tmp_path / "s.csv",
        prob_h5s=[prob],
        tissue_mask=tissue_mask,
        mask_downsample=1.0,
    ).set_index("tissue")
    assert df.loc["cap", ["raw_tp", "raw_fp", "raw_fn"]].tolist() == [24, 4, 0]
    assert df.loc["cap", "raw_dice"] == pytest.approx(200 * 24 / (28 + 24))
    assert df.loc["tuft", ["raw_tp", "raw_fp", "raw_fn"]].tolist() == [8, 4, 0]
    assert df.loc["ves", "raw_dice"] == 100.0 and df.loc["ves", "raw_fp_mm2"] == 0
    assert df.loc["cap", "raw_fp_mm2"] == pytest.approx(4 / 1e6)
    # the aggregated map is scored as before: the tuft takes cols 2-4 from the capsule
    assert df.loc["tuft", ["tp", "fp"]].tolist() == [8, 4]


def test_score_aggregation_of_the_reference_is_perfect(tmp_path):
    rng = np.random.default_rng(0)
    truth = {k: rng.random((30, 40)) < 0.2 for k in T.keys}
    ref = aggregate_masks(truth, T)
    df = score_aggregation(
        _labels_file(tmp_path / "l.h5", ref),
        _truth_file(tmp_path / "t.h5", truth),
        T,
        tmp_path / "s.csv",
        chunk=16,
    )
    assert (df["dice"] == 100).all() and (df["fp"] == 0).all() and (df["fn"] == 0).all()
    del truth["ves"]
    with pytest.raises(ValueError, match=r"t2.h5 lacks mask\(s\) for \['ves'\]"):
        score_aggregation(
            tmp_path / "l.h5", _truth_file(tmp_path / "t2.h5", truth), T, tmp_path / "s.csv"
        )


def test_aggregate_shows_progress(prob_files, tmp_path, capsys):
    paths, _ = prob_files
    aggregate(paths, T, tmp_path / "labels.h5", level0_shape=(64, 96), mpp=0.25, chunk=32)
    err = capsys.readouterr().err
    assert "aggregate" in err and "6/6" in err  # 2 x 3 chunks of 32 px
