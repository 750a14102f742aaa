"""Complete-label aggregation of per-tissue probability maps into one label map, and its score.

The paper's test-stage rule, as data (``rules``, a config value):

* ``nested``: ``[inner, outer]`` pairs; where both tissues claim a pixel the inner one keeps it
  (the glomerular tuft lies inside its capsule: ``[["tuft", "cap"]]``);
* ``conflict``: what a pixel claimed by several tissues after that becomes: ``"background"``
  (label 0, the paper's rule) or ``"max"`` (the claiming tissue with the highest probability
  keeps it; a head that fires on tissue where its structure is absent then loses the pixel to
  a more confident one instead of erasing it). Where the inner tissue of a nested pair kept a
  pixel its outer tissue also claimed, its label stands for both claims and competes at the
  higher of the two probabilities: a glomerulus whose capsule head is sure keeps its pixels
  against an artery head that is surer than its tuft head only.

The same rule applied to the full ground truth (:func:`aggregate_masks`) gives the reference map
against which the aggregated prediction is scored (:func:`score_aggregation`); a truth has no
probabilities to rank, so its conflicts are background under either policy.

:func:`aggregate` works chunk by chunk in the slide's level-0 grid (``(row, col)``): each
tissue's probability map (uint8 at its own scale, from :func:`omniseg.inference.predict_scale`)
is upsampled **bilinearly** (default; ``upsample="nearest"`` is also available) to the chunk,
thresholded (``p > threshold``) and the rule applied. Output: ``labels.h5`` with the dataset
``labels`` (uint8 ``(H0, W0)``, chunked, gzip; 0 = background, tissue id + 1) whose attributes
are ``mpp``, ``label_table`` (JSON ``{"0": "background", "1": key, ...}``), ``tissues`` (JSON
records), ``tissue_area_px`` (when known), ``threshold``, ``upsample``, ``rules`` (JSON).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from omniseg.io import atomic_path
from omniseg.metrics import dice_from_counts
from omniseg.progress import progress as progress_bar
from omniseg.tissues import TissueTable

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RULES",
    "LABELS_DATASET",
    "PAPER_RULES",
    "aggregate",
    "aggregate_masks",
    "check_rules",
    "nested_labels",
    "score_aggregation",
    "upsample_window",
]

#: The default rule: tuft wins over capsule; a pixel claimed by several others goes to the most
#: confident of them (the paper makes it background: ``PAPER_RULES``, ``config/paper.yaml``).
DEFAULT_RULES: dict = {"nested": [["tuft", "cap"]], "conflict": "max"}
PAPER_RULES: dict = {"nested": [["tuft", "cap"]], "conflict": "background"}
CONFLICTS = ("background", "max")
UPSAMPLING = ("bilinear", "nearest")
LABELS_DATASET = "labels"


def check_rules(rules: Mapping, tissues: TissueTable) -> list[tuple[int, int]]:
    """Validate ``rules`` against the table; return the nested pairs as ``(inner id, outer id)``.

    Raises:
        ValueError: unknown keys in the rules, a pair that is not two distinct tissues, or an
            unknown conflict policy.
    """
    if not isinstance(rules, Mapping):
        raise ValueError(f"aggregation rules must be a mapping, got {type(rules).__name__}")
    extra = sorted(set(rules) - {"nested", "conflict"})
    if extra:
        raise ValueError(f"aggregation rules: unknown entr(ies) {extra}; known: nested, conflict")
    conflict = rules.get("conflict", DEFAULT_RULES["conflict"])
    if conflict not in CONFLICTS:
        raise ValueError(
            f"aggregation rules: conflict must be one of {', '.join(CONFLICTS)}, got {conflict!r}"
        )
    pairs = []
    for pair in rules.get("nested", []) or []:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"aggregation rules: nested entry {pair!r} must be [inner, outer]")
        unknown = [k for k in pair if k not in tissues]
        if unknown:
            raise ValueError(
                f"aggregation rules: nested pair {list(pair)} names tissue(s) {unknown} that are "
                f"not in the tissue table ({', '.join(tissues.keys)})"
            )
        pairs.append((tissues[pair[0]].id, tissues[pair[1]].id))
    return pairs


def aggregate_masks(
    masks: Mapping[str, np.ndarray],
    tissues: TissueTable,
    rules: Mapping = DEFAULT_RULES,
    scores: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Combine per-tissue binary masks into one label map (pure, in memory).

    Args:
        masks: ``{key: bool (H, W)}``; keys must be tissues of the table; a missing key claims
            nothing.
        tissues: the registry (label of a tissue = id + 1).
        rules: see the module docstring. Nested pairs are evaluated on the *original* masks, so
            the result does not depend on their order.
        scores: ``{key: float (H, W)}`` probabilities of the masks' tissues, which rank the
            claims under ``conflict: max`` (ties go to the lower id; a nested pair's inner
            tissue at the higher of its and its outer tissue's score where both claim). Without
            them (binary truth masks) a conflict is background under either policy.

    Returns:
        uint8 ``(H, W)``: 0 where no tissue claims the pixel (or several, after the nested
        rule, unless ``conflict: max`` with ``scores`` picks one), else the claiming tissue's
        label.
    """
    pairs = check_rules(rules, tissues)
    unknown = [k for k in masks if k not in tissues]
    if unknown:
        raise ValueError(f"masks for unknown tissue(s) {unknown}; known: {', '.join(tissues.keys)}")
    shapes = {np.shape(m) for m in masks.values()}
    if len(shapes) > 1:
        raise ValueError(f"masks have different shapes: {sorted(shapes)}")
    if not masks:
        raise ValueError("aggregate_masks needs at least one mask")
    shape = next(iter(shapes))
    claims = np.zeros((len(tissues), *shape), bool)
    for key, m in masks.items():
        claims[tissues[key].id] = np.asarray(m, dtype=bool)
    ranked = rules.get("conflict", DEFAULT_RULES["conflict"]) == "max" and scores is not None
    if ranked:
        rank = np.full(claims.shape, -1.0, np.float32)
        for key in masks:
            i = tissues[key].id
            rank[i] = np.where(claims[i], np.asarray(scores[key], np.float32), -1.0)
    if pairs:
        drop = np.zeros_like(claims)
        # the outer tissues' own scores, before any pair raises them
        own = {outer: rank[outer].copy() for _, outer in pairs} if ranked else {}
        for inner, outer in pairs:
            both = claims[inner] & claims[outer]
            drop[outer] |= both
            if ranked:
                # the inner label stands for both claims: it competes with other tissues at
                # the surer of the two (from the original scores, so order-independent)
                rank[inner] = np.where(both, np.maximum(rank[inner], own[outer]), rank[inner])
        claims &= ~drop
        if ranked:
            rank[drop] = -1.0
    count = claims.sum(axis=0, dtype=np.uint8)
    if ranked:
        best = rank.argmax(axis=0).astype(np.uint8)
        return np.where(count >= 1, best + 1, 0).astype(np.uint8)
    first = claims.argmax(axis=0).astype(np.uint8)
    return np.where(count == 1, first + 1, 0).astype(np.uint8)


def upsample_window(
    prob: h5py.Dataset | np.ndarray,
    factor: float,
    rows: tuple[int, int],
    cols: tuple[int, int],
    mode: str = "bilinear",
    skip_below: float | None = None,
) -> np.ndarray | None:
    """Probabilities (0..1, float32) of the level-0 window ``rows x cols`` from a map at a scale.

    Scale pixel ``k`` covers level-0 ``[k f, (k + 1) f)``; its centre is at level-0 coordinate
    ``(k + 0.5) f``. Bilinear: level-0 pixel ``r`` samples the scale grid at
    ``(r + 0.5) / f - 0.5`` (clamped at the edges); nearest: scale pixel ``floor((r + 0.5) / f)``.
    ``prob`` holds uint8 ``round(255 p)`` (or floats in 0..1); it is read once, only the
    window needed.

    Args:
        skip_below: if given and no source pixel exceeds it, return None without interpolating.

    Returns:
        float32 ``(r1 - r0, c1 - c0)``, or None (see ``skip_below``).
    """
    if mode not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {mode!r}")
    hs, ws = prob.shape
    scale = np.float32(1.0 / 255.0 if prob.dtype == np.uint8 else 1.0)
    r = np.arange(rows[0], rows[1], dtype=np.float64)
    c = np.arange(cols[0], cols[1], dtype=np.float64)
    if mode == "nearest":
        r0 = r1 = np.minimum(((r + 0.5) / factor).astype(np.int64), hs - 1)
        c0 = c1 = np.minimum(((c + 0.5) / factor).astype(np.int64), ws - 1)
    else:
        ur = np.clip((r + 0.5) / factor - 0.5, 0, hs - 1)
        uc = np.clip((c + 0.5) / factor - 0.5, 0, ws - 1)
        r0, c0 = np.floor(ur).astype(np.int64), np.floor(uc).astype(np.int64)
        r1, c1 = np.minimum(r0 + 1, hs - 1), np.minimum(c0 + 1, ws - 1)
    lo_r, hi_r, lo_c, hi_c = int(r0[0]), int(r1[-1]) + 1, int(c0[0]), int(c1[-1]) + 1
    win = np.asarray(prob[lo_r:hi_r, lo_c:hi_c])
    if skip_below is not None and (win.size == 0 or win.max() * scale <= skip_below):
        return None
    win = win.astype(np.float32) * scale
    if mode == "nearest":
        return win[(r0 - lo_r)[:, None], (c0 - lo_c)[None, :]]
    tr = (ur - r0).astype(np.float32)[:, None]
    tc = (uc - c0).astype(np.float32)[None, :]
    a = win[r0 - lo_r] * (1 - tr) + win[r1 - lo_r] * tr  # (rows, window cols)
    return a[:, c0 - lo_c] * (1 - tc) + a[:, c1 - lo_c] * tc


def _open_prob_maps(prob_h5s, tissues, level0_shape, stack: contextlib.ExitStack) -> dict:
    """``{key: (dataset, factor)}`` for every tissue of the table (files closed by ``stack``)."""
    found: dict[str, tuple] = {}
    for path in map(Path, prob_h5s):
        try:
            fh = stack.enter_context(h5py.File(path, "r", rdcc_nbytes=16 * 2**20))
        except OSError as exc:
            raise ValueError(f"probability map {path} is not a readable HDF5 file: {exc}") from exc
        if "prob" not in fh or "factor" not in fh.attrs:
            raise ValueError(
                f"probability map {path} lacks the 'prob' group or the 'factor' attribute "
                "(not written by predict_scale?)"
            )
        shape0 = tuple(int(v) for v in fh.attrs.get("level0_shape", ()))
        if shape0 != tuple(level0_shape):
            raise ValueError(
                f"probability map {path} was predicted for a {shape0} slide, expected "
                f"{tuple(level0_shape)} (rows, cols)"
            )
        factor = float(fh.attrs["factor"])
        for key in fh["prob"]:
            if key in found:
                raise ValueError(
                    f"tissue {key!r} has probabilities in two files, the second {path}"
                )
            found[key] = (fh["prob"][key], factor)
    missing = [k for k in tissues.keys if k not in found]
    if missing:
        raise ValueError(
            f"no probability map for tissue(s) {missing} in {', '.join(map(str, prob_h5s))}"
        )
    return found


def aggregate(
    prob_h5s: Sequence[str | Path],
    tissues: TissueTable,
    out_labels_h5: str | Path,
    *,
    level0_shape: tuple[int, int],
    mpp: float,
    rules: Mapping = DEFAULT_RULES,
    threshold: float = 0.5,
    chunk: int = 1024,
    tissue_area_px: int | None = None,
    upsample: str = "bilinear",
    tissue_mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    mask_margin_um: float | None = None,
    progress: bool = True,
) -> Path:
    """Aggregate the probability maps of every scale into ``labels.h5`` (see the module doc).

    Args:
        prob_h5s: files of :func:`omniseg.inference.predict_scale`, together holding every
            tissue of ``tissues``.
        tissues: the registry.
        out_labels_h5: output file, written atomically.
        level0_shape: the slide's level-0 ``(rows, cols)``.
        mpp: level-0 um/px.
        rules: the aggregation rule (config).
        threshold: a tissue claims a pixel where its (upsampled) probability is > threshold.
        chunk: edge of the level-0 chunks processed (and stored) at a time.
        tissue_area_px: level-0 pixels inside the tissue mask (stored for per-tissue fractions).
        upsample: ``"bilinear"`` (on probabilities, then threshold) or ``"nearest"``.
        tissue_mask: optional low-resolution bool tissue mask; level-0 pixels outside it are
            background (tiles at the tissue border also cover glass, which no model was
            trained on).
        mask_downsample: level-0 pixels per ``tissue_mask`` pixel (required with it).
        mask_margin_um: how far ``tissue_mask`` was grown beyond the tissue, recorded in the
            file (``labels`` attribute ``mask_margin_um``) so that scoring limits the raw heads
            to the same area (:func:`omniseg.steps.slides.score_slide`).
        progress: show a tqdm bar over the level-0 chunks.

    Returns:
        ``out_labels_h5``.

    Raises:
        ValueError: a missing or mismatched probability map, bad rules, threshold or chunk.
    """
    check_rules(rules, tissues)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if upsample not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
    if chunk < 16:
        raise ValueError(f"chunk must be >= 16, got {chunk}")
    h0, w0 = (int(v) for v in level0_shape)
    if tissue_mask is not None and not (mask_downsample and mask_downsample > 0):
        raise ValueError("a tissue_mask needs mask_downsample > 0")
    out = Path(out_labels_h5)
    with contextlib.ExitStack() as stack:
        found = _open_prob_maps(prob_h5s, tissues, (h0, w0), stack)
        tmp = stack.enter_context(atomic_path(out))
        fh = stack.enter_context(h5py.File(tmp, "w"))
        dset = fh.create_dataset(
            LABELS_DATASET,
            shape=(h0, w0),
            dtype=np.uint8,
            chunks=(min(chunk, h0), min(chunk, w0)),
            compression="gzip",
            compression_opts=1,
            fillvalue=0,
        )
        dset.attrs.update(
            mpp=float(mpp),
            label_table=json.dumps({str(k): v for k, v in tissues.label_table().items()}),
            tissues=tissues.to_json(),
            threshold=float(threshold),
            upsample=upsample,
            rules=json.dumps(dict(rules)),
        )
        if tissue_area_px is not None:
            dset.attrs["tissue_area_px"] = int(tissue_area_px)
        if mask_margin_um is not None:
            dset.attrs["mask_margin_um"] = float(mask_margin_um)
        n_chunks = -(-h0 // chunk) * -(-w0 // chunk)
        bar = stack.enter_context(
            progress_bar(total=n_chunks, desc="aggregate", unit="chunk", enabled=progress)
        )
        for r0 in range(0, h0, chunk):
            r1 = min(h0, r0 + chunk)
            for c0 in range(0, w0, chunk):
                c1 = min(w0, c0 + chunk)
                bar.update()
                masks, scores = {}, {}
                for key in tissues.keys:
                    prob, factor = found[key]
                    p = upsample_window(
                        prob, factor, (r0, r1), (c0, c1), upsample, skip_below=threshold
                    )
                    if p is not None:
                        masks[key], scores[key] = p > threshold, p
                if masks:
                    labels = aggregate_masks(masks, tissues, rules, scores)
                    if tissue_mask is not None:
                        labels[~mask_window(tissue_mask, mask_downsample, (r0, r1), (c0, c1))] = 0
                    if labels.any():
                        dset[r0:r1, c0:c1] = labels
    return out


def mask_window(
    mask: np.ndarray, downsample: float, rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour window of a low-resolution mask in pixels ``rows x cols`` of a grid
    ``downsample`` times finer than the mask (level 0, or any scale: mask pixels times the
    scale's pixels per mask pixel)."""
    r = np.minimum(((np.arange(*rows) + 0.5) / downsample).astype(np.int64), mask.shape[0] - 1)
    c = np.minimum(((np.arange(*cols) + 0.5) / downsample).astype(np.int64), mask.shape[1] - 1)
    return mask[np.ix_(r, c)]


def score_aggregation(
    labels_h5: str | Path,
    truth_h5: str | Path,
    tissues: TissueTable,
    out_csv: str | Path | None,
    rules: Mapping = DEFAULT_RULES,
    chunk: int = 2048,
    *,
    prob_h5s: Sequence[str | Path] = (),
    threshold: float = 0.5,
    tissue_mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
) -> pd.DataFrame:
    """Per-tissue Dice of an aggregated label map against the reference map of the ground truth,
    and of each raw head before aggregation.

    The reference is :func:`aggregate_masks` of the truth masks (``{key}`` datasets of a slide
    truth file, level-0 grid) with the same ``rules``. Counts accumulate chunk by chunk.

    With ``prob_h5s`` (the per-scale maps the label map was aggregated from), each tissue's own
    head is also scored *raw*: its probability upsampled to level 0 exactly as :func:`aggregate`
    does, ``> threshold``, limited to ``tissue_mask`` when given (as the label map is), against
    that tissue's own truth mask (the glomerular unit includes its tuft there).

    The outer tissue of a nested pair is scored as the map shows it: its own label and the
    labels nested in it (:func:`nested_labels`; the glomerular unit is its capsule label plus
    the tuft inside), against the same union of the reference, i.e. its own truth mask.

    Returns:
        One row per tissue: ``tissue, label, dice`` (%, foreground of the labels showing that
        tissue; 100 when both maps lack it), ``tp, fp, fn, pred_px, ref_px``, ``fp_mm2`` (area
        labelled this tissue where the reference is another label or background) and, with
        ``prob_h5s``, ``raw_dice, raw_tp, raw_fp, raw_fn, raw_fp_mm2``; also written to
        ``out_csv`` (None: not written, for a caller that adds columns first).

    Raises:
        ValueError: naming the file: unreadable, missing datasets, or shapes that differ.
    """
    labels_h5, truth_h5 = Path(labels_h5), Path(truth_h5)
    n = len(tissues) + 1
    confusion = np.zeros((n, n), np.int64)  # [pred label, ref label]
    raw = np.zeros((len(tissues), 3), np.int64)  # per tissue id: tp, pred px, ref px
    if tissue_mask is not None and not (mask_downsample and mask_downsample > 0):
        raise ValueError("a tissue_mask needs mask_downsample > 0")
    stack = contextlib.ExitStack()
    try:
        lf = h5py.File(labels_h5, "r")
    except OSError as exc:
        raise ValueError(f"label map {labels_h5} is not a readable HDF5 file: {exc}") from exc
    try:
        tf = h5py.File(truth_h5, "r")
    except OSError as exc:
        lf.close()
        raise ValueError(f"slide truth {truth_h5} is not a readable HDF5 file: {exc}") from exc
    with lf, tf, stack:
        if LABELS_DATASET not in lf:
            raise ValueError(f"label map {labels_h5} has no dataset {LABELS_DATASET!r}")
        labels = lf[LABELS_DATASET]
        found = _open_prob_maps(prob_h5s, tissues, labels.shape, stack) if prob_h5s else {}
        mm2 = float(labels.attrs.get("mpp", np.nan)) ** 2 / 1e6  # level-0 pixel area, mm^2
        missing = [k for k in tissues.keys if k not in tf]
        if missing:
            raise ValueError(f"slide truth {truth_h5} lacks mask(s) for {missing}")
        bad = [k for k in tissues.keys if tf[k].shape != labels.shape]
        if bad:
            raise ValueError(
                f"slide truth {truth_h5}: mask(s) {bad} are {tf[bad[0]].shape}, the label map "
                f"{labels_h5} is {labels.shape}"
            )
        h0, w0 = labels.shape
        for r0 in range(0, h0, chunk):
            for c0 in range(0, w0, chunk):
                sl = (slice(r0, min(h0, r0 + chunk)), slice(c0, min(w0, c0 + chunk)))
                pred = labels[sl]
                truth = {k: tf[k][sl] > 0 for k in tissues.keys}
                ref = aggregate_masks(truth, tissues, rules)
                if pred.max(initial=0) >= n:
                    raise ValueError(f"label map {labels_h5} holds labels >= {n}")
                confusion += np.bincount(
                    pred.ravel().astype(np.int64) * n + ref.ravel(), minlength=n * n
                ).reshape(n, n)
                if found:
                    raw += _raw_counts(found, tissues, sl, truth, threshold, tissue_mask,
                                       mask_downsample)  # fmt: skip
    df = _score_rows(confusion, raw if found else None, tissues, mm2, check_rules(rules, tissues))
    if out_csv is not None:
        with atomic_path(out_csv) as tmp:
            df.to_csv(tmp, index=False, float_format="%.4f")
    return df


def _raw_counts(found, tissues, sl, truth, threshold, tissue_mask, mask_downsample) -> np.ndarray:
    """Per tissue id ``(tp, predicted px, truth px)`` of each raw head in one window ``sl``:
    its probability upsampled as :func:`aggregate` does, ``> threshold``, inside the mask."""
    rows_, cols_ = (sl[0].start, sl[0].stop), (sl[1].start, sl[1].stop)
    shape = (rows_[1] - rows_[0], cols_[1] - cols_[0])
    inside = (
        None if tissue_mask is None else mask_window(tissue_mask, mask_downsample, rows_, cols_)
    )
    counts = np.zeros((len(tissues), 3), np.int64)
    for t in tissues:
        prob, factor = found[t.key]
        p = upsample_window(prob, factor, rows_, cols_, "bilinear", skip_below=threshold)
        mine = np.zeros(shape, bool) if p is None else p > threshold
        if inside is not None:
            mine &= inside
        counts[t.id] = (int((mine & truth[t.key]).sum()), int(mine.sum()), int(truth[t.key].sum()))
    return counts


def nested_labels(tissues: TissueTable, pairs: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
    """Per tissue key, the labels of a label map that show that tissue: its own and, for the
    outer tissue of a nested pair, those of the tissues nested in it (transitively).

    A glomerular unit (``cap``) is its capsule label *and* the tuft label drawn inside it, as
    its truth mask and its head's output are the whole unit.
    """
    inner_of: dict[int, set[int]] = {}
    for inner, outer in pairs:
        inner_of.setdefault(outer, set()).add(inner)
    out = {}
    for t in tissues:
        ids, todo = {t.id}, [t.id]
        while todo:
            for i in inner_of.get(todo.pop(), ()):
                if i not in ids:
                    ids.add(i)
                    todo.append(i)
        out[t.key] = sorted(i + 1 for i in ids)
    return out


def _score_rows(
    confusion: np.ndarray,
    raw: np.ndarray | None,
    tissues,
    mm2: float,
    pairs: Sequence[tuple[int, int]] = (),
) -> pd.DataFrame:
    """The score table of :func:`score_aggregation` from its accumulated counts."""
    rows = []
    shows = nested_labels(tissues, pairs)
    for t in tissues:
        lab = shows[t.key]
        tp = int(confusion[np.ix_(lab, lab)].sum())
        pred_px = int(confusion[lab].sum())
        ref_px = int(confusion[:, lab].sum())
        fp, fn = pred_px - tp, ref_px - tp
        row = {
            "tissue": t.key,
            "label": t.label,
            "dice": dice_from_counts(tp, fp, fn),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "pred_px": pred_px,
            "ref_px": ref_px,
            "fp_mm2": fp * mm2,
        }
        if raw is not None:
            rtp, rpred, rref = (int(v) for v in raw[t.id])
            row.update(
                raw_dice=dice_from_counts(rtp, rpred - rtp, rref - rtp),
                raw_tp=rtp,
                raw_fp=rpred - rtp,
                raw_fn=rref - rtp,
                raw_fp_mm2=(rpred - rtp) * mm2,
            )
        rows.append(row)
    return pd.DataFrame(rows)
