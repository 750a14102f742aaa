"""Trained-model files: everything needed to rebuild a model, loadable with ``weights_only=True``.

A model file is a plain dict of primitives and tensors::

    {"format": FORMAT, "model": {"name", "kwargs"}, "tissues": [registry rows],
     "tissue_fingerprint": str, "omniseg_version": str, "state_dict": {name: tensor}, **extra}

so it can be read with ``torch.load(path, weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniseg import __version__
from omniseg.device import to_layout
from omniseg.io import atomic_path
from omniseg.tissues import TissueTable

FORMAT = "omniseg-model/1"

_RESERVED = ("format", "model", "tissues", "tissue_fingerprint", "state_dict")


def save_model(
    path: str | Path,
    model: torch.nn.Module,
    tissues: TissueTable,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` (weights + how to rebuild it) and its tissue table to ``path`` atomically.

    Args:
        path: output file (``.pt``).
        model: a :class:`omniseg.models.SegmentationModel` (needs ``config()``).
        tissues: the registry the model was trained with.
        extra: metadata (method, epochs, validation Dice, ...): str, int, float, bool, None,
            lists/tuples and str-keyed dicts of those, or tensors.

    Raises:
        ValueError: ``extra`` uses a reserved key or holds a value ``weights_only`` cannot load.
    """
    extra = dict(extra or {})
    clash = sorted(k for k in extra if k in _RESERVED)
    if clash:
        raise ValueError(f"checkpoint {path}: extra metadata may not use reserved key(s) {clash}")
    extra = _plain(extra, f"checkpoint {path}: extra")
    config = _plain(model.config(), f"checkpoint {path}: model config")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "model": config,
        "tissues": tissues.to_records(),
        "tissue_fingerprint": tissues.fingerprint(),
        "omniseg_version": __version__,
        **extra,
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a model file as a dict (``weights_only=True``) and check its format.

    ``mmap=True`` maps the tensors instead of reading them: for a caller that only needs the
    file's metadata (which tissues a model serves), the weights are never read from disk.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file if it is truncated, not a torch file or not our format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # zip, pickle and EOF errors have many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"model checkpoint {path} cannot be read (truncated or not a checkpoint?): {reason}"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"model checkpoint {path} is not an omniseg model file "
            f"(format {found!r}, expected {FORMAT!r})"
        )
    missing = [k for k in ("model", "tissues", "tissue_fingerprint", "state_dict") if k not in data]
    if missing:
        raise ValueError(f"model checkpoint {path} lacks {', '.join(missing)}")
    return data


def load_model(
    path: str | Path, tissues: TissueTable | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a file written by :func:`save_model`.

    Args:
        path: the model file.
        tissues: if given, the file's tissue table must match it (same fingerprint: ids, keys
            and scales).
        device: where to put the model.

    Returns:
        ``(model, meta)``: the model in eval mode on ``device``, in the memory layout
        :func:`~omniseg.device.use_channels_last` picks for it, its
        :attr:`~omniseg.models.registry.SegmentationModel.context` the training patch size
        where the file records it, and every stored entry except
        ``state_dict`` (``meta["tissues"]`` rebuilds the table with
        :meth:`TissueTable.from_records`).

    Raises:
        ValueError: unreadable file, foreign format, unknown architecture, mismatched tissue
            table or weights that do not fit the architecture; the message names the file.
    """
    from omniseg.models import build_model  # models import torch.nn machinery; keep it lazy

    data = read_checkpoint(path)
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    if tissues is not None and data["tissue_fingerprint"] != tissues.fingerprint():
        stored = ", ".join(str(r.get("key")) for r in data["tissues"])
        raise ValueError(
            f"model checkpoint {path} was trained for tissues [{stored}] "
            f"(fingerprint {data['tissue_fingerprint']}), but the tissue table in use is "
            f"[{', '.join(tissues.keys)}] (fingerprint {tissues.fingerprint()})"
        )
    spec = data["model"]
    name = spec.get("name") if isinstance(spec, dict) else None
    try:
        model = build_model(name, **dict(spec.get("kwargs") or {}))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model checkpoint {path}: cannot build model {name!r}: {exc}") from exc
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(
            f"model checkpoint {path}: weights do not fit model {name!r}: {first}"
        ) from exc
    if meta.get("patch_size"):  # pool the training crop's window on larger inputs
        model.context = int(meta["patch_size"])
    model.to(device).eval()
    return to_layout(model, torch.device(device)), meta


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy scalars turned into Python ones; ValueError for anything
    ``torch.load(weights_only=True)`` would reject."""
    if value is None or type(value) in (str, bool, int, float) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if type(k) not in (str, int):
                raise ValueError(f"{where}: key {k!r} is a {type(k).__name__}, expected str")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise ValueError(
        f"{where} holds a {type(value).__name__} ({value!r:.60}); only str, int, float, bool, "
        "None, lists, dicts and tensors can be stored"
    )
