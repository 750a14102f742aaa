"""Figures of the pipeline, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from omniseg.io import atomic_path
from omniseg.tissues import TissueTable

_DICE_PREFIX = "val_dice_"


def read_log(log_csv: str | Path) -> dict[str, list[float]]:
    """Columns of a training log CSV as float lists (empty cells -> nan).

    Raises:
        ValueError: naming the file if it has no ``epoch`` or ``loss`` column.
    """
    with Path(log_csv).open(newline="") as fh:
        reader = csv.DictReader(fh)
        names = list(reader.fieldnames or [])
        missing = [c for c in ("epoch", "loss") if c not in names]
        if missing:
            raise ValueError(f"training log {log_csv} lacks column(s) {', '.join(missing)}")
        columns: dict[str, list[float]] = {n: [] for n in names}
        for row in reader:
            for n in names:
                columns[n].append(_float(row[n]))
    return columns


def _validated(epochs: list, values: list) -> tuple[list, list]:
    """The epochs that were validated and their values (``training.val_every`` leaves NaN
    between them, which would break a line into isolated points)."""
    keep = [i for i, v in enumerate(values) if not math.isnan(v)]
    return [epochs[i] for i in keep], [values[i] for i in keep]


def training_curve(
    log_csv: str | Path, out_png: str | Path, tissues: TissueTable | None = None
) -> Path:
    """Plot training loss and validation Dice against epoch from a training log.

    Args:
        log_csv: CSV with columns ``epoch``, ``loss``, optional ``val_dice_{key}`` per tissue
            and ``val_dice_mean`` (as written by :func:`omniseg.train.train`).
        out_png: the PNG to write (atomically).
        tissues: optional registry, for the tissues' colours and names.

    Returns:
        ``out_png`` as a Path.
    """
    cols = read_log(log_csv)
    epochs = cols["epoch"]
    fig = Figure(figsize=(9, 3.6))
    ax_loss, ax_dice = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)

    ax_loss.plot(epochs, cols["loss"], marker="o", ms=3, color="black")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (Dice + BCE)")
    ax_loss.set_title("Training loss")
    ax_loss.grid(alpha=0.3)

    per_tissue = [n for n in cols if n.startswith(_DICE_PREFIX) and n != f"{_DICE_PREFIX}mean"]
    for name in per_tissue:
        key = name[len(_DICE_PREFIX) :]
        color, label = None, key
        if tissues is not None and key in tissues:
            color, label = tissues[key].color, tissues[key].name
        ax_dice.plot(*_validated(epochs, cols[name]), lw=1, marker=".", color=color, label=label)
    mean = cols.get(f"{_DICE_PREFIX}mean")
    title = "Validation Dice"
    if mean is not None and any(not math.isnan(v) for v in mean):
        ax_dice.plot(*_validated(epochs, mean), lw=2.5, color="black", label="mean")
        best = max(range(len(mean)), key=lambda i: -math.inf if math.isnan(mean[i]) else mean[i])
        ax_dice.axvline(epochs[best], color="grey", ls="--", lw=1)
        title += f" (best {mean[best]:.1f} at epoch {int(epochs[best])})"
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice (%)")
    ax_dice.set_title(title)
    ax_dice.set_ylim(0, 100)
    ax_dice.grid(alpha=0.3)
    if per_tissue or mean is not None:
        ax_dice.legend(fontsize=7, loc="lower right")

    for ax in (ax_loss, ax_dice):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return out_png


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan
