"""The slide table: every method's complete-label map of the slides with ground truth, per tissue.

Input: the per-slide score tables of :func:`omniseg.wsi.aggregate.score_aggregation` (one per
slide and method, with ``slide`` and ``method`` columns added by
:func:`omniseg.steps.slides.score_slide`). Pixel counts are pooled over slides, so a Dice is over all
slides' pixels, not a mean of per-slide Dice values:

* ``dice``: the aggregated label map against the reference (the same rule applied to the truth);
* ``raw_dice``: each tissue's own head, thresholded, before aggregation, against its own truth;
* ``fp_mm2`` / ``raw_fp_mm2``: area labelled this tissue where the truth has none of it, which
  patch-level Dice never counts.

``average`` is the mean over tissues of each Dice column and the sum of the areas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from omniseg.io import atomic_path
from omniseg.metrics import dice_from_counts
from omniseg.tissues import TissueTable

#: Columns of ``slides.csv``.
COLUMNS = (
    "method",
    "tissue",
    "slides",
    "dice",
    "raw_dice",
    "fp_mm2",
    "raw_fp_mm2",
    "tp",
    "fp",
    "fn",
    "raw_tp",
    "raw_fp",
    "raw_fn",
)
#: Markdown blocks: (column, title, higher is better).
BLOCKS = (
    ("dice", "Dice (%) after aggregation ↑", True),
    ("raw_dice", "Dice (%) of the raw head, before aggregation ↑", True),
    ("fp_mm2", "False-positive area after aggregation (mm², all slides) ↓", False),
)
AVERAGE = "average"
_NEEDED = ("method", "slide", "tissue", "tp", "fp", "fn", "fp_mm2")


def slide_table(
    score_csvs: Sequence[str | Path], tissues: TissueTable, methods: Sequence[str] | None = None
) -> pd.DataFrame:
    """Pool per-slide scores into one row per (method, tissue) plus each method's average.

    Args:
        score_csvs: score tables with the columns of ``score_slide`` (``method`` and ``slide``
            included).
        tissues: the registry (row order).
        methods: row order of the methods (None: as they come).

    Returns:
        DataFrame with :data:`COLUMNS`.

    Raises:
        ValueError: naming the file: a score table without the needed columns, or one slide
            scored twice for a method.
    """
    frames = []
    for path in map(Path, score_csvs):
        df = pd.read_csv(path)
        missing = [c for c in _NEEDED if c not in df.columns]
        if missing:
            raise ValueError(f"slide scores {path} lack column(s) {', '.join(missing)}")
        frames.append(df)
    if not frames:
        raise ValueError("slide_table needs at least one score table")
    scores = pd.concat(frames, ignore_index=True)
    scores["slide"] = scores["slide"].astype(str)
    dup = scores.duplicated(["method", "slide", "tissue"])
    if dup.any():
        first = scores[dup].iloc[0]
        raise ValueError(f"slide {first['slide']} is scored twice for method {first['method']}")
    has_raw = "raw_tp" in scores.columns
    order = list(methods) if methods else list(dict.fromkeys(scores["method"]))
    rows = []
    for method in order:
        mine = scores[scores["method"] == method]
        if mine.empty:
            continue
        per_tissue = []
        for key in tissues.keys:
            s = mine[mine["tissue"] == key]
            if s.empty:
                continue
            tp, fp, fn = (int(s[c].sum()) for c in ("tp", "fp", "fn"))
            row = {
                "method": method,
                "tissue": key,
                "slides": int(s["slide"].nunique()),
                "dice": dice_from_counts(tp, fp, fn),
                "fp_mm2": float(s["fp_mm2"].sum()),
                "tp": tp,
                "fp": fp,
                "fn": fn,
            }
            if has_raw and s["raw_tp"].notna().all():
                rtp, rfp, rfn = (int(s[c].sum()) for c in ("raw_tp", "raw_fp", "raw_fn"))
                row.update(
                    raw_dice=dice_from_counts(rtp, rfp, rfn),
                    raw_fp_mm2=float(s["raw_fp_mm2"].sum()),
                    raw_tp=rtp,
                    raw_fp=rfp,
                    raw_fn=rfn,
                )
            per_tissue.append(row)
        rows += per_tissue
        table = pd.DataFrame(per_tissue)
        avg = {
            "method": method,
            "tissue": AVERAGE,
            "slides": int(mine["slide"].nunique()),
            "dice": table["dice"].mean(),
            "fp_mm2": table["fp_mm2"].sum(),
        }
        if "raw_dice" in table:
            avg.update(raw_dice=table["raw_dice"].mean(), raw_fp_mm2=table["raw_fp_mm2"].sum())
        rows.append(avg)
    out = pd.DataFrame(rows)
    return out.reindex(columns=list(COLUMNS))


def slide_table_markdown(table: pd.DataFrame, tissues: TissueTable) -> str:
    """The slide table in the layout of Table 1: one block per measure, tissues as columns, the
    best value of each column in bold."""
    keys = [k for k in [*tissues.keys, AVERAGE] if k in set(table["tissue"])]
    methods = list(dict.fromkeys(table["method"]))
    slides = int(table["slides"].max()) if len(table) else 0
    head = ["Method", *(k.upper() if k != AVERAGE else "Average" for k in keys)]
    lines = [
        f"Complete-label slide maps, {slides} slide(s) with ground truth: pixel counts pooled "
        "over slides.",
        "",
        "| " + " | ".join(head) + " |",
        "|:---|" + "---:|" * len(keys),
    ]
    wide = table.set_index(["method", "tissue"])
    for column, title, higher in BLOCKS:
        if column not in wide or wide[column].isna().all():
            continue
        lines.append(f"| **{title}** |" + " |" * len(keys))
        values = wide[column].unstack("tissue").reindex(index=methods, columns=keys)
        best = values.max() if higher else values.min()
        digits = 2 if column.endswith("dice") else 4
        for method in methods:
            cells = []
            for key in keys:
                v = values.loc[method, key]
                if not np.isfinite(v):
                    cells.append("–")
                    continue
                text = f"{v:.{digits}f}"
                cells.append(f"**{text}**" if len(methods) > 1 and v == best[key] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_slide_table(
    score_csvs: Sequence[str | Path],
    tissues: TissueTable,
    out_csv: str | Path,
    out_md: str | Path,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`slide_table` written as ``out_csv`` and ``out_md`` (atomically)."""
    table = slide_table(score_csvs, tissues, methods)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out_md) as tmp:
        tmp.write_text(slide_table_markdown(table, tissues))
    return table
