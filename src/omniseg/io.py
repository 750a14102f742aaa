"""Small I/O helpers shared by every stage: atomic writes and checked image reading."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

try:  # imagecodecs reads PNG/JPEG fast and is a declared dependency
    import imagecodecs
except ImportError:  # pragma: no cover - declared dependency
    imagecodecs = None


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A crash (or exception) inside the block leaves ``path`` untouched and removes the
    temporary file, so no reader ever sees a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.",
        suffix=suffix if suffix is not None else path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_image(path: str | Path) -> np.ndarray:
    """Read an RGB(A) or grey image as uint8 ``(H, W, 3)`` (alpha dropped, grey repeated).

    Raises:
        ValueError: naming the file if it is missing, unreadable, truncated or not 8-bit.
    """
    arr = _read_any(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image {path} has shape {arr.shape}, expected (H, W, 3|4)")
    if arr.dtype != np.uint8:
        raise ValueError(f"image {path} has dtype {arr.dtype}, expected 8-bit")
    return np.ascontiguousarray(arr[:, :, :3])


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask as bool ``(H, W)``.

    Accepts 0/1 or 0/255 single-channel images and RGB(A) masks whose colour channels agree
    (foreground 255 in RGB, as the public release stores them).

    Raises:
        ValueError: naming the file if it is unreadable or not binary.
    """
    arr = _read_any(path)
    if arr.ndim == 3:
        rgb = arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]
        if not (rgb == rgb[:, :, :1]).all():
            raise ValueError(f"mask {path} is a colour image, expected a binary mask")
        arr = rgb[:, :, 0]
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(str(v) for v in values[:8])
        raise ValueError(
            f"mask {path} is not binary: values {shown}{'...' if values.size > 8 else ''}"
        )
    return arr > 0


def write_png(path: str | Path, arr: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    with atomic_path(path) as tmp:
        if imagecodecs is not None:
            tmp.write_bytes(imagecodecs.png_encode(arr, level=1))
        else:  # pragma: no cover
            import matplotlib.image

            matplotlib.image.imsave(tmp, arr)


def _read_any(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return tifffile.imread(path)
        data = path.read_bytes()
        if imagecodecs is None:  # pragma: no cover
            import matplotlib.image

            return (matplotlib.image.imread(path) * 255).astype(np.uint8)
        decode = _DECODERS.get(suffix)
        return decode(data) if decode else imagecodecs.imread(data)
    except Exception as exc:  # decoder errors have many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"image {path} cannot be read (truncated or corrupt?): {reason}") from exc


_DECODERS = (
    {
        ".png": imagecodecs.png_decode,
        ".jpg": imagecodecs.jpeg8_decode,
        ".jpeg": imagecodecs.jpeg8_decode,
    }
    if imagecodecs is not None
    else {}
)
