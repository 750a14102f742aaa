"""The slide table: per-slide scores of every method pooled into one table (hand-made counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omniseg.tissues import TissueTable, load_tissues
from omniseg.wsi.tables import slide_table, slide_table_markdown, write_slide_table

REPO = Path(__file__).resolve().parents[1]
#: cap and tuft of the registry, as a two-tissue table
TWO = TissueTable.from_records(
    [
        {**r, "id": i}
        for i, r in enumerate(
            r
            for r in load_tissues(REPO / "config" / "tissues.tsv").to_records()
            if r["key"] in ("cap", "tuft")
        )
    ]
)


def _scores(path, method, slide, counts, raw=None):
    """counts: {key: (tp, fp, fn)} -> a score table as score_slide writes it."""
    rows = []
    for key, (tp, fp, fn) in counts.items():
        row = {"method": method, "slide": slide, "tissue": key, "tp": tp, "fp": fp, "fn": fn}
        row["fp_mm2"] = fp * 1e-6
        if raw is not None:
            rtp, rfp, rfn = raw[key]
            row.update(raw_tp=rtp, raw_fp=rfp, raw_fn=rfn, raw_fp_mm2=rfp * 1e-6)
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def tables(tmp_path):
    raw = {"cap": (10, 90, 0), "tuft": (5, 5, 5)}
    return [
        _scores(tmp_path / "a1.csv", "a", "s1", {"cap": (10, 0, 10), "tuft": (0, 0, 0)}, raw),
        _scores(tmp_path / "a2.csv", "a", "s2", {"cap": (30, 10, 0), "tuft": (0, 4, 0)}, raw),
        _scores(tmp_path / "b1.csv", "b", "s1", {"cap": (0, 0, 20), "tuft": (0, 0, 0)}, raw),
    ]


def test_counts_are_pooled_over_slides(tables):
    t = slide_table(tables, TWO, methods=["b", "a"]).set_index(["method", "tissue"])
    assert list(dict.fromkeys(t.index.get_level_values(0))) == ["b", "a"]
    # a, cap: tp 40, fp 10, fn 10 -> 80/100; not the mean of the per-slide Dice (66.7, 85.7)
    assert t.loc[("a", "cap"), "dice"] == pytest.approx(80.0)
    assert t.loc[("a", "tuft"), "dice"] == pytest.approx(0.0)  # 4 false-positive pixels
    assert t.loc[("b", "tuft"), "dice"] == pytest.approx(100.0)  # absent from both
    assert t.loc[("a", "cap"), "slides"] == 2 and t.loc[("b", "cap"), "slides"] == 1
    assert t.loc[("a", "tuft"), "fp_mm2"] == pytest.approx(4e-6)
    # raw heads: cap 20 tp, 180 fp, 0 fn over two slides -> 40/220
    assert t.loc[("a", "cap"), "raw_dice"] == pytest.approx(200 * 20 / 220)
    assert t.loc[("a", "average"), "dice"] == pytest.approx(40.0)
    assert t.loc[("a", "average"), "fp_mm2"] == pytest.approx(14e-6)


def test_markdown_has_one_block_per_measure_and_bold_best(tables):
    md = slide_table_markdown(slide_table(tables, TWO), TWO)
    assert "2 slide(s)" in md
    for title in ("after aggregation", "raw head", "False-positive area"):
        assert title in md
    dice_rows = [line for line in md.splitlines() if line.startswith("| a |")]
    assert dice_rows[0].split("|")[2].strip() == "**80.00**"  # a beats b on cap (0.00)
    assert np.isclose(float(dice_rows[0].split("|")[3].strip()), 0.0)


def test_written_files_and_bad_input(tmp_path, tables):
    write_slide_table(tables, TWO, tmp_path / "s.csv", tmp_path / "s.md")
    assert pd.read_csv(tmp_path / "s.csv").shape[0] == 6  # 2 methods x (2 tissues + average)
    assert (tmp_path / "s.md").read_text().startswith("Complete-label slide maps")
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"tissue": ["cap"], "dice": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=f"slide scores {bad} lack column"):
        slide_table([bad], TWO)
    with pytest.raises(ValueError, match="scored twice"):
        slide_table([tables[0], tables[0]], TWO)
