"""Segmentation metrics of the paper: foreground Dice (%), Hausdorff and mean surface distance (um).

All functions take binary masks as numpy arrays indexed ``(row, col)``; any non-zero value is
foreground. Distances are Euclidean, in micrometres, with an isotropic pixel size ``spacing_um``
(the tissue's um/px at the scale it is segmented at).

Definitions (as in Deng et al. 2022 and medpy's ``dc``, ``hd`` and ``assd``):

- Dice = 2 |P & G| / (|P| + |G|) x 100, of the foreground only.
- Surface of a mask = its pixels that are not in its binary erosion by the 4-connected cross
  (``scipy.ndimage.generate_binary_structure(2, 1)``); pixels outside the image count as
  background, so an object touching the image edge has a surface along that edge.
- Directed surface distances P -> G: for every surface pixel of P, the distance to the nearest
  surface pixel of G. Hausdorff distance (HD) = the maximum over both directions; mean surface
  distance (MSD) = average symmetric surface distance = the mean of the two directions' distances
  pooled together (medpy 0.5 ``assd``).

Empty-mask rule (the one rule every table follows):

- both masks empty: Dice 100, HD and MSD undefined (``nan``), ``empty = "both"``;
- exactly one empty: Dice 0, HD and MSD undefined (``nan``), ``empty = "pred"`` or ``"gt"``
  (the one that is empty);
- otherwise ``empty = "none"`` and all three are defined.

Undefined distances are left out of means, and the tables count how many were left out.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

#: The surface connectivity: 4-connected cross, as medpy's default ``connectivity=1``.
_CROSS = ndimage.generate_binary_structure(2, 1)

EMPTY_KINDS = ("none", "both", "pred", "gt")


def _as_mask(arr: np.ndarray, name: str, ndim: int = 2) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != ndim:
        raise ValueError(f"{name} mask has shape {arr.shape}, expected {ndim} dimensions")
    return arr if arr.dtype == bool else arr != 0


def _check_pair(pred: np.ndarray, gt: np.ndarray, ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_mask(pred, "pred", ndim), _as_mask(gt, "gt", ndim)
    if pred.shape != gt.shape:
        raise ValueError(f"pred mask is {pred.shape}, gt mask is {gt.shape}")
    return pred, gt


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice in percent from pixel counts: ``200 tp / (2 tp + fp + fn)``; 100 when all are 0
    (the structure absent from both maps), as :func:`dice`."""
    total = 2 * tp + fp + fn
    return 100.0 if total == 0 else 200.0 * tp / total


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground Dice in percent.

    Args:
        pred: predicted mask ``(H, W)``, bool or 0/1.
        gt: reference mask ``(H, W)``.

    Returns:
        ``200 |P & G| / (|P| + |G|)``; 100 when both are empty, 0 when exactly one is.
    """
    pred, gt = _check_pair(pred, gt)
    return float(dice_batch(pred[None], gt[None])[0])


def dice_batch(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Foreground Dice in percent of each item of a batch (same rule as :func:`dice`).

    Args:
        pred: predicted masks ``(N, H, W)`` (any trailing dimensions), bool or 0/1.
        gt: reference masks, same shape.

    Returns:
        float64 ``(N,)``: Dice % per item; 100 where both masks are empty.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"pred masks are {pred.shape}, gt masks are {gt.shape}; expected (N, ...)")
    pred = pred.reshape(pred.shape[0], -1)
    gt = gt.reshape(gt.shape[0], -1)
    pred = pred if pred.dtype == bool else pred != 0
    gt = gt if gt.dtype == bool else gt != 0
    inter = np.count_nonzero(pred & gt, axis=1).astype(np.float64)
    total = (np.count_nonzero(pred, axis=1) + np.count_nonzero(gt, axis=1)).astype(np.float64)
    out = np.full(pred.shape[0], 100.0)
    np.divide(200.0 * inter, total, out=out, where=total > 0)
    return out


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface (1-pixel border) of a mask: pixels of ``mask`` not in its 4-connected erosion.

    Args:
        mask: ``(H, W)`` bool or 0/1.

    Returns:
        bool ``(H, W)``.
    """
    mask = _as_mask(mask, "mask")
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty masks, in micrometres.

    Args:
        pred: predicted mask ``(H, W)``, non-empty.
        gt: reference mask ``(H, W)``, non-empty.
        spacing_um: pixel size (um/px), isotropic.

    Returns:
        ``(pred_to_gt, gt_to_pred)``: float64 1-D arrays; ``pred_to_gt[i]`` is the distance from
        the i-th surface pixel of ``pred`` (row-major order) to the nearest surface pixel of
        ``gt``, and vice versa.

    Raises:
        ValueError: if a mask is empty (distances are undefined), shapes differ or spacing <= 0.
    """
    pred, gt = _check_pair(pred, gt)
    if not (math.isfinite(spacing_um) and spacing_um > 0):
        raise ValueError(f"spacing_um must be a positive number, got {spacing_um}")
    for name, m in (("pred", pred), ("gt", gt)):
        if not m.any():
            raise ValueError(f"{name} mask is empty: surface distances are undefined")
    # Work on the union bounding box plus a 1-pixel margin: every surface pixel lies inside it,
    # the margin keeps the erosion (hence the surfaces) identical to the full image's, and the
    # distance transform is exact because all its feature pixels are inside the box.
    rows = np.flatnonzero((pred | gt).any(axis=1))
    cols = np.flatnonzero((pred | gt).any(axis=0))
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, pred.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, pred.shape[1])
    sp, sg = surface(pred[r0:r1, c0:c1]), surface(gt[r0:r1, c0:c1])
    to_gt = ndimage.distance_transform_edt(~sg, sampling=(spacing_um, spacing_um))
    to_pred = ndimage.distance_transform_edt(~sp, sampling=(spacing_um, spacing_um))
    return to_gt[sp].astype(np.float64), to_pred[sg].astype(np.float64)


def score(pred: np.ndarray, gt: np.ndarray, spacing_um: float) -> dict:
    """Dice, Hausdorff and mean surface distance of one predicted mask, with the empty rule.

    Args:
        pred: predicted mask ``(H, W)``, bool or 0/1.
        gt: reference mask ``(H, W)``.
        spacing_um: pixel size (um/px) of both masks.

    Returns:
        ``{"dice": %, "hd": um, "msd": um, "empty": kind}``. Both empty -> dice 100, hd/msd nan,
        ``"both"``; exactly one empty -> dice 0, hd/msd nan, ``"pred"`` or ``"gt"`` (the empty
        one); otherwise ``"none"`` and every value defined.
    """
    pred, gt = _check_pair(pred, gt)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not (has_pred and has_gt):
        if has_pred == has_gt:
            return {"dice": 100.0, "hd": math.nan, "msd": math.nan, "empty": "both"}
        return {"dice": 0.0, "hd": math.nan, "msd": math.nan, "empty": "gt" if has_pred else "pred"}
    d_pg, d_gp = surface_distances(pred, gt, spacing_um)
    hd = max(float(d_pg.max()), float(d_gp.max()))
    msd = float((d_pg.sum() + d_gp.sum()) / (d_pg.size + d_gp.size))
    return {"dice": dice(pred, gt), "hd": hd, "msd": msd, "empty": "none"}


def empty_mask_stats(dice_pct, gt_empty, pred_empty) -> dict:
    """What a mean Dice hides: Dice over non-empty references, false positives on empty ones.

    A test set with many empty reference masks (a patch or slide without the tissue) gets Dice
    100 for every one the model leaves empty, which lifts the mean; these numbers separate the
    two cases. Works on any items (patches, slides): one value per item.

    Args:
        dice_pct: ``(N,)`` Dice (%) per item, by the empty-mask rule.
        gt_empty: ``(N,)`` bool, the reference mask is empty.
        pred_empty: ``(N,)`` bool, the predicted mask is empty.

    Returns:
        ``dice_nonempty_pct`` (mean Dice over items whose reference is non-empty; nan if none),
        ``n_nonempty``, ``n_empty_mask`` (items whose reference is empty) and ``n_fp_empty``
        (of those, how many have a non-empty prediction: false-positive items).

    Raises:
        ValueError: the three inputs differ in length.
    """
    d = np.asarray(dice_pct, dtype=np.float64).reshape(-1)
    g = np.asarray(gt_empty, dtype=bool).reshape(-1)
    p = np.asarray(pred_empty, dtype=bool).reshape(-1)
    if not d.size == g.size == p.size:
        raise ValueError(
            f"dice_pct, gt_empty and pred_empty have {d.size}, {g.size} and {p.size} items"
        )
    nonempty = d[~g]
    return {
        "dice_nonempty_pct": float(nonempty.mean()) if nonempty.size else math.nan,
        "n_nonempty": int((~g).sum()),
        "n_empty_mask": int(g.sum()),
        "n_fp_empty": int((g & ~p).sum()),
    }


def empty_flags(empty) -> tuple[np.ndarray, np.ndarray]:
    """``(gt_empty, pred_empty)`` bool arrays from :func:`score`'s ``empty`` kinds.

    Raises:
        ValueError: a kind that is not one of :data:`EMPTY_KINDS`.
    """
    kinds = np.asarray(empty, dtype=object).reshape(-1)
    bad = sorted({str(k) for k in kinds} - set(EMPTY_KINDS))
    if bad:
        raise ValueError(f"unknown empty kind(s) {', '.join(bad)}; known: {', '.join(EMPTY_KINDS)}")
    gt_empty = np.isin(kinds, ["both", "gt"])
    pred_empty = np.isin(kinds, ["both", "pred"])
    return gt_empty, pred_empty
