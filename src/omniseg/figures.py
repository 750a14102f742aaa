"""The paper's result figures: parameters vs. Dice (Figure 4) and qualitative patches (Figure 3).

Drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state); every file
is written atomically. SVGs keep their text as text (``svg.fonttype = none``), so labels can be
searched and edited.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from omniseg.data.patchset import read_patch_set
from omniseg.io import atomic_path
from omniseg.tissues import Tissue

#: Overlay colours (RGB in [0, 1]) of the qualitative figure's error classes.
OVERLAY_COLORS = {
    "true positive": (0.15, 0.8, 0.15),
    "false positive": (1.0, 0.15, 0.75),
    "false negative": (0.1, 0.55, 1.0),
}
#: Opacity of the overlays.
OVERLAY_ALPHA = 0.6
#: Rows of the qualitative figure, top to bottom.
RANKS = ("best", "median", "worst")


# -- Figure 4 -----------------------------------------------------------------------------------
def method_key(name: str) -> str:
    """Name used to match methods across tables: no trailing ``(citation)``, lower-case, only
    letters and digits (``"Multi U-Net (Jayapandian et al. 2021)"`` and ``"multi_unet"`` both
    give ``"multiunet"``)."""
    name = re.sub(r"\s*\([^()]*\)\s*$", "", str(name))
    return re.sub(r"[^0-9a-z]", "", name.lower())


def paper_mean_dice(paper: pd.DataFrame) -> dict[str, float]:
    """Mean Dice (%) per method from the paper's table, keyed by :func:`method_key`.

    Accepts the wide form of :func:`omniseg.tables.paper_table1` (column ``("average",
    "dice_pct")``), the long CSV form (columns ``method``, ``tissue``, ``dice_pct``: the
    ``average`` rows are used) or one row per method (``method`` column or index, ``dice_pct`` or
    ``dice``).

    Raises:
        ValueError: none of these forms.
    """
    if isinstance(paper.columns, pd.MultiIndex):
        if ("average", "dice_pct") not in paper.columns:
            raise ValueError("paper table (wide form) has no ('average', 'dice_pct') column")
        series = paper[("average", "dice_pct")]
    else:
        frame = paper.reset_index() if "method" not in paper.columns else paper
        if "method" not in frame.columns:
            raise ValueError("paper table has no 'method' column or index")
        if "tissue" in frame.columns:
            frame = frame[frame["tissue"].astype(str).str.strip().str.lower() == "average"]
        column = next((c for c in ("dice_pct", "dice") if c in frame.columns), None)
        if column is None:
            raise ValueError("paper table has no 'dice_pct' (or 'dice') column")
        series = frame.set_index("method")[column]
    return {method_key(m): float(v) for m, v in series.items() if pd.notna(v)}


def params_vs_dice(
    points: Sequence[Mapping],
    out_png: str | Path,
    out_svg: str | Path,
    paper: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The paper's Figure 4: parameters of the deployed system against mean Dice.

    Args:
        points: one mapping per method: ``method`` (label), ``params`` (total parameters of
            the system that segments every tissue; a multi-network method counts all its
            networks), ``dice`` (mean Dice %, may be nan: drawn at the bottom, marked n/a).
        out_png, out_svg: the figure, in both formats.
        paper: optional paper's Table 1 (any form :func:`paper_mean_dice` reads); a method whose
            :func:`method_key` matches a point's is drawn as a hollow marker at the point's
            parameter count, labelled "paper". Paper methods without a point are not drawn.

    Returns:
        The plotted points, sorted by ``params``: columns ``method``, ``params``, ``dice``,
        ``paper_dice`` (nan where the paper has no such method or none was given).

    Raises:
        ValueError: no points, a point without ``method``/``params``/``dice``, a non-positive
            parameter count, or a method given twice.
    """
    table = _points_table(points)
    paper_dice = paper_mean_dice(paper) if paper is not None else {}
    table["paper_dice"] = [paper_dice.get(method_key(m), math.nan) for m in table["method"]]

    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)
    finite = [v for v in (*table["dice"], *table["paper_dice"]) if math.isfinite(v)]
    low = min(finite, default=0.0)
    floor = max(0.0, low - 8)
    colors = matplotlib.colormaps["tab10"].colors
    for i, row in enumerate(table.itertuples(index=False)):
        color = colors[i % len(colors)]
        ours = row.dice if math.isfinite(row.dice) else floor
        if math.isfinite(row.dice):
            ax.scatter([row.params], [ours], s=70, color=color, edgecolor="black", lw=0.6, zorder=3)
        else:  # no Dice (e.g. nothing evaluated): a cross on the floor of the axis
            ax.scatter([row.params], [ours], s=70, color=color, marker="x", zorder=3)
        label = row.method if math.isfinite(row.dice) else f"{row.method} (n/a)"
        ax.annotate(
            label, (row.params, ours), xytext=(7, 5), textcoords="offset points", fontsize=8
        )
        if math.isfinite(row.paper_dice):
            ax.scatter(
                [row.params],
                [row.paper_dice],
                s=70,
                facecolor="none",
                edgecolor=color,
                linewidth=1.5,
                zorder=3,
            )
            ax.plot([row.params, row.params], [ours, row.paper_dice], color=color, lw=0.8, ls=":")
    handles = [
        ax.scatter([], [], s=50, color="grey", edgecolor="black", linewidth=0.6, label="this run")
    ]
    if table["paper_dice"].notna().any():
        handles.append(
            ax.scatter(
                [],
                [],
                s=50,
                facecolor="none",
                edgecolor="grey",
                linewidth=1.5,
                label="paper (Deng et al. 2022)",
            )
        )
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_xscale("log")
    lo, hi = float(table["params"].min()), float(table["params"].max())
    ax.set_xlim(lo / 1.8, hi * 2.6)  # room for the labels on the right
    ax.xaxis.set_major_formatter(FuncFormatter(_format_count))
    high = max(finite, default=100.0)
    ax.set_ylim(floor - 2, min(100.0, high + 5) if high <= 100 else high + 5)
    ax.set_xlabel("parameters of the deployed system (all tissues, log scale)")
    ax.set_ylabel("mean Dice over tissues (%)")
    ax.set_title("Model size vs. segmentation accuracy")
    ax.grid(alpha=0.3, which="both")
    _save(fig, out_png, "png")
    _save(fig, out_svg, "svg")
    return table


def _points_table(points: Sequence[Mapping]) -> pd.DataFrame:
    if not points:
        raise ValueError("params_vs_dice needs at least one point")
    rows = []
    for i, p in enumerate(points):
        missing = [k for k in ("method", "params", "dice") if k not in p]
        if missing:
            raise ValueError(f"point {i} lacks {', '.join(missing)}: {dict(p)!r}")
        params, dice = float(p["params"]), float(p["dice"])
        if not (math.isfinite(params) and params > 0):
            raise ValueError(f"point {i} ({p['method']}): params must be > 0, got {p['params']!r}")
        rows.append({"method": str(p["method"]), "params": params, "dice": dice})
    table = pd.DataFrame(rows)
    dup = sorted(set(table["method"][table["method"].duplicated()]))
    if dup:
        raise ValueError(f"method(s) given twice: {', '.join(dup)}")
    return table.sort_values("params", kind="stable").reset_index(drop=True)


def _format_count(x: float, _pos: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


# -- Figure 3 -----------------------------------------------------------------------------------
def qualitative(
    tissue: Tissue,
    per_patch: Mapping[str, pd.DataFrame | str | Path],
    predictions: Mapping[str, str | Path],
    patch_set: str | Path,
    out_png: str | Path,
    reference: str = "omniseg",
    split: str = "test",
) -> pd.DataFrame:
    """The paper's Figure 3 for one tissue: best, median and worst patch by the reference's Dice.

    Rows: those patches (fewer if the split has fewer). Columns: the image, the ground truth
    (in the tissue's colour), then one column per method (in ``per_patch`` order): its
    prediction over the image, true positives, false positives and false negatives in the
    :data:`OVERLAY_COLORS`, titled with the method and its Dice on that patch.

    Args:
        tissue: the tissue drawn.
        per_patch: method -> its ``per_patch.csv`` (DataFrame or path) from
            :func:`omniseg.evaluate.evaluate`; rows of other tissues are ignored. Column
            ``index`` is the patch's position within the tissue's ``split`` patches.
        predictions: method -> its ``predictions.h5``: dataset ``/{tissue.key}`` uint8
            ``(N, P, P)``, in the order of that tissue's rows of the method's ``per_patch``.
        patch_set: the tissue's HDF5 patch set (images and ground truth).
        out_png: the figure.
        reference: the method whose Dice ranks the patches (must be in ``per_patch``).
        split: the split the tables and predictions are of.

    Returns:
        The chosen patches: columns ``rank`` (best/median/worst), ``index``, and ``dice_{method}``
        per method.

    Raises:
        ValueError: the reference is missing or has no rows of the tissue, a method lacks
            predictions or rows, the patch set is of another tissue, or shapes disagree (the
            message names the file).
    """
    if reference not in per_patch:
        raise ValueError(
            f"reference method {reference!r} not among the methods: {', '.join(per_patch)}"
        )
    missing = [m for m in per_patch if m not in predictions]
    if missing:
        raise ValueError(f"no predictions file for method(s) {', '.join(missing)}")
    tables = {m: _tissue_rows(t, tissue.key, m) for m, t in per_patch.items()}
    chosen = _choose(tables[reference], reference, tissue.key, split)

    data = read_patch_set(patch_set, split)
    key = data["attrs"].get("tissue_key")
    if key != tissue.key:
        raise ValueError(f"patch set {patch_set} is of tissue {key!r}, not {tissue.key!r}")
    images, masks = data["images"], data["masks"].astype(bool)
    n = len(images)
    for _, i in chosen:
        if not 0 <= i < n:
            raise ValueError(f"patch index {i} out of range: {patch_set} has {n} {split} patches")

    preds: dict[str, list[np.ndarray]] = {}
    dices: dict[str, list[float]] = {}
    for method, rows in tables.items():
        pos = {int(idx): p for p, idx in enumerate(rows["index"])}
        absent = [i for _, i in chosen if i not in pos]
        if absent:
            raise ValueError(f"{method}: per-patch table has no row for patch(es) {absent}")
        path = predictions[method]
        with h5py.File(path, "r") as h5:
            if tissue.key not in h5:
                raise ValueError(f"predictions {path} have no dataset /{tissue.key}")
            ds = h5[tissue.key]
            if ds.shape[0] != len(rows) or ds.shape[1:] != masks.shape[1:]:
                raise ValueError(
                    f"predictions {path}: /{tissue.key} is {ds.shape}, expected "
                    f"({len(rows)}, {masks.shape[1]}, {masks.shape[2]}) for {method}'s "
                    f"{len(rows)} rows and the patch set's patches"
                )
            preds[method] = [ds[pos[i]].astype(bool) for _, i in chosen]
        dices[method] = [float(rows["dice"].iloc[pos[i]]) for _, i in chosen]

    _draw_qualitative(tissue, chosen, images, masks, preds, dices, reference, split, out_png)
    out = pd.DataFrame({"rank": [r for r, _ in chosen], "index": [i for _, i in chosen]})
    for method, values in dices.items():
        out[f"dice_{method}"] = values
    return out


def _tissue_rows(table: pd.DataFrame | str | Path, key: str, method: str) -> pd.DataFrame:
    if isinstance(table, str | Path):
        table = pd.read_csv(table)
    missing = [c for c in ("tissue", "index", "dice") if c not in table.columns]
    if missing:
        raise ValueError(f"per-patch table of {method!r} lacks column(s) {', '.join(missing)}")
    return table[table["tissue"].astype(str) == key].reset_index(drop=True)


def _choose(rows: pd.DataFrame, method: str, key: str, split: str) -> list[tuple[str, int]]:
    """``[(rank, index)]``: best, median and worst by Dice (ties: lower index first)."""
    if rows.empty:
        raise ValueError(f"{method}: no {split} rows of tissue {key!r} to choose patches from")
    ordered = rows.assign(_d=rows["dice"].astype(float).fillna(-1.0)).sort_values(
        ["_d", "index"], ascending=[False, True], kind="stable"
    )
    indices = [int(i) for i in ordered["index"]]
    picks = {"best": 0, "median": (len(indices) - 1) // 2, "worst": len(indices) - 1}
    out, seen = [], set()
    for rank in RANKS:
        pos = picks[rank]
        if pos not in seen:
            seen.add(pos)
            out.append((rank, indices[pos]))
    return out


def _blend(image: np.ndarray, layers: Sequence[tuple[np.ndarray, Sequence[float]]]) -> np.ndarray:
    """``image`` uint8 ``(P, P, 3)`` in grey, each bool ``(P, P)`` layer tinted in its colour.

    The grey base keeps the overlay colours unambiguous whatever the stain's colours are.
    """
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    out = np.repeat(grey[..., None], 3, axis=2)
    for mask, color in layers:
        out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * np.asarray(color)
    return out


def _draw_qualitative(
    tissue: Tissue,
    chosen: Sequence[tuple[str, int]],
    images: np.ndarray,
    masks: np.ndarray,
    preds: Mapping[str, Sequence[np.ndarray]],
    dices: Mapping[str, Sequence[float]],
    reference: str,
    split: str,
    out_png: str | Path,
) -> None:
    n_rows, n_cols = len(chosen), 2 + len(preds)
    fig = Figure(figsize=(2.1 * n_cols, 2.25 * n_rows + 0.9))
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    gt_color = tuple(c / 255 for c in tissue.rgb)
    colors = list(OVERLAY_COLORS.values())
    for r, (rank, index) in enumerate(chosen):
        image, gt = images[index], masks[index]
        panels = [
            (image.astype(np.float32) / 255.0, f"{rank}: patch {index}"),
            (_blend(image, [(gt, gt_color)]), "ground truth"),
        ]
        for method, pred in preds.items():
            p = pred[r]
            layers = [(p & gt, colors[0]), (p & ~gt, colors[1]), (~p & gt, colors[2])]
            dice = dices[method][r]
            text = "n/a" if not math.isfinite(dice) else f"{dice:.1f}%"
            panels.append((_blend(image, layers), f"{method}\nDice {text}"))
        for ax, (pixels, title) in zip(axes[r], panels, strict=True):
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=c, label=name) for name, c in OVERLAY_COLORS.items()]
    handles.append(Patch(color=gt_color, label=f"ground truth ({tissue.key})"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(
        f"{tissue.name} ({tissue.key}): best, median and worst {split} patch by {reference} Dice",
        fontsize=10,
    )
    fig.subplots_adjust(
        left=0.02,
        right=0.98,
        top=1 - 0.8 / fig.get_figheight(),
        bottom=0.4 / fig.get_figheight(),
        wspace=0.05,
        hspace=0.35,
    )
    _save(fig, out_png, "png")


def _save(fig: Figure, path: str | Path, fmt: str) -> Path:
    path = Path(path)
    with matplotlib.rc_context({"svg.fonttype": "none"}), atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return path
