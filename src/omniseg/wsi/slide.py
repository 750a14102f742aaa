"""Reading whole slides at an exact pixel size: OpenSlide first, plain TIFF/PNG/JPEG otherwise.

Coordinates: every region is given as ``(x, y, w, h)`` in **level-0 pixels** (x = column,
y = row), as OpenSlide does; arrays come back indexed ``(row, col, channel)``. Pixels outside
the slide read as white (255), like OpenSlide's transparent background composited on white.

* Anything OpenSlide opens (vendor formats, generic tiled pyramidal TIFF) is read through it;
  RGBA is composited on white.
* Other images are read with tifffile (TIFF) or imagecodecs (PNG, JPEG): uncompressed contiguous
  TIFFs are memory-mapped (no size limit); anything that must be decoded whole is loaded only
  up to ``max_plain_pixels`` (a clear error beyond: convert it to a tiled pyramid).
* The pixel size comes from the slide's metadata (``openslide.mpp-x``, TIFF resolution tags,
  OME ``PhysicalSizeX``, PNG ``pHYs``) unless ``mpp`` is given, which wins.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import openslide
except ImportError:  # pragma: no cover - declared dependency
    openslide = None

import tifffile

try:
    import imagecodecs
except ImportError:  # pragma: no cover - declared dependency
    imagecodecs = None

from omniseg.resample import area_resize
from omniseg.wsi.stain import apply_lut, check_gain, gain_lut

__all__ = ["Slide", "area_resize"]

#: Plausible pixel sizes (um/px); resolution tags outside it (72 dpi defaults) are ignored.
MPP_RANGE = (0.01, 100.0)


class Slide:
    """A whole-slide image opened for reading (a context manager; also usable after close()).

    Args:
        path: the slide file.
        mpp: level-0 pixel size in um/px; overrides the metadata (``mpp`` of the slide sheet).
        max_plain_pixels: largest image (level-0 pixels) decoded whole into memory when neither
            OpenSlide nor a memory map can read it (beyond it, tiles or strips of at most that
            many pixels are decoded as needed).
        require_mpp: False: a slide without a pixel size opens with ``mpp`` None (the QuPath
            importer checks it only when the file has one).
        od_gain: three factors of each RGB channel's optical density applied to every region
            read, before any resampling (:mod:`omniseg.wsi.stain`); None: pixels as decoded.

    Attributes:
        path: the file.
        mpp: level-0 micrometres per pixel (None only with ``require_mpp=False``).
        backend: ``"openslide"``, ``"memmap"``, ``"segments"`` (a tiled or stripped TIFF too
            large to decode whole: only the tiles or strips a read needs are decoded) or
            ``"memory"``.
        dimensions: level-0 ``(width, height)``.
        level_dimensions: ``(width, height)`` of every level, finest first.
        level_downsamples: level-0 pixels per level pixel, per level.
        od_gain: the three optical-density factors every read goes through (None: none).

    Raises:
        ValueError: naming the file: missing, unreadable or truncated, too large to decode whole,
            or without a pixel size (add ``mpp`` to the slide sheet).
    """

    def __init__(
        self,
        path: str | Path,
        mpp: float | None = None,
        max_plain_pixels: int = 2**31,
        require_mpp: bool = True,
        od_gain: Sequence[float] | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"slide {self.path} does not exist")
        self.od_gain = None if od_gain is None else check_gain(od_gain, f"slide {self.path}")
        self._lut = None if od_gain is None else gain_lut(self.od_gain)
        self._osr = None
        self._array: np.ndarray | None = None
        self._segments: _TiffSegments | None = None
        meta_mpp = None
        os_error = self._try_openslide()
        if self._osr is not None:
            self.backend = "openslide"
            self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
            props = self._osr.properties
            meta_mpp = _plausible(props.get(openslide.PROPERTY_NAME_MPP_X)) or _plausible(
                props.get(openslide.PROPERTY_NAME_MPP_Y)
            )
        else:
            try:
                meta_mpp = self._open_plain(int(max_plain_pixels))
            except ValueError as exc:
                if os_error is None:
                    raise
                raise ValueError(f"{exc}; OpenSlide could not open it either: {os_error}") from exc
            source = self._segments if self._segments is not None else self._array
            self.level_dimensions = ((int(source.shape[1]), int(source.shape[0])),)
            self.level_downsamples = (1.0,)
        self.dimensions = self.level_dimensions[0]
        if mpp is not None:
            value = _plausible(mpp) if not isinstance(mpp, bool) else None
            if value is None:
                self.close()
                raise ValueError(
                    f"slide {self.path}: mpp must be a number of micrometres per pixel in "
                    f"[{MPP_RANGE[0]}, {MPP_RANGE[1]}], got {mpp!r}"
                )
            self.mpp = value
        elif meta_mpp is not None:
            self.mpp = float(meta_mpp)
        elif not require_mpp:
            self.mpp = None
        else:
            self.close()
            raise ValueError(
                f"slide {self.path} has no pixel size in its metadata; add its mpp "
                "(micrometres per pixel at full resolution, 0.25 for 40x) to the slide sheet"
            )

    def _try_openslide(self) -> str | None:
        """Open with OpenSlide if it recognises the file; return its error message if it fails."""
        if openslide is None:
            return None
        try:
            if openslide.OpenSlide.detect_format(str(self.path)) is None:
                return None
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as exc:  # unsupported layout, truncated, corrupt
            return str(exc) or type(exc).__name__
        return None

    # -- plain images ------------------------------------------------------------------------
    def _open_plain(self, cap: int) -> float | None:
        suffix = self.path.suffix.lower()
        if suffix not in (".tif", ".tiff", ".png", ".jpg", ".jpeg"):
            raise ValueError(
                f"slide {self.path}: OpenSlide does not recognise it and it is not a TIFF or "
                "PNG image, nor a JPEG"
            )
        try:
            if suffix == ".png":
                data = self.path.read_bytes()
                w, h, mpp = _png_header(data, self.path)
                self._check_cap(w, h, cap)
                self._array = _rgb(imagecodecs.png_decode(data), self.path)
                self.backend = "memory"
                return mpp
            if suffix in (".jpg", ".jpeg"):  # no pixel size in JPEG: the sheet's mpp gives it
                pixels = imagecodecs.jpeg_decode(self.path.read_bytes())
                self._check_cap(pixels.shape[1], pixels.shape[0], cap)
                self._array = _rgb(pixels, self.path)
                self.backend = "memory"
                return None
            return self._open_tiff(cap)
        except _PlainError as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # decoders raise many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"slide {self.path} cannot be read (truncated or corrupt?): {reason}"
            ) from exc

    def _open_tiff(self, cap: int) -> float | None:
        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            page = series.pages[0] if series.pages else tif.pages[0]
            shape = series.shape
            mpp = _tiff_mpp(tif, page)
            planar = page.planarconfig != 1 and page.samplesperpixel > 1  # (S, H, W) planes
            h, w = _hw(shape[1:] if planar and len(shape) == 3 else shape, self.path)
            size = self.path.stat().st_size
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
            if not ends or max(ends) > size:
                raise _PlainError(
                    f"slide {self.path} is truncated: its image data ends at byte "
                    f"{max(ends, default=0):,}, the file has {size:,} bytes"
                )
            try:
                self._array = _rgb(tifffile.memmap(self.path, series=0, mode="r"), self.path)
                self.backend = "memmap"
                return mpp
            except (ValueError, OSError):
                pass  # compressed or tiled: decode it whole under the cap, else by segments
            if w * h > cap and _TiffSegments.readable(page, cap):
                self._segments = _TiffSegments(self.path)
                self.backend = "segments"
                return mpp
            if w * h > cap and planar:
                raise _PlainError(
                    f"slide {self.path} is {w}x{h} pixels in planar samples (one plane per "
                    f"colour), which can only be decoded whole: too large, over the cap of "
                    f"{cap:,} pixels (max_plain_pixels), and OpenSlide cannot open it"
                )
            self._check_cap(w, h, cap)
            pixels = series.asarray()
            self._array = _rgb(np.moveaxis(pixels, 0, -1) if planar else pixels, self.path)
            self.backend = "memory"
            return mpp

    def _check_cap(self, w: int, h: int, cap: int) -> None:
        if w * h > cap:
            raise _PlainError(
                f"slide {self.path} is a plain {w}x{h} image ({w * h / 1e6:.0f} Mpx) that "
                f"OpenSlide cannot open and that cannot be memory-mapped; decoding it whole "
                f"exceeds the cap of {cap:,} pixels (max_plain_pixels). Convert it to a "
                "tiled pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid "
                "--compression jpeg`) or an uncompressed TIFF"
            )

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        if self._segments is not None:
            self._segments.close()
            self._segments = None
        self._array = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h}, mpp={self.mpp}, {self.backend})"

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Pixel size (um/px) of ``level``."""
        return self.mpp * self.level_downsamples[level]

    # -- reading -------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``level``; ``(x, y)`` is the top-left in LEVEL-0 pixels.

        ``w`` and ``h`` are in pixels of ``level``. Outside the slide reads white. With
        ``od_gain``, the pixels come through its lookup table.

        Raises:
            ValueError: naming the file when the data cannot be decoded (truncated file).
        """
        rgb = self._read_region(x, y, w, h, level)
        return rgb if self._lut is None else apply_lut(rgb, self._lut)

    def _read_region(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        x, y, w, h, level = int(x), int(y), int(w), int(h), int(level)
        if w < 0 or h < 0:
            raise ValueError(f"slide {self.path}: region size must be >= 0, got {w}x{h}")
        if not 0 <= level < self.level_count:
            raise ValueError(
                f"slide {self.path}: level {level} does not exist (0..{self.level_count - 1})"
            )
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, np.uint8)
        if self._osr is not None:
            try:
                rgba = np.asarray(self._osr.read_region((x, y), level, (w, h)))
            except openslide.OpenSlideError as exc:
                raise ValueError(
                    f"slide {self.path}: cannot read region x={x} y={y} {w}x{h} at level "
                    f"{level} (truncated or corrupt?): {exc}"
                ) from exc
            return _composite_white(rgba)
        source = self._segments if self._segments is not None else self._array
        if source is None:
            raise ValueError(f"slide {self.path} is closed")
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = source.shape[:2]
        r0, r1, c0, c1 = max(0, y), min(H, y + h), max(0, x), min(W, x + w)
        if r0 < r1 and c0 < c1:
            try:
                out[r0 - y : r1 - y, c0 - x : c1 - x] = source[r0:r1, c0:c1]
            except OSError as exc:  # a memory-mapped file that was truncated under us
                raise ValueError(f"slide {self.path}: cannot read pixels: {exc}") from exc
        return out

    def best_level(self, um_per_px: float) -> int:
        """The coarsest level whose pixel size is still <= ``um_per_px`` (level 0 if none)."""
        best = 0
        for k in range(self.level_count):
            if self.level_mpp(k) <= um_per_px * (1 + 1e-6):
                best = k
        return best

    def read_scaled(
        self,
        x0: int,
        y0: int,
        w0: int,
        h0: int,
        um_per_px: float,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """A level-0 region resampled to exactly ``um_per_px``.

        Reads the coarsest level that is at least as fine as the target (:meth:`best_level`)
        and area-averages it to the target (bilinear if the target is finer than level 0).

        Args:
            x0, y0: top-left of the region in level-0 pixels (col, row).
            w0, h0: region size in level-0 pixels.
            um_per_px: output pixel size.
            out_size: output ``(width, height)``; default ``round(w0 * mpp / um_per_px)`` etc.

        Returns:
            RGB uint8 ``(out_h, out_w, 3)``.
        """
        if not um_per_px > 0:
            raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
        scale = self.mpp / um_per_px  # output pixels per level-0 pixel
        if out_size is None:
            out_w, out_h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        else:
            out_w, out_h = (int(v) for v in out_size)
        level = self.best_level(um_per_px)
        ds = _clean(self.level_downsamples[level])
        lw, lh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        region = self.read_region(x0, y0, lw, lh, level)
        return area_resize(region, out_h, out_w)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide, RGB uint8, its longer side ``max_side`` pixels (aspect kept)."""
        w0, h0 = self.dimensions
        um = self.mpp * max(w0, h0) / max_side
        return self.read_scaled_whole(um)

    def scaled_size(self, um_per_px: float) -> tuple[int, int]:
        """``(width, height)`` of the whole slide at ``um_per_px``: ``ceil(level-0 size / f)``."""
        f = um_per_px / self.mpp
        w0, h0 = self.dimensions
        return max(1, math.ceil(w0 / f - 1e-9)), max(1, math.ceil(h0 / f - 1e-9))

    def read_scaled_whole(self, um_per_px: float, band_pixels: int = 2**24) -> np.ndarray:
        """The whole slide at ``um_per_px`` (``scaled_size``), read in bands of rows.

        Each band reads at most about ``band_pixels`` pixels of the source level, so memory
        stays bounded by the output plus one band.
        """
        out_w, out_h = self.scaled_size(um_per_px)
        f = um_per_px / self.mpp  # level-0 pixels per output pixel
        level = self.best_level(um_per_px)
        ds = _clean(self.level_downsamples[level])
        src_w = out_w * f / ds
        rows = max(1, int(band_pixels / max(1.0, src_w) / max(1.0, f / ds)))
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r in range(0, out_h, rows):
            n = min(rows, out_h - r)
            y0 = round(r * f)
            y1 = round((r + n) * f)
            out[r : r + n] = self.read_scaled(
                0, y0, round(out_w * f), y1 - y0, um_per_px, out_size=(out_w, n)
            )
        return out


# -- helpers ----------------------------------------------------------------------------------
class _TiffSegments:
    """Level 0 of a TIFF that is neither memory-mappable nor small enough to decode whole,
    read by decoding only the tiles or strips a window needs (each at most ``cap`` pixels).

    Indexing ``[r0:r1, c0:c1]`` (in-bounds slices) returns RGB uint8, like an array.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tif = tifffile.TiffFile(path)
        self._page = self._tif.series[0].levels[0].keyframe
        self.shape = (int(self._page.imagelength), int(self._page.imagewidth), 3)

    @staticmethod
    def readable(page, cap: int) -> bool:
        """Whether ``page`` is chunked in interleaved 8-bit segments of at most ``cap`` pixels."""
        if page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4):
            return False
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            return False
        if page.is_tiled:
            segment = int(page.tilelength) * int(page.tilewidth)
        else:
            segment = int(page.rowsperstrip or page.imagelength) * int(page.imagewidth)
        return segment <= cap

    def close(self) -> None:
        self._tif.close()

    def __getitem__(self, window: tuple[slice, slice]) -> np.ndarray:
        rows, cols = window
        y, x = rows.start, cols.start
        h, w = rows.stop - y, cols.stop - x
        page, fh = self._page, self._tif.filehandle
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
            across = -(-self.shape[1] // tw)
            index = [r * across + c for r in range(y // th, (y + h - 1) // th + 1)
                     for c in range(x // tw, (x + w - 1) // tw + 1)]  # fmt: skip
        else:
            rps = int(page.rowsperstrip or self.shape[0])
            index = list(range(y // rps, (y + h - 1) // rps + 1))
        out = np.full((h, w, page.samplesperpixel), 255, np.uint8)
        for i in index:
            offset, count = page.dataoffsets[i], page.databytecounts[i]
            if not count:
                continue
            fh.seek(offset)
            try:
                seg, pos, _ = page.decode(fh.read(count), i, jpegtables=page.jpegtables)
            except Exception as exc:
                raise ValueError(
                    f"slide {self.path}: segment {i} cannot be decoded: {exc}"
                ) from exc
            if seg is None:
                continue
            seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)
            r0, c0 = int(pos[-3]), int(pos[-2])
            rr0, rr1 = max(r0, y), min(r0 + seg.shape[0], y + h)
            cc0, cc1 = max(c0, x), min(c0 + seg.shape[1], x + w)
            if rr1 > rr0 and cc1 > cc0:
                out[rr0 - y : rr1 - y, cc0 - x : cc1 - x] = seg[
                    rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0
                ]
        return np.ascontiguousarray(_rgb(out, self.path))


class _PlainError(Exception):
    """A problem of a plain image found by our own checks (re-raised as ValueError)."""


def _clean(ds: float) -> float:
    """Snap a level downsample within 1% of an integer (odd level sizes) to that integer."""
    r = round(ds)
    return float(r) if r >= 1 and abs(ds - r) < 0.01 * r else ds


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """Non-premultiplied RGBA uint8 -> RGB uint8 on a white background."""
    rgb = rgba[:, :, :3]
    a = rgba[:, :, 3:4]
    if a.min() == 255:
        return np.ascontiguousarray(rgb)
    a = a.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _plausible(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1] else None


def _hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4)):
        return int(shape[0]), int(shape[1])
    raise ValueError(f"slide {path} has shape {shape}, expected (H, W), (H, W, 3) or (H, W, 4)")


def _rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    """A view (no copy for memory maps) of the image as (H, W, 3) uint8 when possible."""
    if arr.dtype != np.uint8:
        raise ValueError(f"slide {path} has dtype {arr.dtype}, expected 8-bit RGB")
    if arr.ndim == 2:
        return np.broadcast_to(arr[:, :, None], (*arr.shape, 3))
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.broadcast_to(arr, (*arr.shape[:2], 3))
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return arr[:, :, :3]
    raise ValueError(f"slide {path} has shape {arr.shape}, expected an RGB(A) or grey image")


def _tiff_mpp(tif: tifffile.TiffFile, page) -> float | None:
    """um/px from OME ``PhysicalSizeX`` or the resolution tags (cm or inch), if plausible."""
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if m and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            v = _plausible(m.group(1))
            if v:
                return v
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    if not num or not den:
        return None
    per_unit = num / den
    unit = int(tags["ResolutionUnit"].value)
    if unit == 3:  # centimetre
        return _plausible(1e4 / per_unit)
    if unit == 2:  # inch
        return _plausible(25400 / per_unit)
    return None


def _png_header(data: bytes, path: Path) -> tuple[int, int, float | None]:
    """``(width, height, mpp)`` from a PNG's IHDR and pHYs chunks (no pixel is decoded)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33:
        raise ValueError(f"slide {path} is not a PNG file (bad signature or truncated)")
    w, h = struct.unpack(">II", data[16:24])
    mpp = None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"pHYs" and length == 9:
            ppx, _ppy, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            if unit == 1 and ppx:  # pixels per metre
                mpp = _plausible(1e6 / ppx)
        if kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return int(w), int(h), mpp
