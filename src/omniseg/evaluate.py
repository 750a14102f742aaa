"""Test-set evaluation: predict every patch of a split, score it, summarise per tissue.

Each tissue's patches are predicted by the model file assigned to that tissue (one file for all
tissues for single-network methods, one per tissue for multi-network baselines), asking the model
for that tissue only; ``pred = p > 0.5``. Every patch is scored with :func:`omniseg.metrics.score`
at the tissue's pixel size (Dice %, HD and MSD in micrometres, the empty-mask rule documented
there). Undefined distances are left out of the means and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from omniseg.checkpoint import load_model
from omniseg.data.patchset import PatchDataset, describe
from omniseg.device import autocast_context, select_device, use_channels_last
from omniseg.io import atomic_path
from omniseg.metrics import empty_flags, empty_mask_stats, score
from omniseg.tables import (
    AVERAGE,
    false_positive_counts,
    nonempty_dice,
    table1,
    table1_markdown,
    undefined_counts,
)
from omniseg.tissues import TissueTable

log = logging.getLogger(__name__)

PREDICTIONS_FORMAT = "omniseg-predictions/1"
PER_PATCH_COLUMNS = (
    "method",
    "tissue",
    "index",
    "roi_id",
    "patient",
    "stain",
    "dice",
    "hd_um",
    "msd_um",
    "empty",
)
SUMMARY_COLUMNS = (
    "method",
    "tissue",
    "n",
    "dice_pct",
    "hd_um",
    "msd_um",
    "n_hd_undefined",
    "n_empty_both",
    "n_empty_pred",
    "n_empty_gt",
    "dice_nonempty_pct",
    "n_nonempty",
    "n_empty_mask",
    "n_fp_empty",
)


#: Output name -> file name in ``out_dir`` (:func:`evaluate`).
OUTPUT_NAMES = {
    "per_patch": "per_patch.csv",
    "summary": "summary.csv",
    "summary_md": "summary.md",
    "predictions": "predictions.h5",
}


def output_paths(
    out_dir: str | Path | None, outputs: Mapping[str, str | Path] | None, predictions: bool
) -> dict[str, Path]:
    """Where :func:`evaluate` writes: ``outputs`` as given, the rest in ``out_dir``."""
    given = {k: Path(v) for k, v in (outputs or {}).items()}
    unknown = sorted(set(given) - set(OUTPUT_NAMES))
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; known: {', '.join(OUTPUT_NAMES)}")
    names = [k for k in OUTPUT_NAMES if predictions or k != "predictions"]
    missing = [k for k in names if k not in given]
    if missing and out_dir is None:
        raise ValueError(f"no path for output(s) {', '.join(missing)}: give out_dir or outputs")
    return {k: given[k] if k in given else Path(out_dir) / OUTPUT_NAMES[k] for k in names}


def evaluate(
    models: Mapping[str, str | Path],
    patch_sets: Sequence[str | Path],
    tissues: TissueTable,
    *,
    method: str,
    out_dir: str | Path | None = None,
    outputs: Mapping[str, str | Path] | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 16,
    save_predictions: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """Predict and score the ``split`` patches of every tissue that has a model.

    Args:
        models: tissue key -> model file (the same file for every tissue of a single network).
            Each distinct file is loaded once.
        patch_sets: HDF5 patch sets (one per tissue; the tissue is read from the file).
        tissues: the registry; model files must have been trained with the same one.
        method: method name written in the outputs.
        out_dir: output folder, where the outputs get the names below.
        outputs: paths by name (``per_patch``, ``summary``, ``summary_md``, ``predictions``)
            where they should go instead (e.g. a Snakemake rule's declared outputs); every name
            not given needs ``out_dir``.
        split: which split to score.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: patches per forward pass.
        save_predictions: also write ``predictions.h5``.
        progress: show a tqdm bar per tissue.

    Returns:
        Paths by name: ``per_patch`` (``per_patch.csv``: one row per patch, columns
        :data:`PER_PATCH_COLUMNS`; ``index`` = position of the patch within its tissue's
        ``split`` patches, in patch-set order), ``summary`` (``summary.csv``: one row per tissue
        of ``models`` in registry order plus ``average``, columns :data:`SUMMARY_COLUMNS`; see
        :func:`summarize`), ``summary_md`` (``summary.md``, Table-1 layout) and, if saved,
        ``predictions`` (``predictions.h5``: per tissue a uint8 {0, 1} dataset ``/{key}``
        ``(N, P, P)`` of predicted masks in ``per_patch.csv`` order). A tissue of ``models``
        without patches in ``split`` gets a warning, a summary row with ``n = 0`` and no
        predictions dataset.

    Raises:
        ValueError: unknown tissue keys, bad batch size, a model whose output has the wrong
            shape, or a patch set problem (named by the patch-set reader).
        FileNotFoundError: a model file or patch set does not exist.
    """
    unknown = [k for k in models if k not in tissues]
    if unknown:
        raise ValueError(
            f"models given for unknown tissue(s) {', '.join(unknown)}; known: "
            f"{', '.join(tissues.keys)}"
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    paths = output_paths(out_dir, outputs, save_predictions)
    dev = select_device(device)
    sets = patch_sets_by_tissue(patch_sets, tissues)
    model_files = {k: Path(p) for k, p in models.items()}
    for key, path in model_files.items():
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} for tissue {key!r} does not exist")
    keys = [k for k in tissues.keys if k in model_files]

    loaded: dict[Path, torch.nn.Module] = {}
    frames: list[pd.DataFrame] = []
    with contextlib.ExitStack() as stack:
        h5 = None
        if save_predictions:
            tmp = stack.enter_context(atomic_path(paths["predictions"]))
            h5 = stack.enter_context(h5py.File(tmp, "w"))
            h5.attrs.update(
                format=PREDICTIONS_FORMAT, method=method, split=split, tissues=tissues.to_json()
            )
        for key in keys:
            frame = _score_tissue(
                tissues, key, sets.get(key, []), model_files[key], loaded, split=split,
                method=method, device=dev, batch_size=int(batch_size), h5=h5, progress=progress,
            )  # fmt: skip
            if frame is not None:
                frames.append(frame)
        per_patch = (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame({c: pd.Series(dtype=object) for c in PER_PATCH_COLUMNS})
        )
        summary = summarize(per_patch, keys, method=method)
        with atomic_path(paths["per_patch"]) as tmp_csv:
            per_patch.to_csv(tmp_csv, index=False)
        with atomic_path(paths["summary"]) as tmp_csv:
            summary.to_csv(tmp_csv, index=False)
        with atomic_path(paths["summary_md"]) as tmp_md:
            tmp_md.write_text(summary_markdown(summary, tissues, method=method, split=split))
    for row in summary.itertuples():
        log.info(
            "%s %s: n=%d dice=%.2f%% hd=%.2fum msd=%.2fum (%d undefined)",
            method, row.tissue, row.n, row.dice_pct, row.hd_um, row.msd_um, row.n_hd_undefined,
        )  # fmt: skip
    return paths


def _score_tissue(
    tissues: TissueTable, key: str, patch_sets: Sequence[Path], model_file: Path, loaded: dict,
    *, split: str, method: str, device, batch_size: int, h5, progress: bool,
) -> pd.DataFrame | None:  # fmt: skip
    """One tissue's per-patch rows, its predicted masks into ``h5``; None (with a warning) when
    it has no ``split`` patches. ``loaded`` caches the models by file."""
    tissue = tissues[key]
    dataset = PatchDataset(patch_sets, split, tissues, select=[key]) if patch_sets else None
    if dataset is None or len(dataset) == 0:
        where = ", ".join(map(str, patch_sets)) if patch_sets else "no patch set given"
        warnings.warn(
            f"{method}: tissue {key!r} has no {split!r} patches ({where}); "
            "its summary row has n = 0",
            stacklevel=3,
        )
        return None
    model_path = model_file.resolve()
    if model_path not in loaded:
        loaded[model_path] = _load(model_path, tissues, device)
    frame = _evaluate_tissue(
        loaded[model_path], model_path, dataset, tissue.id, key, spacing_um=tissue.um_per_px,
        method=method, device=device, batch_size=batch_size, h5=h5, progress=progress,
    )  # fmt: skip
    dataset.close()
    if h5 is not None and key in h5:
        h5[key].attrs.update(
            um_per_px=tissue.um_per_px,
            model=str(model_file),
            patch_sets=json.dumps([str(p) for p in patch_sets]),
        )
    return frame


def patch_sets_by_tissue(
    patch_sets: Sequence[str | Path], tissues: TissueTable
) -> dict[str, list[Path]]:
    """Group patch-set files by the tissue key stored in each file (attribute ``tissue_key``).

    Returns:
        tissue key -> files, in the given order.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not a patch set or names a tissue the registry lacks.
    """
    out: dict[str, list[Path]] = {}
    for p in map(Path, patch_sets):
        if not p.is_file():
            raise FileNotFoundError(f"patch set {p} does not exist")
        try:
            key = describe(p)["attrs"].get("tissue_key")
        except OSError as exc:
            raise ValueError(f"patch set {p} cannot be read as HDF5: {exc}") from exc
        if key not in tissues:
            raise ValueError(
                f"patch set {p} is for tissue {key!r}, not in the tissue table "
                f"({', '.join(tissues.keys)})"
            )
        out.setdefault(str(key), []).append(p)
    return out


def summarize(per_patch: pd.DataFrame, keys: Sequence[str], *, method: str) -> pd.DataFrame:
    """Per-tissue means of a per-patch table, plus an ``average`` row.

    Args:
        per_patch: rows with columns ``tissue``, ``dice``, ``hd_um``, ``msd_um``, ``empty``.
        keys: tissues to report, in order (a key without rows gets ``n = 0`` and nan means).
        method: written in the ``method`` column.

    Returns:
        DataFrame with :data:`SUMMARY_COLUMNS`: ``dice_pct`` = mean Dice over all ``n`` patches
        (empty masks included, by the empty rule); ``hd_um``/``msd_um`` = means over the patches
        where they are defined; ``n_hd_undefined`` = patches left out of those means;
        ``n_empty_*`` = patches per empty kind; ``dice_nonempty_pct`` = mean Dice over the
        ``n_nonempty`` patches whose mask is non-empty, ``n_fp_empty`` = patches whose mask is
        empty but the prediction is not, out of ``n_empty_mask`` empty masks
        (:func:`omniseg.metrics.empty_mask_stats`). The ``average`` row is the mean over tissues
        (with patches / with defined distances / with non-empty masks) of the per-tissue means,
        and the sums of the counts.
    """
    rows = []
    for key in keys:
        sub = per_patch[per_patch["tissue"] == key]
        empty = sub["empty"].value_counts()
        hd, msd = sub["hd_um"].astype(float), sub["msd_um"].astype(float)
        gt_empty, pred_empty = empty_flags(sub["empty"].astype(str))
        extra = empty_mask_stats(sub["dice"].astype(float), gt_empty, pred_empty)
        rows.append(
            {
                "method": method,
                "tissue": key,
                "n": len(sub),
                "dice_pct": float(sub["dice"].astype(float).mean()) if len(sub) else math.nan,
                "hd_um": float(hd.mean()) if hd.notna().any() else math.nan,
                "msd_um": float(msd.mean()) if msd.notna().any() else math.nan,
                "n_hd_undefined": int(hd.isna().sum()),
                "n_empty_both": int(empty.get("both", 0)),
                "n_empty_pred": int(empty.get("pred", 0)),
                "n_empty_gt": int(empty.get("gt", 0)),
                **extra,
            }
        )
    table = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    average = {"method": method, "tissue": AVERAGE}
    for col in ("dice_pct", "hd_um", "msd_um", "dice_nonempty_pct"):
        values = table[col].dropna()
        average[col] = float(values.mean()) if len(values) else math.nan
    counts = ("n", "n_hd_undefined", "n_empty_both", "n_empty_pred", "n_empty_gt")
    for col in (*counts, "n_nonempty", "n_empty_mask", "n_fp_empty"):
        average[col] = int(table[col].sum())
    table = pd.concat([table, pd.DataFrame([average])], ignore_index=True)
    return table[list(SUMMARY_COLUMNS)]


def summary_markdown(
    summary: pd.DataFrame, tissues: TissueTable, *, method: str, split: str
) -> str:
    """``summary.md``: one method's summary in the Table-1 layout, with the left-out counts."""
    one = {method: summary}
    caption = (
        f"{method}, {split} split: Dice (%), Hausdorff distance and mean surface distance (µm); "
        "undefined distances (an empty mask) are left out of the means and counted."
    )
    return table1_markdown(
        table1(one, tissues),
        caption=caption,
        left_out=undefined_counts(one, tissues),
        nonempty=nonempty_dice(one, tissues),
        false_positives=false_positive_counts(one, tissues),
    )


def _load(path: Path, tissues: TissueTable, device: torch.device) -> torch.nn.Module:
    model, _meta = load_model(path, tissues=tissues, device=device)
    return model.eval()


def _evaluate_tissue(
    model: torch.nn.Module,
    model_path: Path,
    dataset: PatchDataset,
    tissue_id: int,
    key: str,
    *,
    spacing_um: float,
    method: str,
    device: torch.device,
    batch_size: int,
    h5: h5py.File | None,
    progress: bool,
) -> pd.DataFrame:
    """Predict and score one tissue's patches; rows of ``per_patch.csv`` in dataset order."""
    meta = dataset.meta().reset_index(drop=True)
    n = len(dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    channels_last = use_channels_last(device)
    scores: list[dict] = []
    order: list[int] = []
    done = 0
    with torch.inference_mode():
        for batch in tqdm(
            loader, desc=f"{method} {key}", unit="batch", disable=not progress, leave=False
        ):
            x = batch["image"].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device):
                prob = model.predict_proba(x, [tissue_id])
            expected = (x.shape[0], 1, *x.shape[2:])
            if tuple(prob.shape) != expected:
                raise ValueError(
                    f"model {model_path}: predict_proba returned {tuple(prob.shape)} for a "
                    f"batch of {tuple(x.shape)}, expected {expected}"
                )
            pred = (prob[:, 0].float() > 0.5).cpu().numpy()
            gt = (batch["mask"][:, 0] > 0.5).numpy()
            if h5 is not None:
                if key not in h5:
                    h5.create_dataset(
                        key,
                        shape=(n, *pred.shape[1:]),
                        dtype=np.uint8,
                        chunks=(1, *pred.shape[1:]),
                        compression="gzip",
                        compression_opts=1,
                    )
                h5[key][done : done + len(pred)] = pred.astype(np.uint8)
            done += len(pred)
            order.extend(int(i) for i in batch["index"])
            scores.extend(score(p, g, spacing_um) for p, g in zip(pred, gt, strict=True))
    rows = meta.iloc[order]
    return pd.DataFrame(
        {
            "method": method,
            "tissue": key,
            "index": np.arange(n),
            "roi_id": rows["roi_id"].to_numpy(),
            "patient": rows["patient"].to_numpy(),
            "stain": rows["stain"].to_numpy(),
            "dice": [s["dice"] for s in scores],
            "hd_um": [s["hd"] for s in scores],
            "msd_um": [s["msd"] for s in scores],
            "empty": [s["empty"] for s in scores],
        },
        columns=list(PER_PATCH_COLUMNS),
    )
