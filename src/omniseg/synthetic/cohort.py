"""The synthetic renal cohort: seeded 40x ROIs of kidney cortex with partial and full labels.

Like the real data of the paper, every ROI is *delivered* with the mask of one tissue only
(``masks/``), while the full ground truth of all tissues is kept beside it (``truth/``) so that
complete-label aggregation can be scored. Rendering is done by :mod:`omniseg.synthetic.render`.

Layout written by :func:`synthesize_cohort`::

    outdir/images/{roi_id}.png   RGB uint8 40x ROI, roi_size x roi_size
    outdir/masks/{roi_id}.png    the delivered label: mask of the ROI's tissue, 0/255
    outdir/truth/{roi_id}.npz    one bool array per tissue key (overlapping), see load_truth
    outdir/rois.tsv              sample sheet (paths relative to the sheet's directory)
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from omniseg.io import atomic_path, write_png
from omniseg.synthetic.render import DRAWN, STAINS, render_tissue
from omniseg.synthetic.slide import edge_tissue_mask
from omniseg.tissues import SOURCE_UM_PER_PX, TissueTable

__all__ = [
    "STAINS",
    "SHEET_COLUMNS",
    "load_truth",
    "render_tissue",
    "roi_seed",
    "save_truth",
    "synthesize_cohort",
]

#: Columns of the sample sheet, in order.
SHEET_COLUMNS = ("roi_id", "patient", "stain", "tissue", "image", "mask", "truth")


def roi_seed(seed: int, patient: int, tissue_key: str, index: int) -> np.random.SeedSequence:
    """Seed of one ROI, independent of the order or number of ROIs rendered around it.

    Args:
        seed: cohort seed.
        patient: 0-based patient number.
        tissue_key: the ROI's focus tissue (its CRC-32 enters the seed, not its table position).
        index: 0-based ROI number of that patient and tissue.
    """
    return np.random.SeedSequence([seed, patient, zlib.crc32(tissue_key.encode()), index])


def synthesize_cohort(
    outdir: str | Path,
    tissues: TissueTable,
    *,
    seed: int = 0,
    patients: int = 10,
    rois_per_tissue: int = 1,
    roi_size: int = 2048,
    stains: Sequence[str] = STAINS,
    edge_fraction: float = 0.0,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    """Write a synthetic cohort and return the path of its sample sheet.

    For each patient and each tissue key, ``rois_per_tissue`` ROIs are rendered with that tissue
    in focus (:func:`~omniseg.synthetic.render.render_tissue`). As a biopsy is cut into sections
    of every stain, a patient's ROIs cycle through ``stains`` (in a seeded order), shifted by one
    per patient: every tissue sees every stain over consecutive patients. (The shift is the
    tissue's index, so tissues whose indices differ by a multiple of ``len(stains)`` share
    their stain per patient.) Patient ids
    are ``p01``, ``p02``...; ROI ids ``{patient}_{tissue}_{k}`` (``p03_tuft_0``).

    A share ``edge_fraction`` of the ROIs is crossed by the biopsy's edge: a band of tissue
    200-800 um wide through the ROI's centre, glass beyond it
    (:func:`~omniseg.synthetic.slide.edge_tissue_mask`). Slide tiles at 5x and 10x show such
    edges almost everywhere on a needle biopsy; a network that never saw glass beside tissue
    mislabels the tissue of those tiles. Which ROIs are cut, and where, has its own seed
    stream, so the ROIs without an edge are the same for every ``edge_fraction``.

    Same arguments give byte-identical files: every ROI has its own seed (:func:`roi_seed`),
    so neither ``threads`` nor other ROIs change it. Every file is written atomically and the
    sheet last, so an existing sheet means a complete cohort.

    Args:
        outdir: output directory (created).
        tissues: the registry; every key must be a structure the renderer draws.
        seed: cohort seed.
        patients: number of patients (>= 1).
        rois_per_tissue: ROIs per patient and tissue (>= 1).
        roi_size: ROI edge in pixels at 40x (0.25 um/px).
        stains: stain codes to use (subset of :data:`STAINS`).
        edge_fraction: share of ROIs crossed by the tissue's edge, in [0, 1].
        threads: > 1 renders ROIs in a process pool of that size.
        progress: show a tqdm progress bar.

    Returns:
        Path of ``outdir/rois.tsv``.

    Raises:
        ValueError: unknown stain, a tissue the renderer cannot draw, or bad counts.
    """
    stains = tuple(stains)
    bad = [s for s in stains if s not in STAINS]
    if bad or not stains:
        raise ValueError(f"unknown stain(s) {bad or stains}; known: {', '.join(STAINS)}")
    unknown = [k for k in tissues.keys if k not in DRAWN]
    if unknown:
        raise ValueError(
            f"the synthetic cohort cannot draw tissue(s) {', '.join(unknown)}; "
            f"it draws {', '.join(DRAWN)}"
        )
    for name, value, low in (
        ("patients", patients, 1),
        ("rois_per_tissue", rois_per_tissue, 1),
        ("roi_size", roi_size, 16),
        ("threads", threads, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= float(edge_fraction) <= 1.0:
        raise ValueError(f"edge_fraction must be in [0, 1], got {edge_fraction!r}")

    outdir = Path(outdir)
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5741])).permutation(len(stains))
    width = max(2, len(str(patients)))
    jobs = []
    for p in range(patients):
        patient = f"p{p + 1:0{width}d}"
        for j, key in enumerate(tissues.keys):
            for k in range(rois_per_tissue):
                roi_id = f"{patient}_{key}_{k}"
                stain = stains[order[(p + j + k * len(tissues)) % len(stains)]]
                jobs.append(
                    (
                        str(outdir),
                        tissues.to_records(),
                        roi_id,
                        patient,
                        stain,
                        key,
                        roi_seed(seed, p, key, k),
                        int(roi_size),
                        float(edge_fraction),
                    )
                )

    if threads > 1:
        # fork: workers need nothing from the caller's __main__ (Snakemake scripts have no guard)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork") if "fork" in methods else None
        with ProcessPoolExecutor(max_workers=int(threads), mp_context=ctx) as pool:
            rows = list(_progress(pool.map(_make_roi, jobs), len(jobs), progress))
    else:
        rows = list(_progress(map(_make_roi, jobs), len(jobs), progress))

    sheet = outdir / "rois.tsv"
    with atomic_path(sheet) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(SHEET_COLUMNS)
        writer.writerows(rows)
    return sheet


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="synthetic ROIs", unit="roi")


def _make_roi(job) -> tuple[str, ...]:
    """Render and write one ROI (runs in a worker process when threads > 1)."""
    outdir, records, roi_id, patient, stain, key, seq, size, edge_fraction = job
    outdir = Path(outdir)
    tissues = TissueTable.from_records(records)
    # the edge's own stream: the render stream (seq) is the same with or without an edge
    edge_rng = np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(0xED6E,)))
    tissue = None
    if edge_rng.random() < edge_fraction:
        tissue = edge_tissue_mask(edge_rng, (size, size), SOURCE_UM_PER_PX)
    image, masks = render_tissue(
        np.random.default_rng(seq),
        (size, size),
        stain,
        tissues,
        focus=key,
        um_per_px=SOURCE_UM_PER_PX,
        tissue_mask=tissue,
    )
    rel = {
        "image": f"images/{roi_id}.png",
        "mask": f"masks/{roi_id}.png",
        "truth": f"truth/{roi_id}.npz",
    }
    write_png(outdir / rel["image"], image)
    write_png(outdir / rel["mask"], masks[key].astype(np.uint8) * 255)
    save_truth(outdir / rel["truth"], masks)
    return (roi_id, patient, stain, key, rel["image"], rel["mask"], rel["truth"])


def save_truth(path: str | Path, masks: dict[str, np.ndarray]) -> None:
    """Write masks as a compressed ``.npz`` (one bool array per key), atomically and
    byte-reproducibly (fixed zip timestamps, unlike ``np.savez_compressed``)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for key, arr in masks.items():
                buf = io.BytesIO()
                np.lib.format.write_array(
                    buf, np.ascontiguousarray(arr, dtype=bool), allow_pickle=False
                )
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=1)


def load_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Read a truth ``.npz`` back: ``{tissue key: bool (H, W)}``.

    Raises:
        ValueError: naming the file if it is missing, unreadable, or its arrays are not
            bool masks of one shape.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"truth {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            truth = {k: z[k] for k in z.files}
    except Exception as exc:  # zip and format errors have many types
        raise ValueError(f"truth {path} cannot be read: {exc}") from exc
    shapes = {a.shape for a in truth.values()}
    if not truth or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"truth {path} must hold 2-D masks of one shape, got {sorted(shapes)}")
    bad = [k for k, a in truth.items() if a.dtype != bool]
    if bad:
        raise ValueError(f"truth {path}: array(s) {', '.join(bad)} are not bool")
    return truth
