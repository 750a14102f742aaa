"""Tests of omniseg.tables: long -> wide Table 1, best-value marking, the paper's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omniseg.tables import (
    METRICS,
    false_positive_counts,
    nonempty_dice,
    paper_table1,
    table1,
    table1_markdown,
    undefined_counts,
)
from omniseg.tissues import Tissue, TissueTable, load_tissues

REPO = Path(__file__).parents[1]
PAPER_CSV = Path(__file__).parents[2] / "shared/data/paper_table1.csv"


@pytest.fixture
def registry() -> TissueTable:
    return load_tissues(REPO / "config/tissues.tsv")


@pytest.fixture
def two_tissues() -> TissueTable:
    rows = [("aa", 1.0, "#000000"), ("bb", 2.0, "#ffffff")]
    return TissueTable(
        [Tissue(i, k, k, "10x", s, f"{i}_{k}", k, c) for i, (k, s, c) in enumerate(rows)]
    )


def summary(dice, hd, msd, n=(10, 10), undefined=(1, 0)) -> pd.DataFrame:
    """A summary in the shape evaluate() writes: rows aa, bb, average."""
    return pd.DataFrame(
        {
            "tissue": ["aa", "bb", "average"],
            "n": [*n, sum(n)],
            "dice_pct": [*dice, np.mean(dice)],
            "hd_um": [*hd, np.mean(hd)],
            "msd_um": [*msd, np.mean(msd)],
            "n_hd_undefined": [*undefined, sum(undefined)],
        }
    )


@pytest.fixture
def summaries():
    return {
        "first": summary(dice=(90.0, 60.0), hd=(10.0, 40.0), msd=(2.0, 9.0)),
        "second": summary(dice=(80.0, 70.0), hd=(20.0, 30.0), msd=(3.0, 8.0)),
    }


def test_table1_wide_shape(two_tissues, summaries):
    wide = table1(summaries, two_tissues)
    assert list(wide.index) == ["first", "second"]
    assert wide.index.name == "method"
    assert wide.shape == (2, 3 * len(METRICS))
    assert list(dict.fromkeys(wide.columns.get_level_values("tissue"))) == ["aa", "bb", "average"]
    assert wide.loc["second", ("bb", "dice_pct")] == 70.0
    assert wide.loc["first", ("average", "hd_um")] == 25.0


def test_table1_missing_tissue_is_nan_and_unknown_raises(two_tissues, summaries):
    partial = summaries["first"][summaries["first"]["tissue"] != "bb"]
    wide = table1({"p": partial}, two_tissues)
    assert np.isnan(wide.loc["p", ("bb", "dice_pct")])
    bad = summaries["first"].assign(tissue=["aa", "zz", "average"])
    with pytest.raises(ValueError, match="unknown tissue"):
        table1({"bad": bad}, two_tissues)
    with pytest.raises(ValueError, match="lacks column"):
        table1({"bad": summaries["first"].drop(columns="msd_um")}, two_tissues)


def test_table1_reads_summary_csv(tmp_path, two_tissues, summaries):
    path = tmp_path / "summary.csv"
    summaries["first"].to_csv(path, index=False)
    wide = table1({"first": path}, two_tissues)
    pd.testing.assert_frame_equal(wide, table1({"first": summaries["first"]}, two_tissues))


def _cells(md: str, block_title: str) -> dict[str, list[str]]:
    """Rows of one metric block of the Markdown table: method -> cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if block_title in line)
    rows = {}
    for line in lines[start + 1 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("**"):
            break
        rows[cells[0]] = cells[1:]
    return rows


def test_markdown_marks_best(two_tissues, summaries):
    md = table1_markdown(table1(summaries, two_tissues), caption="Test table")
    assert md.splitlines()[0] == "Test table"
    assert "| Method | AA | BB | Average |" in md
    dice = _cells(md, "Dice")
    # columns AA, BB, Average: max is best; the averages tie (75) and are both bold
    assert dice["first"] == ["**90.00**", "60.00", "**75.00**"]
    assert dice["second"] == ["80.00", "**70.00**", "**75.00**"]
    hd = _cells(md, "Hausdorff")
    # min is best for distances
    assert hd["first"][:2] == ["**10.00**", "40.00"]
    assert hd["second"][:2] == ["20.00", "**30.00**"]
    msd = _cells(md, "Mean surface")
    assert msd["first"] == ["**2.00**", "9.00", "**5.50**"]  # tie
    assert msd["second"] == ["3.00", "**8.00**", "**5.50**"]


def test_markdown_single_method_and_unmarked(two_tissues, summaries):
    single = table1_markdown(table1({"only": summaries["first"]}, two_tissues))
    assert "**90.00**" not in single and "90.00" in single
    plain = table1_markdown(table1(summaries, two_tissues), mark_best=False)
    assert "**90.00**" not in plain


def test_markdown_nan_and_left_out(two_tissues, summaries):
    partial = summaries["first"][summaries["first"]["tissue"] != "bb"]
    both = {"first": partial, "second": summaries["second"]}
    md = table1_markdown(table1(both, two_tissues), left_out=undefined_counts(both, two_tissues))
    assert _cells(md, "Dice")["first"][1] == "–"
    assert _cells(md, "Dice")["second"][1] == "**70.00**"  # nan is not a competitor
    undefined = _cells(md, "Undefined")
    assert undefined["first"] == ["1/10", "", "1/20"]
    assert undefined["second"] == ["1/10", "0/10", "1/20"]


def test_paper_table1_parses_real_csv(registry):
    if not PAPER_CSV.is_file():
        pytest.skip(f"{PAPER_CSV} absent")
    wide = paper_table1(PAPER_CSV, registry)
    assert wide.shape == (6, 7 * len(METRICS))
    for metric in METRICS:
        assert wide.xs(metric, axis=1, level="metric").shape == (6, 7)
    assert list(dict.fromkeys(wide.columns.get_level_values("tissue"))) == [
        *registry.keys,
        "average",
    ]
    omni = next(m for m in wide.index if m.startswith("Omni-Seg"))
    assert wide.loc[omni, ("tuft", "dice_pct")] == pytest.approx(96.59)
    assert wide.loc[omni, ("average", "msd_um")] == pytest.approx(12.45)
    assert not wide.isna().any().any()
    # same form without a registry (file order), and Omni-Seg best on average Dice
    assert paper_table1(PAPER_CSV).equals(wide)
    md = table1_markdown(wide)
    assert f"| {omni} | **81.01** |" in md


def test_paper_table1_errors(tmp_path, registry):
    path = tmp_path / "t.csv"
    path.write_text("method,tissue,dice_pct,hd_um\nA,DT,1,2\n")
    with pytest.raises(ValueError, match=f"paper table {path}: missing column"):
        paper_table1(path)
    path.write_text("method,tissue,dice_pct,hd_um,msd_um\nA,DT,1,2,3\nA,Average,1,2,3\n")
    with pytest.raises(ValueError, match="no rows for tissue"):
        paper_table1(path, registry)
    assert paper_table1(path).shape == (1, 6)


def with_empty_masks(frame: pd.DataFrame, nonempty, fp, empty) -> pd.DataFrame:
    """The summary plus the columns of the empty-mask blocks (rows aa, bb, average)."""
    return frame.assign(
        dice_nonempty_pct=[*nonempty, np.mean(nonempty)],
        n_fp_empty=[*fp, sum(fp)],
        n_empty_mask=[*empty, sum(empty)],
    )


def test_nonempty_dice_and_false_positive_blocks(two_tissues, summaries):
    both = {
        "first": with_empty_masks(summaries["first"], (70.0, 50.0), (3, 0), (4, 7)),
        "second": with_empty_masks(summaries["second"], (75.0, 45.0), (1, 2), (4, 7)),
    }
    nonempty = nonempty_dice(both, two_tissues)
    assert nonempty.loc["second", "aa"] == 75.0 and nonempty.loc["first", "average"] == 60.0
    fp = false_positive_counts(both, two_tissues)
    assert fp.loc["first"].tolist() == ["3/4", "0/7", "3/11"]
    md = table1_markdown(
        table1(both, two_tissues),
        left_out=undefined_counts(both, two_tissues),
        nonempty=nonempty,
        false_positives=fp,
    )
    # the standard Dice block is unchanged and comes first; the new blocks follow it
    assert _cells(md, "Dice (%) ↑")["first"] == ["**90.00**", "60.00", "**75.00**"]
    assert _cells(md, "non-empty masks only")["first"] == ["70.00", "**50.00**", "**60.00**"]
    assert _cells(md, "non-empty masks only")["second"] == ["**75.00**", "45.00", "**60.00**"]
    assert _cells(md, "False-positive patches")["second"] == ["1/4", "2/7", "3/11"]
    titles = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| **")]
    assert [t.split(" ")[0] for t in titles] == [
        "**Dice", "**Dice", "**False-positive", "**Hausdorff", "**Mean", "**Undefined",
    ]  # fmt: skip


def test_empty_mask_blocks_without_the_columns(two_tissues, summaries):
    # summaries of an older run lack the columns: the blocks show "–" and blanks, no error
    nonempty = nonempty_dice(summaries, two_tissues)
    assert nonempty.isna().all().all()
    assert (false_positive_counts(summaries, two_tissues) == "").all().all()
