"""Tiled prediction of a whole slide at one scale: backbone once per tile, every head at once.

:func:`predict_scale` covers the slide, resampled to one tissue scale, with a grid of
overlapping tiles (:func:`tile_grid`), skips tiles without tissue (they are never read), reads
*blocks* of ``read_tiles x read_tiles`` tiles as few large regions in background threads while
the model runs, batches tiles to the device, runs ``model.predict_proba(batch, ids)`` (the
backbone once, all heads of that scale as one batched op) and blends overlapping tiles with a
weight window (:func:`blend_window`). Probabilities stream into a chunked HDF5 file; memory is
bounded by a few blocks and one carry strip, never by the slide.

Coordinates: the *scale grid* is the slide resampled to ``um_per_px``, ``(rows, cols)`` =
``ceil(level-0 size / f)`` with ``f = um_per_px / mpp`` level-0 pixels per scale pixel; scale pixel
``(r, c)`` covers level-0 pixels ``[r f, (r + 1) f) x [c f, (c + 1) f)``. Tile origins are
``(row, col)`` in the scale grid.

Output file (``out_h5``): datasets ``prob/{key}`` (uint8 ``(rows, cols)`` of the scale grid,
``round(255 p)``, 0 where no tile was predicted; chunked, gzip) and the attributes ``um_per_px``,
``mpp`` (level 0), ``factor`` (``f``), ``level0_shape`` ``(rows, cols)``, ``shape`` (scale grid),
``tissues`` (JSON list of keys), ``tissue_ids``, ``tile``, ``overlap``, ``stats`` (JSON: tile counts,
reads, seconds spent reading / waiting for reads / in the model / writing).

Blocks and carries: block ``(I, J)`` owns tiles ``I*k .. I*k+k-1`` x ``J*k ..`` (``k = read_tiles``)
and covers ``L = k * stride + overlap`` pixels from ``(I, J) * k * stride``. Its accumulators
(sum of ``w p`` per tissue and sum of ``w``) are complete once its own tiles are added and the
contributions of the blocks above and to the left are carried in; it then writes its
``k * stride`` square of normalised probabilities and hands its right and bottom ``overlap``
strips on. This is exact (the same result as one slide-sized accumulator) as long as
``overlap <= k * stride``.
"""

from __future__ import annotations

import collections
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from omniseg.device import autocast_context, select_device, use_channels_last
from omniseg.io import atomic_path
from omniseg.tissues import Tissue

__all__ = [
    "TissueModels",
    "blend_window",
    "predict_scale",
    "tile_grid",
    "tile_rectangles",
    "tiles_with_tissue",
]

PROB_GROUP = "prob"


# -- pure geometry ---------------------------------------------------------------------------
def _check_tile(tile: int, overlap: int) -> int:
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    return int(tile) - int(overlap)


def grid_count(n: int, tile: int, overlap: int) -> int:
    """Tiles along one axis of length ``n``: ``1 + ceil((n - tile) / stride)`` (1 if ``n <= tile``)."""
    stride = _check_tile(tile, overlap)
    return 1 if n <= tile else 1 + math.ceil((n - tile) / stride)


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Origins ``(row, col)`` of tiles covering a ``height x width`` image, row-major.

    Tiles are ``tile x tile`` at a regular stride ``tile - overlap``; the last row/column of
    tiles may reach past the image (the caller pads), so every pixel is covered and adjacent
    tiles always overlap by exactly ``overlap``.
    """
    stride = _check_tile(tile, overlap)
    nr, nc = grid_count(height, tile, overlap), grid_count(width, tile, overlap)
    return [(i * stride, j * stride) for i in range(nr) for j in range(nc)]


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Blending weights ``(tile, tile)`` float32: 1 inside, linear ramps over ``overlap`` pixels
    at every edge, > 0 everywhere.

    Along one axis ``w(i) = min(1, (i + 0.5) / overlap, (tile - i - 0.5) / overlap)``; the ramps
    of two neighbours at stride ``tile - overlap`` sum to 1, so blending is a partition of unity.
    """
    _check_tile(tile, overlap)
    i = np.arange(tile, dtype=np.float64)
    if overlap == 0:
        w = np.ones(tile)
    else:
        w = np.minimum(1.0, np.minimum(i + 0.5, tile - i - 0.5) / overlap)
    return np.outer(w, w).astype(np.float32)


def tiles_with_tissue(
    mask: np.ndarray | None,
    downsample: float | tuple[float, float],
    n_rows: int,
    n_cols: int,
    tile: int,
    stride: int,
    factor: float,
) -> np.ndarray:
    """Which tiles of a grid contain any tissue of a low-resolution mask.

    Args:
        mask: bool ``(h, w)``, mask pixel ``(i, j)`` covers level-0 ``[i d, (i+1) d)``; None:
            every tile.
        downsample: ``d`` (level-0 pixels per mask pixel), or ``(d_rows, d_cols)``.
        n_rows, n_cols: tile grid size.
        tile, stride: tile edge and stride in scale pixels.
        factor: level-0 pixels per scale pixel.

    Returns:
        bool ``(n_rows, n_cols)``.
    """
    if mask is None:
        return np.ones((n_rows, n_cols), bool)
    dy, dx = (downsample, downsample) if np.isscalar(downsample) else downsample
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(n, d, size):
        start = np.arange(n) * stride * factor
        lo = np.clip(np.floor(start / d), 0, size).astype(np.int64)
        hi = np.clip(np.ceil((start + tile * factor) / d), 0, size).astype(np.int64)
        return lo, hi

    r0, r1 = bounds(n_rows, dy, h)
    c0, c1 = bounds(n_cols, dx, w)
    total = (
        integral[r1[:, None], c1[None, :]]
        - integral[r0[:, None], c1[None, :]]
        - integral[r1[:, None], c0[None, :]]
        + integral[r0[:, None], c0[None, :]]
    )
    return total > 0


def tile_rectangles(need: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Cover the True cells of a small bool grid exactly with few rectangles.

    Runs of consecutive True cells per row are merged with identical runs of the rows below.

    Returns:
        ``(i0, i1, j0, j1)`` half-open index ranges, disjoint, covering exactly ``need``.
    """
    rects = []
    open_: dict[tuple[int, int], int] = {}
    n = need.shape[0]
    for i in range(n + 1):
        runs: list[tuple[int, int]] = []
        if i < n:
            row = np.concatenate([[False], need[i], [False]]).astype(np.int8)
            edges = np.flatnonzero(np.diff(row))
            runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
        still = {}
        for run in runs:
            still[run] = open_.pop(run, i)
        rects += [(i0, i, j0, j1) for (j0, j1), i0 in open_.items()]
        open_ = still
    return rects


# -- several networks as one predictor ----------------------------------------------------------
class TissueModels:
    """Several networks that together predict a set of tissues, with one ``predict_proba``.

    A single-network method is one entry serving every tissue; a per-tissue method (Multi U-Net,
    Multi DeepLabV3) is one network per tissue. Each tile is given to every network that serves
    a requested tissue, once, and the probabilities are laid out in the order asked for.

    Args:
        entries: ``(model, tissue ids it serves)`` pairs; a tissue id may appear only once.
    """

    def __init__(self, entries: Sequence[tuple[torch.nn.Module, Sequence[int]]]):
        self.entries = [(m, [int(t) for t in ids]) for m, ids in entries]
        self.owner: dict[int, int] = {}
        for k, (_, ids) in enumerate(self.entries):
            for t in ids:
                if t in self.owner:
                    raise ValueError(f"tissue id {t} is served by two networks")
                self.owner[t] = k
        self.size_multiple = math.lcm(
            *(int(getattr(m, "size_multiple", 1) or 1) for m, _ in self.entries), 1
        )

    def predict_proba(self, x: torch.Tensor, tissues: Sequence[int]) -> torch.Tensor:
        """``x`` ``(B, 3, H, W)`` in [0, 1] -> ``(B, T, H, W)`` probabilities, ``tissues`` order."""
        tissues = [int(t) for t in tissues]
        missing = [t for t in tissues if t not in self.owner]
        if missing:
            raise ValueError(f"no network serves tissue id(s) {missing}")
        out = x.new_empty((x.shape[0], len(tissues), *x.shape[2:]))
        for k, (model, _) in enumerate(self.entries):
            pos = [i for i, t in enumerate(tissues) if self.owner[t] == k]
            if pos:
                p = model.predict_proba(x, [tissues[i] for i in pos])
                out[:, pos] = p.to(out.dtype)
        return out


# -- prediction ------------------------------------------------------------------------------
@dataclass
class _Stats:
    tiles_total: int = 0
    tiles_predicted: int = 0
    blocks: int = 0
    reads: int = 0
    read_px: int = 0
    read_s: float = 0.0  # summed over reader threads
    read_wait_s: float = 0.0  # main thread blocked on reads
    infer_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    batches: int = 0


@dataclass
class _Block:
    key: tuple[int, int]
    tiles: list[tuple[int, int]]  # grid indices (i, j) with tissue
    done: int = 0
    acc: np.ndarray | None = None  # (T + 1, L, L): sum w p per tissue, then sum w


def predict_scale(
    model: torch.nn.Module,
    slide,
    tissues_at_scale: Sequence[Tissue],
    um_per_px: float,
    out_h5: str | Path,
    *,
    tissue_mask_lowres: np.ndarray | None,
    mask_downsample: float | tuple[float, float] | None,
    tile: int = 256,
    overlap: int = 32,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    read_tiles: int = 4,
    workers: int = 2,
    progress: bool = True,
    attrs: Mapping[str, object] | None = None,
) -> Path:
    """Predict every tissue of one scale over a slide into ``out_h5`` (see the module doc).

    Args:
        model: a segmentation model with ``predict_proba(x (B, 3, H, W) in [0, 1], ids) ->
            (B, T, H, W)``, in eval mode, on ``device``.
        slide: an open :class:`~omniseg.wsi.slide.Slide`.
        tissues_at_scale: the tissues to predict, all with ``um_per_px`` as their scale.
        um_per_px: the scale.
        out_h5: output file (written atomically).
        tissue_mask_lowres: bool tissue mask of the whole slide, or None to predict everywhere.
        mask_downsample: level-0 pixels per mask pixel (or ``(rows, cols)``); None: derived from
            the slide and mask shapes.
        tile: tile edge in scale pixels (a multiple of the model's ``size_multiple``).
        overlap: overlap of neighbouring tiles, blended with :func:`blend_window`.
        batch_size: tiles per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``...
        read_tiles: a block of ``read_tiles x read_tiles`` tiles is read as few large regions.
        workers: reader threads (reading overlaps inference).
        progress: show a tqdm bar.
        attrs: more file attributes (the caller's provenance, e.g. ``adapt_norm``).

    Returns:
        ``out_h5``.

    Raises:
        ValueError: tissues of another scale, a tile size the model cannot take, bad overlap.
    """
    t_start = time.perf_counter()
    tissues = list(tissues_at_scale)
    stride = _check_scale_args(model, tissues, um_per_px, tile, overlap, read_tiles, batch_size,
                               workers)  # fmt: skip
    adv = read_tiles * stride
    device = select_device(str(device)) if not isinstance(device, torch.device) else device

    factor = um_per_px / slide.mpp
    ws, hs = slide.scaled_size(um_per_px)
    nr, nc = grid_count(hs, tile, overlap), grid_count(ws, tile, overlap)
    if tissue_mask_lowres is not None and mask_downsample is None:
        w0, h0 = slide.dimensions
        mh, mw = tissue_mask_lowres.shape
        mask_downsample = (h0 / mh, w0 / mw)
    need = tiles_with_tissue(tissue_mask_lowres, mask_downsample, nr, nc, tile, stride, factor)
    nbr, nbc = math.ceil(nr / read_tiles), math.ceil(nc / read_tiles)
    stats = _Stats(tiles_total=nr * nc, tiles_predicted=int(need.sum()), blocks=nbr * nbc)
    if not need.any():
        warnings.warn(
            f"slide {slide.path}: no tissue tile at {um_per_px} um/px; writing empty "
            "probability maps",
            stacklevel=2,
        )

    ids = [t.id for t in tissues]
    window = blend_window(tile, overlap)
    chunk = _chunk_edge(adv)
    out_h5 = Path(out_h5)
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as fh:
        dsets = [
            fh.create_dataset(f"{PROB_GROUP}/{t.key}", shape=(hs, ws), dtype=np.uint8,
                              chunks=(min(chunk, hs), min(chunk, ws)), compression="gzip",
                              compression_opts=1, fillvalue=0)
            for t in tissues
        ]  # fmt: skip
        fh.attrs.update(
            um_per_px=float(um_per_px),
            mpp=float(slide.mpp),
            factor=float(factor),
            level0_shape=np.asarray(slide.dimensions[::-1], np.int64),
            shape=np.asarray((hs, ws), np.int64),
            tissues=json.dumps([t.key for t in tissues]),
            tissue_ids=np.asarray(ids, np.int64),
            tile=int(tile),
            overlap=int(overlap),
            slide=str(slide.path),
        )
        fh.attrs.update(dict(attrs or {}))
        writer = _Writer(dsets, hs, ws, len(tissues), adv, overlap, nbr, nbc, stats)
        blocks = _blocks(need, read_tiles)
        reader = _read_blocks(
            slide, blocks, um_per_px, factor, tile, stride, read_tiles, workers, stats
        )
        bar = _bar(progress, stats.tiles_predicted, f"{um_per_px:g} um/px")
        try:
            _run(model, reader, blocks, writer, ids, window, tile, stride, read_tiles, batch_size,
                 device, stats, bar)  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        stats.total_s = time.perf_counter() - t_start
        fh.attrs["stats"] = json.dumps(_stats_dict(stats))
    return out_h5


def _check_scale_args(model, tissues, um_per_px, tile, overlap, read_tiles, batch_size,
                      workers) -> int:  # fmt: skip
    """Check :func:`predict_scale`'s arguments; returns the tile stride."""
    if not tissues:
        raise ValueError("predict_scale needs at least one tissue")
    off = [t.key for t in tissues if abs(t.um_per_px - um_per_px) > 1e-9]
    if off:
        raise ValueError(f"tissue(s) {off} are not segmented at {um_per_px} um/px")
    stride = _check_tile(tile, overlap)
    multiple = int(getattr(model, "size_multiple", 1) or 1)
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of {multiple}, which the model needs")
    if read_tiles < 1 or batch_size < 1 or workers < 1:
        raise ValueError("read_tiles, batch_size and workers must be >= 1")
    adv = read_tiles * stride
    if overlap > adv:
        raise ValueError(f"overlap {overlap} must be <= read_tiles * (tile - overlap) = {adv}")
    return stride


def _chunk_edge(adv: int) -> int:
    """HDF5 chunk edge: the block advance when it is moderate, else a divisor of it."""
    if adv <= 1024:
        return adv
    for c in range(1024, 255, -1):
        if adv % c == 0:
            return c
    return 512


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"tiles at {desc}", unit="tile")


def _stats_dict(s: _Stats) -> dict:
    return {
        "tiles_total": s.tiles_total,
        "tiles_predicted": s.tiles_predicted,
        "blocks": s.blocks,
        "reads": s.reads,
        "read_px": s.read_px,
        "read_s": round(s.read_s, 4),
        "read_wait_s": round(s.read_wait_s, 4),
        "infer_s": round(s.infer_s, 4),
        "write_s": round(s.write_s, 4),
        "total_s": round(s.total_s, 4),
        "batches": s.batches,
    }


def _blocks(need: np.ndarray, k: int) -> list[_Block]:
    nr, nc = need.shape
    out = []
    for bi in range(math.ceil(nr / k)):
        for bj in range(math.ceil(nc / k)):
            sub = need[bi * k : (bi + 1) * k, bj * k : (bj + 1) * k]
            ii, jj = np.nonzero(sub)
            out.append(
                _Block((bi, bj), [(bi * k + i, bj * k + j) for i, j in zip(ii, jj, strict=True)])
            )
    return out


def _read_blocks(slide, blocks, um, factor, tile, stride, k, workers, stats) -> Iterator:
    """Yield ``(block, [(grid index, tile uint8 (tile, tile, 3)), ...])`` in block order; reads
    run ahead in a thread pool (at most ``2 * workers`` blocks in flight)."""

    def read(block: _Block):
        t0 = time.perf_counter()
        bi, bj = block.key
        need = np.zeros((k, k), bool)
        for i, j in block.tiles:
            need[i - bi * k, j - bj * k] = True
        out = []
        n_reads = n_px = 0
        for i0, i1, j0, j1 in tile_rectangles(need):
            r_s, c_s = (bi * k + i0) * stride, (bj * k + j0) * stride
            h_s, w_s = (i1 - i0 - 1) * stride + tile, (j1 - j0 - 1) * stride + tile
            x0, y0 = round(c_s * factor), round(r_s * factor)
            w0, h0 = round((c_s + w_s) * factor) - x0, round((r_s + h_s) * factor) - y0
            region = slide.read_scaled(x0, y0, w0, h0, um, out_size=(w_s, h_s))
            n_reads += 1
            n_px += w_s * h_s
            for i in range(i0, i1):
                for j in range(j0, j1):
                    r, c = (i - i0) * stride, (j - j0) * stride
                    out.append(((bi * k + i, bj * k + j), region[r : r + tile, c : c + tile]))
        return out, n_reads, n_px, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slide-read") as pool:
        pending: collections.deque[tuple[_Block, Future | None]] = collections.deque()
        it = iter(blocks)
        ahead = 2 * workers

        def fill():
            while len(pending) < ahead:
                b = next(it, None)
                if b is None:
                    return
                pending.append((b, pool.submit(read, b) if b.tiles else None))

        fill()
        while pending:
            block, fut = pending.popleft()
            fill()
            if fut is None:
                yield block, []
                continue
            t0 = time.perf_counter()
            tiles, n_reads, n_px, dt = fut.result()
            stats.read_wait_s += time.perf_counter() - t0
            stats.reads += n_reads
            stats.read_px += n_px
            stats.read_s += dt
            yield block, tiles


def _run(
    model, reader, blocks, writer, ids, window, tile, stride, k, batch_size, device, stats, bar
) -> None:
    """Batch tiles from the reader through the model, accumulate, finalise blocks in order."""
    by_key = {b.key: b for b in blocks}
    order = collections.deque(blocks)
    batch: list[tuple[tuple[int, int], np.ndarray]] = []
    window_t = window[None]  # (1, tile, tile)
    cuda = device.type == "cuda"
    channels_last = use_channels_last(device)
    n_t = len(ids)
    L = k * stride + (tile - stride)

    def flush():
        if not batch:
            return
        t0 = time.perf_counter()
        arr = np.stack([t for _, t in batch])  # (B, tile, tile, 3) uint8
        x = torch.from_numpy(arr)
        if cuda:
            x = x.pin_memory().to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast_context(device):
            p = model.predict_proba(x, ids)
        p = p.float().cpu().numpy()  # (B, T, tile, tile)
        stats.infer_s += time.perf_counter() - t0
        stats.batches += 1
        for (gi, gj), prob in zip((g for g, _ in batch), p, strict=True):
            b = by_key[(gi // k, gj // k)]
            if b.acc is None:
                b.acc = np.zeros((n_t + 1, L, L), np.float32)
            r, c = (gi - b.key[0] * k) * stride, (gj - b.key[1] * k) * stride
            b.acc[:n_t, r : r + tile, c : c + tile] += prob * window_t
            b.acc[n_t, r : r + tile, c : c + tile] += window
            b.done += 1
        if bar is not None:
            bar.update(len(batch))
        batch.clear()
        finish()

    def finish():
        while order and order[0].done == len(order[0].tiles):
            writer.finalize(order.popleft())

    for _block, tiles in reader:
        for g, t in tiles:
            batch.append((g, t))
            if len(batch) >= batch_size:
                flush()
        finish()
    flush()
    finish()
    if order:  # pragma: no cover - every block is finalised above
        raise RuntimeError(f"{len(order)} block(s) were not finalised")


class _Writer:
    """Adds carries to finished blocks, writes their owned square, hands on their edges."""

    def __init__(self, dsets, hs, ws, n_t, adv, ov, nbr, nbc, stats):
        self.dsets, self.hs, self.ws, self.n_t = dsets, hs, ws, n_t
        self.adv, self.ov, self.nbr, self.nbc, self.stats = adv, ov, nbr, nbc, stats
        self.L = adv + ov
        self.width = nbc * adv + ov
        self.top: np.ndarray | None = None  # (T + 1, ov, width) carried from the band above
        self.next_top: np.ndarray | None = None
        self.left: np.ndarray | None = None  # (T + 1, L, ov) carried from the block on the left

    def finalize(self, block: _Block) -> None:
        t0 = time.perf_counter()
        bi, bj = block.key
        adv, ov, L = self.adv, self.ov, self.L
        if bj == 0:  # a new band: the previous band's bottom strip becomes the top carry
            self.top, self.next_top = self.next_top, None
            self.left = None
        acc = block.acc
        c0 = bj * adv
        if ov:
            skip = ov if bj > 0 else 0  # those columns arrive with the left carry
            if self.top is not None and self.top[:, :, c0 + skip : c0 + L].any():
                acc = self._buf(block)
                acc[:, :ov, skip:] += self.top[:, :, c0 + skip : c0 + L]
            if self.left is not None:
                acc = self._buf(block)
                acc[:, :, :ov] += self.left
        last_r, last_c = bi == self.nbr - 1, bj == self.nbc - 1
        if acc is not None:
            own_r = L if last_r else adv
            own_c = L if last_c else adv
            self._write(acc, bi * adv, c0, own_r, own_c)
            if ov:
                self.left = None if last_c else acc[:, :, adv:].copy()
                if not last_r:
                    if self.next_top is None:
                        self.next_top = np.zeros((self.n_t + 1, ov, self.width), np.float32)
                    self.next_top[:, :, c0 : c0 + own_c] = acc[:, adv:, :own_c]
        else:
            self.left = None
        block.acc = None
        self.stats.write_s += time.perf_counter() - t0

    def _buf(self, block: _Block) -> np.ndarray:
        if block.acc is None:
            block.acc = np.zeros((self.n_t + 1, self.L, self.L), np.float32)
        return block.acc

    def _write(self, acc: np.ndarray, r0: int, c0: int, nr: int, nc: int) -> None:
        nr, nc = min(nr, self.hs - r0), min(nc, self.ws - c0)
        if nr <= 0 or nc <= 0:
            return
        w = acc[self.n_t, :nr, :nc]
        if not w.any():
            return
        inv = np.divide(1.0, w, out=np.zeros_like(w), where=w > 0)
        for t, dset in enumerate(self.dsets):
            p = acc[t, :nr, :nc] * inv
            dset[r0 : r0 + nr, c0 : c0 + nc] = np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)
