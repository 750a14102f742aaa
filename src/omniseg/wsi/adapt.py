"""Adapt a network's first BatchNorm layers to one slide's stain (AdaBN, Li et al. 2018).

A network trained on ROIs of four stains normalises its first feature maps with statistics
averaged over all of them. A slide stained unlike that average (another lab, another batch of
H&E) shifts those features before any decision is made. Re-estimating the statistics of the
first BatchNorm layers on tiles of the slide itself, with no labels and no weight changed, moves
them back on some networks and not on others: on six synthetic H&E slides, adapting the two
BatchNorm layers of the first block takes the default run's Omni-Seg from 63.1 to 72.8 mean
slide Dice and a seed-1 Omni-Seg from 68.6 to 51.1; Multi U-Net loses on both seeds (README,
"Adapting the first BatchNorm layers to the slide"). An experiment, off by default.

The tiles are drawn uniformly over the slide's tissue mask, at each tissue's scale and in the
network's training patch size, mixed per batch like the training batches (the same number of
tiles of every tissue the network serves); the statistics are their plain average
(``momentum=None``). Only the chosen layers' ``running_mean``/``running_var`` change, and each
adaptation forward stops once all of them have seen the batch: the rest of the network cannot
change their statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

#: Tiles per tissue in one adaptation batch (the training batches' patches per tissue).
TILES_PER_TISSUE = 4
#: Adaptation batches per network: 25 x 4 = 100 tiles of every tissue it serves.
BATCHES = 25


class _AllAdapted(Exception):
    """Raised by a forward hook once every chosen layer has seen the batch."""


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` in the order of :meth:`~torch.nn.Module.modules`
    (construction order: the stem first)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def adapt_batch_norm(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    layers: int,
    name: str = "model",
) -> int:
    """Re-estimate the running statistics of the first ``layers`` BatchNorm layers of ``model``.

    The model runs in eval mode except those layers, which average the batch statistics of
    ``batches`` (``(x, tissue ids)`` as the model's ``forward`` takes them) with equal weight;
    the model is left in eval mode, every parameter and every other buffer unchanged.

    Args:
        model: a segmentation model (``forward(x, tissue)``).
        batches: the adaptation batches (at least one).
        layers: how many BatchNorm layers, from the first; at least 1.
        name: the model's file, for errors.

    Returns:
        the number of batches seen.

    Raises:
        ValueError: ``layers`` < 1, a model with fewer BatchNorm layers (a GroupNorm network has
            none), or no batch.
    """
    norms = batch_norms(model)
    if layers < 1:
        raise ValueError(f"adapt_norm must be >= 1 BatchNorm layer(s), got {layers}")
    if len(norms) < layers:
        raise ValueError(
            f"{name}: adapt_norm {layers} asks for {layers} BatchNorm layer(s), the network has "
            f"{len(norms)} (a GroupNorm network has none to adapt)"
        )
    chosen = norms[:layers]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in chosen]
    model.eval()
    for m in chosen:
        m.reset_running_stats()
        m.momentum = None  # the plain average over the batches
        m.train()
    ran: set[int] = set()

    def stop_when_all_ran(module, args, output):
        ran.add(id(module))
        if len(ran) == len(chosen):
            raise _AllAdapted

    hooks = [m.register_forward_hook(stop_when_all_ran) for m in chosen]
    seen = 0
    try:
        with torch.no_grad():
            for x, ids in batches:
                ran.clear()
                try:  # the rest of the network cannot change the chosen statistics: skip it
                    model(x, ids)
                except _AllAdapted:
                    pass
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for m, (momentum, mean, var) in zip(chosen, saved, strict=True):
            m.momentum = momentum
            m.eval()
            if seen == 0:  # nothing to average: keep the trained statistics
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
    if seen == 0:
        raise ValueError(f"{name}: no tiles to adapt its BatchNorm statistics on")
    return seen


def tissue_positions(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` ``(row, col)`` centres drawn uniformly over the true pixels of ``mask``, each
    jittered uniformly within its pixel (in mask pixels, floats).

    Raises:
        ValueError: a mask without tissue.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the tissue mask holds no tissue: nothing to adapt on")
    pick = rng.integers(0, rows.size, count)
    jitter = rng.uniform(0.0, 1.0, (count, 2))
    return np.stack([rows[pick], cols[pick]], axis=1) + jitter


def slide_batches(
    slide,
    mask: np.ndarray,
    mask_downsample: float,
    tissues: Sequence[tuple[int, float]],
    size: int,
    device: torch.device,
    seed: int = 0,
    batches: int = BATCHES,
    per_tissue: int = TILES_PER_TISSUE,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Adaptation batches from a slide: ``per_tissue`` tiles of every ``(tissue id, um/px)``
    per batch, ``size`` pixels at the tissue's scale, centred on tissue (seeded).

    Args:
        slide: an open :class:`~omniseg.wsi.slide.Slide`.
        mask: the slide's tissue mask; a mask pixel is ``mask_downsample`` level-0 pixels.
        tissues: the network's tissues and their scales.
        size: tile edge at each tissue's scale (the training patch size).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xADA]))
    width0, height0 = slide.dimensions
    for _ in range(batches):
        tiles, ids = [], []
        for tissue, um in tissues:
            edge0 = size * um / slide.mpp  # the tile's edge in level-0 pixels
            for r, c in tissue_positions(mask, per_tissue, rng) * mask_downsample:
                x0 = int(round(min(max(c - edge0 / 2, 0), max(width0 - edge0, 0))))
                y0 = int(round(min(max(r - edge0 / 2, 0), max(height0 - edge0, 0))))
                w0 = min(int(round(edge0)), width0)
                h0 = min(int(round(edge0)), height0)
                tiles.append(slide.read_scaled(x0, y0, w0, h0, um, out_size=(size, size)))
                ids.append(tissue)
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
        yield x.to(device), torch.tensor(ids, dtype=torch.long, device=device)


def adapt_to_slide(
    models,
    metas: Sequence[dict],
    names: Sequence[str],
    slide,
    mask: np.ndarray,
    mask_downsample: float,
    tissues,
    layers: int,
    device: torch.device,
    fallback_size: int,
    only: Iterable[int] | None = None,
    seed: int = 0,
) -> None:
    """Adapt every network of a :class:`~omniseg.inference.TissueModels` to ``slide``
    (:func:`adapt_batch_norm` on :func:`slide_batches` of all the tissues it serves, each at its
    own scale, in its training patch size or ``fallback_size``); ``only``: the indices of the
    networks to adapt (None: all)."""
    by_id = {t.id: t for t in tissues}
    keep = None if only is None else set(only)
    for k, ((model, ids), meta, name) in enumerate(zip(models.entries, metas, names, strict=True)):
        if keep is not None and k not in keep:
            continue
        size = int(meta.get("patch_size") or fallback_size)
        served = [(t, by_id[t].um_per_px) for t in ids]
        adapt_batch_norm(
            model, slide_batches(slide, mask, mask_downsample, served, size, device, seed),
            layers, name,
        )  # fmt: skip
