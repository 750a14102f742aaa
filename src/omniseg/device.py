"""Compute device selection, mixed precision and CPU thread settings shared by every stage."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

#: Device specs accepted by :func:`select_device` besides ``cuda:N``.
DEVICE_SPECS = ("auto", "cpu", "cuda")


def requested_device(spec: str = "auto") -> str:
    """The device spec a step asked for: ``"auto"`` takes the ``OMNISEG_DEVICE`` environment
    variable when it is set (``cpu``, ``cuda``, ``cuda:1``); any other spec is kept."""
    return os.environ.get("OMNISEG_DEVICE", "auto") if spec == "auto" else spec


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


#: Values of ``OMNISEG_PRECISION``: the compute precision of every stage's network.
PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: Intel AMX tiles, or the
    AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake).

    Without either, CPU bf16 convolutions are emulated and slower than float32. With AVX-512
    BF16 and no AMX, bf16 autocast measured 1.2-1.6x faster per training step for every Table-1
    method and 1.3-2.0x faster inference (`python bench/model.py methods --widths demo --bf16`).
    """
    return any(cpu_bf16_hardware().values())


def cpu_bf16_hardware() -> dict[str, bool]:
    """This CPU's bfloat16 matrix hardware, as PyTorch sees it: ``{"amx": ..., "avx512_bf16":
    ...}`` (a check PyTorch lacks or that fails counts as absent)."""
    cpu = getattr(torch, "cpu", None)
    found = {}
    for key, name in (
        ("amx", "_is_amx_tile_supported"),
        ("avx512_bf16", "_is_avx512_bf16_supported"),
    ):
        check = getattr(cpu, name, None)
        try:
            found[key] = bool(check()) if check is not None else False
        except RuntimeError:
            found[key] = False
    return found


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device``: CUDA with native bf16, or a CPU with
    AMX or AVX-512 BF16 (:func:`cpu_has_bf16_matmul`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_matmul()


def precision(spec: str | None = None) -> str:
    """The precision asked for: ``spec``, else ``OMNISEG_PRECISION`` (unset or empty:
    ``"auto"``).

    Raises:
        ValueError: not one of :data:`PRECISIONS`.
    """
    text = spec if spec is not None else os.environ.get("OMNISEG_PRECISION", "")
    text = str(text).strip().lower() or "auto"
    if text not in PRECISIONS:
        raise ValueError(
            f"precision {text!r} (OMNISEG_PRECISION) is not valid; use {', '.join(PRECISIONS)}"
        )
    return text


def autocast_dtype(device: torch.device, spec: str | None = None) -> torch.dtype | None:
    """bfloat16 where autocast to it is asked for, or ``auto`` and fast (:func:`bf16_supported`);
    None (float32) otherwise.

    ``auto`` keeps float32 on GPUs without bf16 (float16 would need loss scaling) and on CPUs
    without AMX or AVX-512 BF16 (emulated bf16 is slower than float32).
    """
    device = torch.device(device)
    wanted = precision(spec)
    if wanted == "float32" or device.type not in ("cpu", "cuda"):
        return None
    if wanted == "bfloat16" or bf16_supported(device):
        return torch.bfloat16
    return None


def autocast_context(
    device: torch.device, spec: str | None = None
) -> contextlib.AbstractContextManager:
    """bf16 autocast where :func:`autocast_dtype` says so, else a no-op context.

    Losses and metrics run in float32 inside it (the losses cast logits to float).
    """
    device = torch.device(device)
    dtype = autocast_dtype(device, spec)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: Values of ``OMNISEG_CHANNELS_LAST``: the memory layout of every stage's network and batches.
LAYOUTS = {"auto": None, "1": True, "true": True, "on": True, "0": False, "false": False,
           "off": False}  # fmt: skip


def _layout_setting() -> bool | None:
    """``OMNISEG_CHANNELS_LAST`` read: True / False where it forces the layout, None for
    ``auto`` (unset or empty).

    Raises:
        ValueError: none of :data:`LAYOUTS`.
    """
    text = os.environ.get("OMNISEG_CHANNELS_LAST", "").strip().lower() or "auto"
    if text not in LAYOUTS:
        raise ValueError(f"OMNISEG_CHANNELS_LAST={text!r} is not valid; use auto, 1 or 0")
    return LAYOUTS[text]


def use_channels_last(device: torch.device) -> bool:
    """Whether to keep models and batches in channels-last (NHWC) layout on ``device``.

    ``OMNISEG_CHANNELS_LAST`` decides: ``auto`` (unset or empty) uses it on CUDA and on the
    CPU, where oneDNN's convolutions run faster in it (on an AMD EPYC, the demo's networks:
    training steps 1.03-1.43x and inference 1.2-1.8x faster, bf16 and float32;
    ``python bench/model.py methods --widths demo --bf16 --channels-last``); ``1`` / ``0``
    force it. The layout changes only the order of floating-point sums, not what is computed.

    Raises:
        ValueError: ``OMNISEG_CHANNELS_LAST`` is none of :data:`LAYOUTS`.
    """
    forced = _layout_setting()
    if forced is not None:
        return forced
    return torch.device(device).type in ("cpu", "cuda")


#: Input channels below which oneDNN's CPU backward-weights kernel for a strided 1x1 convolution
#: writes past its scratchpad when the source is channels-last (the kernel's channel block: 16
#: with AVX-512, 8 with AVX2): uxlfoundation/oneDNN issue 6035, open, seen in PyTorch 2.13 as
#: heap corruption ("corrupted size vs. prev_size") in ``backward()`` of a width-4 Omni-Seg.
NHWC_1X1_MIN_CHANNELS = 16


def channels_last_for_training(model: torch.nn.Module, device: torch.device) -> bool:
    """:func:`use_channels_last` for training ``model`` on ``device``, with two exceptions on
    the CPU, where the model trains contiguous:

    * a GroupNorm (the paper's norm): its CPU backward pass is slower channels-last, a
      training step 2.2-2.4x slower (Omni-Seg w = 16, 128 px, batches of 4 and 24, bf16; with
      BatchNorm, the demo's, 1.2-1.3x faster);
    * a strided 1x1 convolution of fewer than :data:`NHWC_1X1_MIN_CHANNELS` input channels,
      whose weight gradient oneDNN computes out of bounds channels-last (the demo's widths have
      none; the tests' width-4 networks do).

    Inference keeps :func:`use_channels_last`: it has neither slow backward nor faulty kernel.
    """
    if not use_channels_last(device):
        return False
    if torch.device(device).type != "cpu":
        return True
    reasons = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            reasons.append(
                f"{name} is a GroupNorm, whose CPU backward pass is slower channels-last"
            )
        elif (
            isinstance(m, torch.nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.stride != (1, 1)
            and m.in_channels < NHWC_1X1_MIN_CHANNELS
        ):
            reasons.append(
                f"{name} is a strided 1x1 convolution of fewer than {NHWC_1X1_MIN_CHANNELS} "
                "input channels, whose CPU backward pass corrupts memory channels-last "
                "(oneDNN issue 6035)"
            )
    if reasons and _layout_setting():
        warnings.warn(
            f"OMNISEG_CHANNELS_LAST=1 ignored for training on the CPU: {reasons[0]}",
            stacklevel=2,
        )
    return not reasons


def to_layout(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` (converted in place) in the layout :func:`use_channels_last` picks for
    ``device``."""
    if use_channels_last(device):
        model.to(memory_format=torch.channels_last)
    return model


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
