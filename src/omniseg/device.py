"""Compute device selection, mixed precision and CPU thread settings shared by every stage."""

from __future__ import annotations

import contextlib

import torch

#: Device specs accepted by :func:`select_device` besides ``cuda:N``.
DEVICE_SPECS = ("auto", "cpu", "cuda")


def select_device(spec: str = "auto") -> torch.device:
    """Turn a device spec from the config or command line into a :class:`torch.device`.

    Args:
        spec: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        RuntimeError: CUDA was asked for but is not available, or ``N`` is not a visible GPU.
        ValueError: the spec is none of the above.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            device = torch.device(text)
        except RuntimeError:
            raise ValueError(
                f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N"
            ) from None
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {spec!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                "use device 'cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {spec!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
        return device
    raise ValueError(f"device {spec!r} is not valid; use auto, cpu, cuda or cuda:N")


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is worth using on ``device`` (CUDA with native bf16 only)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it; a no-op context elsewhere.

    CPU runs stay in float32: CPU autocast is slower than float32 for these convolutions and
    float16 on GPUs without bf16 would need loss scaling.
    """
    device = torch.device(device)
    if bf16_supported(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(device: torch.device) -> bool:
    """Whether to keep 4-D tensors in channels-last layout (faster convolutions on CUDA)."""
    return torch.device(device).type == "cuda"


def configure_threads(threads: int) -> None:
    """Use ``threads`` intra-op CPU threads (and up to 4 inter-op threads).

    The inter-op pool can be sized only once per process, before any parallel work; later
    calls keep the first size.

    Raises:
        ValueError: ``threads`` is not a positive integer.
    """
    if int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(int(threads))
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(min(int(threads), 4))
