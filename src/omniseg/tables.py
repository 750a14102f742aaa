"""Table 1 of the paper: Dice / Hausdorff / mean surface distance per tissue and method.

The *long* form is one evaluation summary per method (``summary.csv`` of
:func:`omniseg.evaluate.evaluate`: one row per tissue key plus ``average``). The *wide* form has
one row per method (index ``method``) and two-level columns ``(tissue, metric)``: every tissue key
of the :class:`~omniseg.tissues.TissueTable` in registry order, then ``average``; within each,
:data:`METRICS`. The Markdown rendering follows the paper's layout: one block per metric, tissues
as upper-case columns, the best value of each column in bold. Optional blocks show what a mean
Dice over all patches hides when many masks are empty (a patch without the tissue scores 100
when the prediction is empty too): the Dice over patches whose mask is non-empty
(:func:`nonempty_dice`), and the false-positive patches among the empty masks
(:func:`false_positive_counts`, ``"k/m"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from omniseg.tissues import TissueTable

#: Metrics of Table 1, in its order.
METRICS = ("dice_pct", "hd_um", "msd_um")
#: Which way is better, per metric.
HIGHER_IS_BETTER = {"dice_pct": True, "hd_um": False, "msd_um": False}
#: Block titles of the Markdown table.
METRIC_TITLES = {
    "dice_pct": "Dice (%) ↑",
    "hd_um": "Hausdorff distance (µm) ↓",
    "msd_um": "Mean surface distance (µm) ↓",
}
AVERAGE = "average"
NONEMPTY_TITLE = "Dice (%), non-empty masks only ↑"
FALSE_POSITIVE_TITLE = "False-positive patches on empty masks (patches / empty masks) ↓"


def _summary_frame(summary: pd.DataFrame | str | Path, method: str) -> pd.DataFrame:
    """A summary indexed by tissue key (accepts a DataFrame or a ``summary.csv`` path)."""
    if isinstance(summary, str | Path):
        summary = pd.read_csv(summary)
    summary = summary.set_index("tissue") if "tissue" in summary.columns else summary.copy()
    summary.index = summary.index.astype(str)
    if summary.index.has_duplicates:
        dup = sorted(set(summary.index[summary.index.duplicated()]))
        raise ValueError(f"summary of {method!r} has duplicate tissue rows: {', '.join(dup)}")
    return summary


def _columns(tissue_keys: list[str], metrics=METRICS) -> pd.MultiIndex:
    return pd.MultiIndex.from_product([tissue_keys, list(metrics)], names=["tissue", "metric"])


def table1(
    summaries: Mapping[str, pd.DataFrame | str | Path], tissues: TissueTable
) -> pd.DataFrame:
    """Collect per-method summaries into the wide Table-1 form.

    Args:
        summaries: method name -> its summary (DataFrame with a ``tissue`` column or a tissue
            index, or the path of a ``summary.csv``), with columns :data:`METRICS`. Methods keep
            the mapping's order.
        tissues: the registry; its keys (in order) plus ``average`` become the columns.

    Returns:
        float DataFrame, index ``method``, columns ``(tissue, metric)``; a tissue absent from a
        summary is ``nan``.

    Raises:
        ValueError: a summary lacks a metric column or names a tissue the registry does not know.
    """
    keys = [*tissues.keys, AVERAGE]
    wide = pd.DataFrame(
        np.nan, index=pd.Index(list(summaries), name="method"), columns=_columns(keys)
    )
    for method, summary in summaries.items():
        frame = _summary_frame(summary, method)
        missing = [m for m in METRICS if m not in frame.columns]
        if missing:
            raise ValueError(f"summary of {method!r} lacks column(s) {', '.join(missing)}")
        unknown = sorted(set(frame.index) - set(keys))
        if unknown:
            raise ValueError(
                f"summary of {method!r} has unknown tissue(s) {', '.join(unknown)}; "
                f"known: {', '.join(keys)}"
            )
        for key in frame.index:
            for metric in METRICS:
                wide.loc[method, (key, metric)] = float(frame.loc[key, metric])
    return wide


def undefined_counts(
    summaries: Mapping[str, pd.DataFrame | str | Path], tissues: TissueTable
) -> pd.DataFrame:
    """How many patches had undefined HD/MSD, per method and tissue, as ``"k/n"`` strings.

    Args:
        summaries: as for :func:`table1`, with columns ``n`` and ``n_hd_undefined``.
        tissues: the registry.

    Returns:
        str DataFrame, index ``method``, columns = tissue keys + ``average`` (``""`` if unknown).
    """
    keys = [*tissues.keys, AVERAGE]
    out = pd.DataFrame("", index=pd.Index(list(summaries), name="method"), columns=keys)
    for method, summary in summaries.items():
        frame = _summary_frame(summary, method)
        if not {"n", "n_hd_undefined"} <= set(frame.columns):
            continue
        for key in frame.index.intersection(keys):
            k, n = frame.loc[key, "n_hd_undefined"], frame.loc[key, "n"]
            if pd.notna(k) and pd.notna(n):
                out.loc[method, key] = f"{int(k)}/{int(n)}"
    return out


def nonempty_dice(
    summaries: Mapping[str, pd.DataFrame | str | Path], tissues: TissueTable
) -> pd.DataFrame:
    """Dice (%) over the patches whose mask is non-empty, per method and tissue.

    Args:
        summaries: as for :func:`table1`, with column ``dice_nonempty_pct`` (a summary without
            it gives a row of nan).
        tissues: the registry.

    Returns:
        float DataFrame, index ``method``, columns = tissue keys + ``average``.
    """
    keys = [*tissues.keys, AVERAGE]
    out = pd.DataFrame(np.nan, index=pd.Index(list(summaries), name="method"), columns=keys)
    for method, summary in summaries.items():
        frame = _summary_frame(summary, method)
        if "dice_nonempty_pct" not in frame.columns:
            continue
        for key in frame.index.intersection(keys):
            out.loc[method, key] = float(frame.loc[key, "dice_nonempty_pct"])
    return out


def false_positive_counts(
    summaries: Mapping[str, pd.DataFrame | str | Path], tissues: TissueTable
) -> pd.DataFrame:
    """False-positive patches (mask empty, prediction not) out of the empty masks, ``"k/m"``.

    Args:
        summaries: as for :func:`table1`, with columns ``n_fp_empty`` and ``n_empty_mask``.
        tissues: the registry.

    Returns:
        str DataFrame, index ``method``, columns = tissue keys + ``average`` (``""`` if unknown;
        ``average`` holds the sums over tissues).
    """
    keys = [*tissues.keys, AVERAGE]
    out = pd.DataFrame("", index=pd.Index(list(summaries), name="method"), columns=keys)
    for method, summary in summaries.items():
        frame = _summary_frame(summary, method)
        if not {"n_fp_empty", "n_empty_mask"} <= set(frame.columns):
            continue
        for key in frame.index.intersection(keys):
            k, m = frame.loc[key, "n_fp_empty"], frame.loc[key, "n_empty_mask"]
            if pd.notna(k) and pd.notna(m):
                out.loc[method, key] = f"{int(k)}/{int(m)}"
    return out


def _best_mask(block: pd.DataFrame, higher: bool, decimals: int) -> pd.DataFrame:
    """True where a cell equals its column's best value as displayed (ties are all marked)."""
    shown = block.round(decimals)
    best = shown.max() if higher else shown.min()
    return shown.eq(best, axis=1) & shown.notna()


def table1_markdown(
    wide: pd.DataFrame,
    mark_best: bool = True,
    caption: str | None = None,
    *,
    left_out: pd.DataFrame | None = None,
    nonempty: pd.DataFrame | None = None,
    false_positives: pd.DataFrame | None = None,
    decimals: int = 2,
) -> str:
    """Render a wide Table 1 as Markdown in the paper's layout.

    One table; a bold title row opens each metric block (Dice %, HD um, MSD um), followed by one
    row per method. Columns: ``Method``, the tissue keys upper-case, ``Average``.

    Args:
        wide: from :func:`table1` or :func:`paper_table1`.
        mark_best: bold the best value of each column within each block (max Dice, min HD and
            MSD; ties all bold), only when there is more than one method.
        caption: a line written above the table.
        left_out: optional :func:`undefined_counts` frame; adds a block counting the patches whose
            undefined distances were left out of the HD/MSD means.
        nonempty: optional :func:`nonempty_dice` frame; adds a block after the Dice block, the
            Dice over non-empty masks only (best in bold as in the Dice block).
        false_positives: optional :func:`false_positive_counts` frame; adds a block after it,
            the false-positive patches out of the empty masks.
        decimals: digits after the point.

    Returns:
        Markdown text ending with a newline.
    """
    tissue_keys = list(dict.fromkeys(wide.columns.get_level_values("tissue")))
    header = ["Method", *[("Average" if k == AVERAGE else k.upper()) for k in tissue_keys]]
    lines = []
    if caption:
        lines += [caption, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---", *["---:"] * len(tissue_keys)]) + "|")
    blank = [""] * len(tissue_keys)

    def number_block(title: str, block: pd.DataFrame, higher: bool) -> None:
        block = block.reindex(columns=tissue_keys).astype(float)
        best = (
            _best_mask(block, higher, decimals)
            if mark_best and len(block) > 1
            else pd.DataFrame(False, index=block.index, columns=block.columns)
        )
        lines.append("| " + " | ".join([f"**{title}**", *blank]) + " |")
        for method, row in block.iterrows():
            cells = []
            for key, value in row.items():
                text = "–" if pd.isna(value) else f"{value:.{decimals}f}"
                cells.append(f"**{text}**" if best.loc[method, key] else text)
            lines.append("| " + " | ".join([str(method), *cells]) + " |")

    def count_block(title: str, block: pd.DataFrame) -> None:
        lines.append("| " + " | ".join([f"**{title}**", *blank]) + " |")
        for method, row in block.reindex(columns=tissue_keys, fill_value="").iterrows():
            lines.append("| " + " | ".join([str(method), *row.astype(str)]) + " |")

    for metric in METRICS:
        if metric not in set(wide.columns.get_level_values("metric")):
            continue
        block = wide.xs(metric, axis=1, level="metric")
        number_block(METRIC_TITLES[metric], block, HIGHER_IS_BETTER[metric])
        if metric == "dice_pct" and nonempty is not None:
            number_block(NONEMPTY_TITLE, nonempty, True)
        if metric == "dice_pct" and false_positives is not None:
            count_block(FALSE_POSITIVE_TITLE, false_positives)
    if left_out is not None:
        count_block("Undefined HD/MSD, left out of the means (patches / n)", left_out)
    return "\n".join(lines) + "\n"


def paper_table1(path: str | Path, tissues: TissueTable | None = None) -> pd.DataFrame:
    """Read the paper's Table 1 (``method,tissue,dice_pct,hd_um,msd_um``) into the wide form.

    Tissue names (``DT`` ... ``PTC``, ``Average``) become lower-case keys (``average``).

    Args:
        path: the CSV (``shared/data/paper_table1.csv``).
        tissues: if given, columns follow its key order (then ``average``) and every key must be
            present in the file.

    Returns:
        float DataFrame, index ``method`` (file order), columns ``(tissue, metric)``.

    Raises:
        ValueError: missing columns, duplicate (method, tissue) rows, or tissues missing.
    """
    path = Path(path)
    df = pd.read_csv(path)
    missing = [c for c in ("method", "tissue", *METRICS) if c not in df.columns]
    if missing:
        raise ValueError(f"paper table {path}: missing column(s) {', '.join(missing)}")
    df["tissue"] = df["tissue"].astype(str).str.strip().str.lower()
    if df.duplicated(["method", "tissue"]).any():
        raise ValueError(f"paper table {path}: duplicate (method, tissue) rows")
    found = list(dict.fromkeys(df["tissue"]))
    if tissues is None:
        keys = [k for k in found if k != AVERAGE] + ([AVERAGE] if AVERAGE in found else [])
    else:
        absent = [k for k in [*tissues.keys, AVERAGE] if k not in found]
        if absent:
            raise ValueError(f"paper table {path}: no rows for tissue(s) {', '.join(absent)}")
        keys = [*tissues.keys, AVERAGE]
    long = df[df["tissue"].isin(keys)].set_index(["method", "tissue"])[list(METRICS)]
    wide = long.unstack("tissue")  # columns (metric, tissue)
    wide = wide.swaplevel(axis=1).reindex(columns=_columns(keys))
    wide = wide.reindex(list(dict.fromkeys(df["method"])))
    wide.index.name = "method"
    return wide.astype(float)
