"""Whole-slide pipeline steps: one function per Snakemake rule and ``omniseg`` subcommand.

Each step takes paths and plain values (what a rule has in ``input``/``output``/``params``),
opens what it needs and calls the package function that does the work, so a rule and the
matching CLI subcommand always do the same thing. Heavy modules are imported inside the steps:
a step pulls in only what it uses.

Per slide, in ``results/wsi/{slide}/``:

1. :func:`mask_slide`: ``tissue_mask.png`` (bool mask at ``mask_um_per_px``) and
   ``tissue_mask.json`` (:data:`MASK_INFO_KEYS`: the slide's level-0 size and pixel size, the
   mask's downsample and the tissue area), which later steps read instead of reopening the slide;
2. :func:`slide_stain` (``wsi.stain_norm``): ``stain.json``, the per-channel gain that brings
   the slide's stain to the training patches' (:func:`stain_reference`, once per run:
   ``results/wsi/stain_reference.json``);
3. :func:`predict_slide`, once per scale of the tissue table (:func:`scale_key`), through that
   gain where there is one: ``prob_{scale}.h5``;
4. :func:`aggregate_slide`: ``labels.h5`` (level-0 grid, 0 = background, tissue id + 1);
5. :func:`export_slide`: ``labels.ome.tif``, ``overlay.png``, ``tissues.geojson``, ``areas.csv``;
6. :func:`score_slide` (slides with ground truth): ``aggregation_scores.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from omniseg.io import atomic_path
from omniseg.tissues import TissueTable, as_tissue_table

log = logging.getLogger("omniseg")

__all__ = [
    "MASK_INFO_KEYS",
    "aggregate_slide",
    "default_class_map",
    "export_slide",
    "import_annotations",
    "mask_slide",
    "predict_slide",
    "read_mask_info",
    "read_stain_gain",
    "scale_key",
    "scale_keys",
    "score_slide",
    "slide_stain",
    "stain_reference",
    "synth_slide",
    "tissues_at_scale_key",
]

#: Entries of ``tissue_mask.json``.
MASK_INFO_KEYS = (
    "slide",
    "mpp",
    "level0_shape",
    "mask_um_per_px",
    "downsample",
    "mask_shape",
    "tissue_area_px",
    "tissue_area_mm2",
)

#: Default of how far (um) labels may reach beyond the tissue mask: one pixel of the 4 um mask.
MASK_MARGIN_UM = 4.0


def _optional_path(value) -> Path | None:
    """A path from a rule input or CLI option that may be absent (None, "", or an empty list)."""
    if isinstance(value, list | tuple):
        if len(value) > 1:
            raise ValueError(f"expected at most one file, got {list(value)}")
        value = value[0] if value else None
    if value is None or str(value) == "":
        return None
    return Path(value)


def _optional_mpp(mpp) -> float | None:
    """The sheet's ``mpp`` (None, NaN or "" when not given)."""
    if mpp is None or mpp == "":
        return None
    value = float(mpp)
    return None if value != value else value  # NaN from a pandas column: not given


# -- scales ---------------------------------------------------------------------------------------
def scale_key(um_per_px: float) -> str:
    """The file-name key of a scale: ``0.25``, ``1``, ``2`` (``f"{um_per_px:g}"``)."""
    return f"{float(um_per_px):g}"


def scale_keys(tissues: TissueTable | str | Path) -> list[str]:
    """Keys of every scale of the tissue table, finest first."""
    return [scale_key(um) for um in as_tissue_table(tissues).scales]


def tissues_at_scale_key(tissues: TissueTable, key: str) -> tuple[float, list]:
    """``(um_per_px, tissues of that scale)`` for a key of :func:`scale_keys`.

    Raises:
        ValueError: no tissue of the table has that scale.
    """
    for um in tissues.scales:
        if scale_key(um) == str(key):
            return um, tissues.at_scale(um)
    raise ValueError(
        f"no tissue is segmented at scale {key!r} um/px; the tissue table has "
        f"{', '.join(scale_keys(tissues))}"
    )


# -- synthetic slides -----------------------------------------------------------------------------
def synth_slide(
    out_tif: str | Path,
    tissues: TissueTable | str | Path,
    *,
    seed: int = 1,
    height: int = 4096,
    width: int = 6144,
    strips: int = 2,
    stain: str = "he",
    focus: Sequence[str | None] = ("cap", "ves"),
    tile: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    truth_h5: str | Path | None = None,
) -> dict[str, Path]:
    """Write a synthetic pyramidal slide (``out_tif``) and its truth (``truth_h5``; None:
    ``{stem}_truth.h5`` beside the slide).

    See :func:`omniseg.synthetic.slide.synthesize_slide` for the arguments.

    Returns:
        ``{"slide": out_tif, "truth": truth HDF5}``.
    """
    from omniseg.synthetic.slide import synthesize_slide

    written = synthesize_slide(
        out_tif,
        as_tissue_table(tissues),
        seed=seed,
        height=height,
        width=width,
        strips=strips,
        stain=stain,
        tile=tile,
        compression=compression,
        quality=quality,
        focus=tuple(focus or ()),
        truth_h5=truth_h5,
    )
    log.info(
        "synthetic slide %s (%dx%d, %d strips), truth %s",
        out_tif,
        height,
        width,
        strips,
        written["truth"],
    )
    return written


# -- tissue mask ----------------------------------------------------------------------------------
def mask_slide(
    slide: str | Path,
    out_png: str | Path,
    out_json: str | Path,
    *,
    mpp: float | None = None,
    mask_image: str | Path | None = None,
    um_per_px: float = 4.0,
    **params,
) -> dict:
    """Compute (or load) the slide's low-resolution tissue mask; write it and its geometry.

    Args:
        slide: the slide file.
        out_png: the mask, 0/255 PNG ``(rows, cols)`` at ``um_per_px``; mask pixel ``(i, j)``
            covers level-0 pixels ``[i d, (i + 1) d) x [j d, (j + 1) d)``, ``d`` = downsample.
        out_json: the geometry (:data:`MASK_INFO_KEYS`): ``level0_shape`` and ``mask_shape`` are
            ``(rows, cols)``; ``downsample`` = ``um_per_px / mpp`` (level-0 pixels per mask
            pixel); ``tissue_area_px`` = mask pixels x downsample^2 (level-0 pixels).
        mpp: level-0 um/px overriding the slide's metadata (the sheet's ``mpp``).
        mask_image: a user-supplied mask image replacing the automatic mask.
        um_per_px: mask resolution.
        **params: thresholds and morphology of :func:`omniseg.wsi.tissue_mask.tissue_mask`.

    Returns:
        The JSON content. An empty mask is a warning, not an error: later steps then write
        empty outputs.

    Raises:
        ValueError: naming the file: unreadable or truncated slide, no pixel size, bad mask image.
    """
    from omniseg.io import write_png
    from omniseg.wsi.slide import Slide
    from omniseg.wsi.tissue_mask import slide_tissue_mask

    mask_image = _optional_path(mask_image)
    with Slide(slide, mpp=_optional_mpp(mpp)) as s:
        mask, ds = slide_tissue_mask(s, um_per_px=um_per_px, mask_image=mask_image, **params)
        w0, h0 = s.dimensions
        info = {
            "slide": str(slide),
            "mpp": float(s.mpp),
            "level0_shape": [int(h0), int(w0)],
            "mask_um_per_px": float(um_per_px),
            "downsample": float(ds),
            "mask_shape": [int(mask.shape[0]), int(mask.shape[1])],
            "tissue_area_px": _level0_area_px(mask, ds),
        }
    info["tissue_area_mm2"] = info["tissue_area_px"] * info["mpp"] ** 2 / 1e6
    info["mask_image"] = str(mask_image) if mask_image else None
    write_png(out_png, mask)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "slide %s: %dx%d at %.4g um/px, tissue %.3f mm^2 (%s)",
        slide,
        w0,
        h0,
        info["mpp"],
        info["tissue_area_mm2"],
        "mask image" if mask_image else "automatic mask",
    )
    return info


def stain_reference(
    patch_sets: Sequence[str | Path], out_json: str | Path, *, split: str = "train"
) -> dict:
    """The training patches' mean optical density per stain (``stain_reference.json``), which
    :func:`slide_stain` brings each slide to (:mod:`omniseg.wsi.stain`); ``split``: the
    patches measured.

    Raises:
        ValueError: naming the file: not a patch set, or no training patch with tissue.
    """
    from omniseg.wsi.stain import TISSUE_OD, reference_densities

    reference = {
        "tissue_od": TISSUE_OD,
        "patch_sets": [str(p) for p in patch_sets],
        "split": split,
        "stains": reference_densities(patch_sets, split),
    }
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(reference, indent=2) + "\n")
    for stain, entry in reference["stains"].items():
        log.info(
            "stain %s: training OD %s over %d patches",
            stain, "/".join(f"{v:.3f}" for v in entry["density"]), entry["patches"],
        )  # fmt: skip
    return reference


def slide_stain(
    slide: str | Path,
    mask_png: str | Path,
    mask_json: str | Path,
    reference_json: str | Path,
    stain: str,
    out_json: str | Path,
    *,
    mpp: float | None = None,
) -> dict:
    """The per-channel optical-density gain that brings the slide's tissue to the training
    patches of its stain (``stain.json``; :func:`predict_slide` applies it to every tile).

    A slide without measurable tissue keeps its colours (gain 1) with a warning, as its empty
    mask gives empty outputs anyway.

    Raises:
        ValueError: naming the file: a stain the training patches do not have, an unreadable
            reference, a mask that does not belong to the slide.
    """
    from omniseg.wsi.slide import Slide
    from omniseg.wsi.stain import ANALYSIS_UM, GAIN_WARN, describe, slide_density, stain_gain

    try:
        stains = json.loads(Path(reference_json).read_text())["stains"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"stain reference {reference_json} cannot be read: {exc}") from exc
    if stain not in stains:
        raise ValueError(
            f"slide {slide}: stain {stain!r} has no training patches in {reference_json} "
            f"(stains: {', '.join(stains) or 'none'}); give the slide one of those stains "
            "in the slide sheet's stain column, or set wsi.stain_norm: false"
        )
    info = read_mask_info(mask_json)
    mask = _load_mask(mask_png, info, mask_json)
    with Slide(slide, mpp=_optional_mpp(mpp)) as s:
        _check_slide_matches(s, info, slide, mask_json)
        density, pixels = slide_density(s, mask, float(info["downsample"]), ANALYSIS_UM)
    gain = [1.0, 1.0, 1.0] if density is None else stain_gain(stains[stain]["density"], density)
    result = {
        "slide": str(slide),
        "stain": stain,
        "um_per_px": ANALYSIS_UM,
        "reference": stains[stain]["density"],
        "density": None if density is None else [float(v) for v in density],
        "tissue_pixels": int(pixels),
        "gain": [float(v) for v in gain],
    }
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    line = describe(stain, stains[stain], density, pixels, gain)
    far = any(not 1 / GAIN_WARN <= g <= GAIN_WARN for g in gain)
    if density is None or far:
        log.warning(
            "slide %s: %s%s", slide, line,
            "; a gain that far from 1 is outside what was validated: is the stain right?"
            if far else "",
        )  # fmt: skip
    else:
        log.info("slide %s: %s", slide, line)
    return result


def read_stain_gain(path: str | Path) -> list[float]:
    """The ``gain`` of a ``stain.json`` written by :func:`slide_stain`.

    Raises:
        ValueError: naming the file when it is not such a file.
    """
    from omniseg.wsi.stain import check_gain

    try:
        gain = json.loads(Path(path).read_text())["gain"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"stain file {path} cannot be read: {exc}") from exc
    return check_gain(gain, f"stain file {path}")


def _check_slide_matches(s, info: dict, slide, mask_json) -> None:
    """Raise ValueError when ``tissue_mask.json`` describes another slide than ``s``."""
    w0, h0 = s.dimensions
    if [h0, w0] != list(info["level0_shape"]) or abs(s.mpp - info["mpp"]) > 1e-9 * s.mpp:
        raise ValueError(
            f"tissue mask info {mask_json} describes a {info['level0_shape']} slide at "
            f"{info['mpp']} um/px, but slide {slide} is [{h0}, {w0}] at {s.mpp} um/px"
        )


def read_mask_info(path: str | Path) -> dict:
    """Read ``tissue_mask.json`` written by :func:`mask_slide`.

    Raises:
        ValueError: naming the file if it is not JSON or lacks an entry.
    """
    path = Path(path)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"tissue mask info {path} cannot be read: {exc}") from exc
    missing = [k for k in MASK_INFO_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f"tissue mask info {path} lacks {', '.join(missing)}")
    return info


def _load_mask(mask_png: str | Path, info: dict, info_path: str | Path):
    from omniseg.io import read_mask

    mask = read_mask(mask_png)
    if list(mask.shape) != list(info["mask_shape"]):
        raise ValueError(
            f"tissue mask {mask_png} is {mask.shape[0]}x{mask.shape[1]}, {info_path} says "
            f"{info['mask_shape'][0]}x{info['mask_shape'][1]} (rows x cols)"
        )
    return mask


# -- prediction -----------------------------------------------------------------------------------
#: Tile edge used when neither the config nor the checkpoint gives one (old checkpoints).
FALLBACK_TILE = 256
#: Blocks of tiles read as one region span about this many scale pixels.
READ_SPAN = 896


def slide_tiling(
    patch_sizes: Sequence[int | None],
    tile: int | None = None,
    overlap: int | None = None,
    multiple: int = 1,
) -> tuple[int, int]:
    """The tile edge and overlap of slide prediction (pure; warnings say why).

    By default the tile is the models' training patch size (recorded in their checkpoints). A
    ``tile`` given explicitly is a stated choice: the networks that pool their input (Omni-Seg's
    controller, DeepLabV3's image pooling) pool a window of the training patch size around each
    position of a larger tile (:attr:`~omniseg.models.registry.SegmentationModel.context`, set
    by :func:`~omniseg.checkpoint.load_model`), so what they pool does not depend on the tile.
    A model without a recorded size (an old checkpoint) pools its whole tile: it gets a warning
    and ``tile``, or :data:`FALLBACK_TILE`.

    Args:
        patch_sizes: each model's training patch size (None where unknown).
        tile: the configured tile edge (None: the training patch size).
        overlap: the configured overlap (None: ``tile // 8``, which keeps the share of
            recomputed pixels of a 256 tile with a 32 overlap).
        multiple: tiles are rounded up to a multiple of this (the model's ``size_multiple``).

    Returns:
        ``(tile, overlap)`` in scale pixels.
    """
    known = sorted({int(p) for p in patch_sizes if p})
    if len(known) > 1:
        warnings.warn(
            f"the models were trained on different patch sizes {known}; slide tiles use "
            f"{known[-1]}",
            stacklevel=2,
        )
    trained = known[-1] if known else None
    if not all(patch_sizes):
        chosen = tile or trained or FALLBACK_TILE
        warnings.warn(
            "a model checkpoint does not record its training patch size (written before "
            f"omniseg recorded it): slide tiles use {chosen} px"
            + ("" if tile else "; set wsi.tile (or --tile) to choose"),
            stacklevel=2,
        )
    if tile is None:
        tile = trained or FALLBACK_TILE
    tile = int(math.ceil(int(tile) / multiple) * multiple)
    if overlap is None:
        overlap = tile // 8
    return tile, int(overlap)


def load_tissue_models(model_files: Sequence[str | Path], table: TissueTable, device):
    """Load one method's model files as one predictor of every tissue they were trained on.

    Returns:
        ``(TissueModels, metas)``; each tissue served by exactly one file.

    Raises:
        ValueError: naming the files: two files that claim a tissue, or a mismatched table.
    """
    from omniseg.checkpoint import load_model
    from omniseg.inference import TissueModels

    entries, metas, served = [], [], {}
    for path in model_files:
        model, meta = load_model(path, table, device)
        keys = meta.get("trained_tissues") or list(table.keys)
        clash = [k for k in keys if k in served]
        if clash:
            raise ValueError(
                f"model files {served[clash[0]]} and {path} both serve tissue(s) {clash}"
            )
        served.update({k: path for k in keys})
        entries.append((model, [table[k].id for k in keys]))
        metas.append(meta)
    return TissueModels(entries), metas


def predict_slide(
    model_files: str | Path | Sequence[str | Path],
    slide: str | Path,
    mask_png: str | Path,
    mask_json: str | Path,
    tissues: TissueTable | str | Path,
    scale: str | float,
    out_h5: str | Path,
    *,
    mpp: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    threads: int = 1,
    workers: int = 2,
    read_tiles: int | None = None,
    adapt_norm: int = 0,
    stain_json: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Predict every tissue of one scale over the slide's tissue (``prob_{scale}.h5``).

    Args:
        model_files: the model file(s) of one method: one for a single network, one per tissue
            for a multi-network method (each tissue's network at its scale; the tissues of a
            file are the ``trained_tissues`` of its checkpoint).
        slide: the slide file.
        mask_png, mask_json: outputs of :func:`mask_slide` for this slide.
        tissues: the registry; the models' stored table must match it.
        scale: a key of :func:`scale_keys` (``"0.25"``, ``"1"``, ...) or the um/px itself.
        out_h5: output of :func:`omniseg.inference.predict_scale`.
        mpp: level-0 um/px overriding the slide's metadata (the sheet's ``mpp``).
        tile, overlap: tile edge and overlap at the tissue's scale; None: see
            :func:`slide_tiling` (the training patch size, and an eighth of it).
        batch_size, workers: see :func:`omniseg.inference.predict_scale`.
        read_tiles: tiles per side of a block read as one region; None: blocks of about
            :data:`READ_SPAN` pixels.
        device: ``auto`` (``OMNISEG_DEVICE`` when set, else CUDA when present, else CPU),
            ``cpu``, ``cuda``, ``cuda:N``.
        threads: CPU threads for the model.
        adapt_norm: re-estimate the statistics of each network's first ``adapt_norm``
            BatchNorm layers on tiles of this slide before predicting (0: off;
            :mod:`omniseg.wsi.adapt`). The tiles are the same at every scale, so one slide's
            scales see one adapted network.
        stain_json: the slide's ``stain.json`` (:func:`slide_stain`): every tile, and every
            adaptation tile, is read through its optical-density gain; None: as decoded.

    Returns:
        ``out_h5``.

    Raises:
        ValueError: a tissue of the scale that no model serves, a model whose tissue table
            does not match (naming the file), a mask that does not belong to the slide.
    """
    from omniseg.device import configure_threads, requested_device, select_device
    from omniseg.inference import predict_scale
    from omniseg.wsi.slide import Slide

    table = as_tissue_table(tissues)
    files = [model_files] if isinstance(model_files, str | Path) else list(model_files)
    if not files:
        raise ValueError("whole-slide prediction needs at least one model file")
    if isinstance(adapt_norm, bool) or not isinstance(adapt_norm, int) or adapt_norm < 0:
        raise ValueError(f"adapt_norm must be an integer >= 0 (0: off), got {adapt_norm!r}")
    key = scale if isinstance(scale, str) else scale_key(scale)
    um, at_scale = tissues_at_scale_key(table, key)
    info = read_mask_info(mask_json)
    mask = _load_mask(mask_png, info, mask_json)
    configure_threads(threads)
    dev = select_device(requested_device(device))
    models, metas = load_tissue_models(files, table, dev)
    unserved = [t.key for t in at_scale if t.id not in models.owner]
    if unserved:
        raise ValueError(
            f"no model of {', '.join(map(str, files))} was trained on tissue(s) "
            f"{', '.join(unserved)} (scale {key} um/px)"
        )
    # only the networks of this scale's tissues decide the tile
    used = {models.owner[t.id] for t in at_scale}
    tile, overlap = slide_tiling(
        [metas[k].get("patch_size") for k in sorted(used)], tile, overlap, models.size_multiple
    )
    if read_tiles is None:
        read_tiles = max(1, round(READ_SPAN / (tile - overlap)))
    stain_path = _optional_path(stain_json)
    gain = None if stain_path is None else read_stain_gain(stain_path)
    with Slide(slide, mpp=_optional_mpp(mpp), od_gain=gain) as s:
        _check_slide_matches(s, info, slide, mask_json)
        log.info(
            "slide %s: predicting %s at %s um/px on %s with %s (tile %d, overlap %d%s)",
            slide, ", ".join(t.key for t in at_scale), key, dev, ", ".join(map(str, files)),
            tile, overlap,
            "" if gain is None else ", stain gain " + "/".join(f"{g:.3f}" for g in gain),
        )  # fmt: skip
        if adapt_norm:
            from omniseg.wsi.adapt import adapt_to_slide

            adapt_to_slide(
                models, metas, [str(f) for f in files], s, mask, float(info["downsample"]),
                table, adapt_norm, dev, tile, only=used,
            )  # fmt: skip
            log.info("adapted the first %d BatchNorm layer(s) of each network", adapt_norm)
        out = predict_scale(
            models, s, at_scale, um, out_h5, tissue_mask_lowres=mask,
            mask_downsample=float(info["downsample"]), tile=tile, overlap=overlap,
            batch_size=batch_size, device=dev, read_tiles=read_tiles, workers=workers,
            progress=progress,
            attrs={"adapt_norm": int(adapt_norm), "stain_gain": gain or [1.0, 1.0, 1.0]},
        )  # fmt: skip
    _log_stats(out)
    return Path(out)


def _log_stats(out_h5: Path) -> None:
    import h5py

    with h5py.File(out_h5, "r") as fh:
        stats = json.loads(fh.attrs.get("stats", "{}"))
    log.info("%s: %s", out_h5, json.dumps(stats))


# -- aggregation ----------------------------------------------------------------------------------
def aggregate_slide(
    prob_h5s: Sequence[str | Path],
    mask_json: str | Path,
    tissues: TissueTable | str | Path,
    out_h5: str | Path,
    *,
    mask_png: str | Path | None = None,
    rules: Mapping | None = None,
    threshold: float = 0.5,
    chunk: int = 1024,
    mask_margin_um: float = MASK_MARGIN_UM,
) -> Path:
    """Aggregate the per-scale probability maps into one level-0 label map (``labels.h5``).

    Args:
        prob_h5s: one :func:`predict_slide` output per scale.
        mask_json: :func:`mask_slide`'s geometry (level-0 shape, mpp, tissue area).
        tissues: the registry.
        out_h5: the label map (see :func:`omniseg.wsi.aggregate.aggregate`).
        mask_png: :func:`mask_slide`'s tissue mask, which limits the labels to tissue (grown by
            ``mask_margin_um``); None: labels everywhere.
        rules: ``{"nested": [[inner, outer], ...], "conflict": "max" | "background"}`` (config);
            None: :data:`omniseg.wsi.aggregate.DEFAULT_RULES`.
        threshold: a tissue claims a pixel where its probability is above it.
        chunk: level-0 chunk edge.
        mask_margin_um: the tissue mask is grown by this much before it limits the labels, so
            that a mask of coarse pixels does not cut objects at the tissue's edge (one pixel of
            the default 4 um mask); more lets the heads label the glass beside the tissue, which
            no training crop showed (12 um on an 8 um mask: Dice after aggregation 1-4 points
            lower for every method on the demo slides).

    Returns:
        ``out_h5``.
    """
    from omniseg.wsi.aggregate import DEFAULT_RULES, aggregate

    info = read_mask_info(mask_json)
    tissue_mask = _grown_mask(mask_png, info, mask_json, mask_margin_um)
    if tissue_mask is not None and not tissue_mask.any():
        log.warning("slide %s: the tissue mask is empty; the label map is empty", info["slide"])
    rules = DEFAULT_RULES if rules is None else dict(rules)
    # labels may fill the grown mask, so per-tissue fractions are of the area it covers
    area_px = (
        int(info["tissue_area_px"])
        if tissue_mask is None
        else _level0_area_px(tissue_mask, float(info["downsample"]))
    )
    out = aggregate(
        [Path(p) for p in prob_h5s],
        as_tissue_table(tissues),
        out_h5,
        level0_shape=tuple(info["level0_shape"]),
        mpp=float(info["mpp"]),
        rules=rules,
        threshold=float(threshold),
        chunk=chunk,
        tissue_area_px=area_px,
        tissue_mask=tissue_mask,
        mask_downsample=float(info["downsample"]),
        mask_margin_um=None if tissue_mask is None else float(mask_margin_um),
    )
    log.info("label map %s (rules %s, threshold %g)", out, json.dumps(rules), threshold)
    return Path(out)


def _label_map_margin(labels_h5: str | Path, margin_um: float | None) -> float:
    """The tissue-mask margin to score ``labels_h5`` with: the one it records, else
    ``margin_um``, else :data:`MASK_MARGIN_UM`.

    Raises:
        ValueError: ``margin_um`` differs from the recorded margin (the raw heads would be
            scored over another area than the label map covers); a label map that
            :func:`omniseg.wsi.export.label_map_info` refuses.
        FileNotFoundError: no label map.
    """
    from omniseg.wsi.export import label_map_info

    recorded = label_map_info(labels_h5).mask_margin_um
    if recorded is None:
        if margin_um is None:
            log.warning(
                "label map %s records no tissue-mask margin (written by an older version): "
                "scoring with %g um",
                labels_h5, MASK_MARGIN_UM,
            )  # fmt: skip
        return MASK_MARGIN_UM if margin_um is None else float(margin_um)
    if margin_um is not None and not math.isclose(float(margin_um), recorded):
        raise ValueError(
            f"label map {labels_h5} was limited to the tissue mask grown by {recorded:g} "
            f"um; scoring it with a margin of {float(margin_um):g} um would score the raw heads "
            "over another area (leave the margin out to use the recorded one)"
        )
    return recorded


def _level0_area_px(mask, downsample: float) -> int:
    """Level-0 pixels covered by a bool mask of ``downsample`` level-0 pixels per pixel."""
    return int(round(float(mask.sum()) * downsample * downsample))


def _grown_mask(mask_png, info: dict, mask_json, margin_um: float):
    """The tissue mask grown by ``margin_um`` (a coarse mask must not cut objects at the tissue's
    edge), or None without a mask."""
    from scipy import ndimage

    if not margin_um >= 0:
        raise ValueError(
            f"mask_margin_um must be >= 0 (um beyond the tissue mask), got {margin_um}"
        )
    if _optional_path(mask_png) is None:
        return None
    mask = _load_mask(mask_png, info, mask_json)
    grow = math.ceil(margin_um / (float(info["downsample"]) * float(info["mpp"])))
    if grow > 0 and mask.any():
        mask = ndimage.binary_dilation(mask, iterations=grow)
    return mask


# -- exports --------------------------------------------------------------------------------------
def export_slide(
    labels_h5: str | Path,
    tissues: TissueTable | str | Path,
    *,
    ome_tif: str | Path,
    overlay_png: str | Path,
    geojson: str | Path,
    areas_csv: str | Path,
    slide: str | Path | None = None,
    mpp: float | None = None,
    max_side: int = 2048,
    object_type: str = "annotation",
) -> dict[str, Path]:
    """Write the files a person opens, all in the slide's level-0 grid.

    Args:
        labels_h5: :func:`aggregate_slide`'s label map.
        tissues: the registry (names and colours); must match the label map's table.
        ome_tif: OME-TIFF label pyramid (QuPath, tifffile).
        overlay_png: slide thumbnail with tissue colours and a legend (white background when
            ``slide`` is None).
        geojson: one classified QuPath annotation per object (level-0 pixel corners).
        areas_csv: per tissue: object count, area (mm^2), fraction of the tissue area.
        slide: the slide, for the overlay's thumbnail.
        mpp: level-0 um/px overriding the slide's metadata.
        max_side: the overlay's longer side (label pixels).
        object_type: QuPath object type of the GeoJSON features (``annotation``, or
            ``detection`` for many objects).

    Returns:
        ``{"ome_tif", "overlay", "geojson", "areas"}`` paths.
    """
    from omniseg.wsi.export import (
        label_map_info,
        labels_to_geojson,
        tissue_areas,
        write_label_pyramid,
        write_overlay,
    )

    table = as_tissue_table(tissues)
    thumbnail = None
    slide = _optional_path(slide)
    if slide is not None:
        from omniseg.wsi.slide import Slide

        h0, w0 = label_map_info(labels_h5).shape
        with Slide(slide, mpp=_optional_mpp(mpp)) as s:
            if tuple(s.dimensions) != (w0, h0):
                raise ValueError(
                    f"label map {labels_h5} is {h0}x{w0}, slide {slide} is "
                    f"{s.dimensions[1]}x{s.dimensions[0]} (rows x cols)"
                )
            thumbnail = s.thumbnail(max_side)
    out = {
        "ome_tif": write_label_pyramid(labels_h5, ome_tif),
        "overlay": write_overlay(
            labels_h5, overlay_png, table, thumbnail=thumbnail, max_side=max_side
        ),
        "geojson": labels_to_geojson(labels_h5, geojson, table, object_type=object_type),
    }
    areas = tissue_areas(labels_h5, areas_csv, table)
    out["areas"] = Path(areas_csv)
    log.info("tissue areas:\n%s", areas.to_string(index=False))
    return out


# -- scoring --------------------------------------------------------------------------------------
def score_slide(
    labels_h5: str | Path,
    truth_h5: str | Path,
    tissues: TissueTable | str | Path,
    out_csv: str | Path,
    *,
    rules: Mapping | None = None,
    prob_h5s: Sequence[str | Path] = (),
    mask_png: str | Path | None = None,
    mask_json: str | Path | None = None,
    threshold: float = 0.5,
    mask_margin_um: float | None = None,
    method: str = "",
    slide: str = "",
):
    """Per-tissue Dice (%) of the label map against the truth aggregated by the same rules, and
    of each raw head before aggregation (with ``prob_h5s``), limited to the grown tissue mask as
    the label map is (with ``mask_png`` and ``mask_json``).

    ``mask_margin_um``: how far the tissue mask is grown; None: the margin the label map
    records (:func:`aggregate_slide`), or :data:`MASK_MARGIN_UM` for a label map that records
    none (written before it did).

    ``method`` and ``slide`` are written as columns (for :func:`make_slide_table`; the slide
    defaults to the label map's folder name).

    Returns:
        The table of :func:`omniseg.wsi.aggregate.score_aggregation`, also in ``out_csv``.
    """
    from omniseg.wsi.aggregate import DEFAULT_RULES, score_aggregation

    rules = DEFAULT_RULES if rules is None else dict(rules)
    mask, downsample = None, None
    if mask_json is not None and _optional_path(mask_png) is not None:
        info = read_mask_info(mask_json)
        margin = _label_map_margin(labels_h5, mask_margin_um)
        mask = _grown_mask(mask_png, info, mask_json, margin)
        downsample = float(info["downsample"])
    df = score_aggregation(
        labels_h5,
        truth_h5,
        as_tissue_table(tissues),
        None,  # written below, with the method and slide columns
        rules,
        prob_h5s=[Path(p) for p in prob_h5s],
        threshold=threshold,
        tissue_mask=mask,
        mask_downsample=downsample,
    )
    df.insert(0, "slide", slide or Path(labels_h5).parent.name)
    df.insert(0, "method", method)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")
    log.info("slide scores %s:\n%s", labels_h5, df.to_string(index=False))
    return df


def make_slide_table(
    score_csvs: Sequence[str | Path],
    tissues: TissueTable | str | Path,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    methods: Sequence[str] | None = None,
):
    """Every method's slide scores, pooled over slides (``slides.csv`` and ``slides.md``); see
    :mod:`omniseg.wsi.tables`."""
    from omniseg.wsi.tables import write_slide_table

    table = write_slide_table(score_csvs, as_tissue_table(tissues), out_csv, out_md, methods)
    log.info("slide table:\n%s", table.round(2).to_string(index=False))
    return table


# -- training data from QuPath annotations --------------------------------------------------------
def default_class_map(tissues: TissueTable | str | Path) -> dict[str, str]:
    """QuPath class name -> tissue key: each tissue's name (as our GeoJSON export writes it) and
    its key."""
    table = as_tissue_table(tissues)
    return {**{t.name: t.key for t in table}, **{t.key: t.key for t in table}}


def import_annotations(
    slide: str | Path,
    geojson: str | Path,
    outdir: str | Path,
    tissues: TissueTable | str | Path,
    *,
    class_map: Mapping[str, str] | None = None,
    patient: str | None = None,
    stain: str = "he",
    roi_size: int = 2048,
    margin_px: int = 256,
) -> Path:
    """Cut 40x ROIs with partial masks around QuPath annotations (``outdir/rois.tsv``).

    ``class_map`` (QuPath class -> tissue key) defaults to :func:`default_class_map`. See
    :func:`omniseg.wsi.qupath.import_qupath` for the other arguments.
    """
    from omniseg.wsi.qupath import import_qupath

    table = as_tissue_table(tissues)
    sheet = import_qupath(
        slide,
        geojson,
        outdir,
        table,
        class_map=dict(class_map) if class_map else default_class_map(table),
        patient=patient,
        stain=stain,
        roi_size=roi_size,
        margin_px=margin_px,
    )
    log.info("QuPath annotations of %s -> sample sheet %s", slide, sheet)
    return Path(sheet)
