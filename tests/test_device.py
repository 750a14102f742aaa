"""Device selection, autocast and thread settings."""

from __future__ import annotations

import pytest
import torch

import omniseg.device as device_mod
from omniseg.device import (
    autocast_context,
    autocast_dtype,
    channels_last_for_training,
    configure_threads,
    select_device,
    to_layout,
    use_channels_last,
)


def test_cpu_and_auto():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device().type == expected


def test_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_requested_without_cuda(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*'cpu' or 'auto'"):
        select_device(spec)


def test_cuda_index_beyond_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="only 1 CUDA device"):
        select_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", ""])
def test_bad_spec(spec):
    with pytest.raises(ValueError, match="not valid; use auto, cpu, cuda or cuda:N"):
        select_device(spec)


@pytest.mark.parametrize(
    ("amx", "env", "spec", "expected"),
    [
        (False, None, None, torch.float32),  # auto on a CPU without AMX: float32
        (True, "float32", None, torch.float32),  # asked for float32
        (True, None, None, torch.bfloat16),  # auto on a CPU with AMX
        (False, None, "bfloat16", torch.bfloat16),  # asked for by argument
        (False, "bfloat16", None, torch.bfloat16),  # asked for by OMNISEG_PRECISION
    ],
)
def test_cpu_precision(monkeypatch, amx, env, spec, expected):
    if env is None:
        monkeypatch.delenv("OMNISEG_PRECISION", raising=False)
    else:
        monkeypatch.setenv("OMNISEG_PRECISION", env)
    monkeypatch.setattr(device_mod, "cpu_has_bf16_matmul", lambda: amx)
    a = torch.randn(8, 8)
    with autocast_context(torch.device("cpu"), spec):
        assert (a @ a).dtype == expected
    bf16 = expected == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), spec) == (torch.bfloat16 if bf16 else None)


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        (None, "cpu", True),  # oneDNN's convolutions are faster channels-last
        ("", "cpu", True),
        ("auto", "cuda", True),
        ("0", "cpu", False),
        ("off", "cuda", False),
        ("1", "cpu", True),
        ("TRUE", "meta", True),
        (None, "meta", False),  # neither CPU nor CUDA: left as it is
    ],
)
def test_channels_last_by_device_and_variable(monkeypatch, env, device, expected):
    if env is None:
        monkeypatch.delenv("OMNISEG_CHANNELS_LAST", raising=False)
    else:
        monkeypatch.setenv("OMNISEG_CHANNELS_LAST", env)
    assert use_channels_last(torch.device(device)) is expected


def test_to_layout_converts_in_place_and_a_bad_layout_names_the_variable(monkeypatch):
    conv = torch.nn.Conv2d(3, 4, 3)
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "0")
    assert to_layout(conv, torch.device("cpu")) is conv and conv.weight.is_contiguous()
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "1")
    assert to_layout(conv, torch.device("cpu")) is conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "nhwc")
    with pytest.raises(ValueError, match="OMNISEG_CHANNELS_LAST='nhwc' is not valid"):
        use_channels_last(torch.device("cpu"))


@pytest.mark.parametrize(
    ("c_in", "stride", "device", "env", "expected"),
    [
        (16, 2, "cpu", None, True),  # the demo's narrowest strided 1x1 (width 16)
        (4, 1, "cpu", None, True),  # unstrided: not the faulty kernel
        (4, 2, "cpu", None, False),  # oneDNN issue 6035: trains contiguous
        (4, 2, "cpu", "1", False),  # even when forced (with a warning)
        (4, 2, "cuda", None, True),  # cuDNN: not affected
        (16, 2, "cpu", "0", False),
    ],
)
def test_channels_last_for_training_avoids_onednns_strided_1x1_bug(
    monkeypatch, c_in, stride, device, env, expected
):
    if env is None:
        monkeypatch.delenv("OMNISEG_CHANNELS_LAST", raising=False)
    else:
        monkeypatch.setenv("OMNISEG_CHANNELS_LAST", env)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, c_in, 3, padding=1), torch.nn.Conv2d(c_in, 32, 1, stride=stride)
    )
    if env == "1" and not expected:
        with pytest.warns(UserWarning, match=r"ignored for training on the CPU: 1 is a strided"):
            assert channels_last_for_training(model, torch.device(device)) is expected
    else:
        assert channels_last_for_training(model, torch.device(device)) is expected


def test_a_groupnorm_model_trains_contiguous_on_the_cpu(monkeypatch):
    """GroupNorm's CPU backward pass is slower channels-last; cuDNN's is not."""
    monkeypatch.delenv("OMNISEG_CHANNELS_LAST", raising=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.GroupNorm(4, 16))
    assert not channels_last_for_training(model, torch.device("cpu"))
    assert channels_last_for_training(model, torch.device("cuda"))
    assert use_channels_last(torch.device("cpu"))  # inference keeps the layout
    model[1] = torch.nn.BatchNorm2d(16)
    assert channels_last_for_training(model, torch.device("cpu"))


def test_bad_precision_names_the_variable(monkeypatch):
    monkeypatch.setenv("OMNISEG_PRECISION", "fp8")
    with pytest.raises(ValueError, match="precision 'fp8' \\(OMNISEG_PRECISION\\) is not valid"):
        autocast_context(torch.device("cpu"))


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        configure_threads(1)
        assert torch.get_num_threads() == 1
        configure_threads(2)  # the inter-op pool is fixed by now: must not raise
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            configure_threads(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_cuda():
    device = select_device("cuda")
    a = torch.randn(16, 16, device=device)
    with autocast_context(device):
        out = a @ a
    assert out.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    assert use_channels_last(device)


def test_requested_device_reads_omniseg_device_only_for_auto(monkeypatch):
    from omniseg.device import requested_device

    monkeypatch.delenv("OMNISEG_DEVICE", raising=False)
    assert requested_device("auto") == "auto"
    monkeypatch.setenv("OMNISEG_DEVICE", "cpu")
    assert requested_device("auto") == "cpu" and requested_device() == "cpu"
    assert requested_device("cuda:1") == "cuda:1"  # an explicit choice wins over the variable


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_bf16_hardware_is_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert device_mod.cpu_has_bf16_matmul() is expected
    assert device_mod.cpu_bf16_hardware() == {"amx": amx, "avx512_bf16": avx512_bf16}


def test_bf16_hardware_check_that_fails_counts_as_absent(monkeypatch):
    def broken():
        raise RuntimeError("cpuinfo unavailable")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert device_mod.cpu_has_bf16_matmul() is False
