"""Benchmark of the Omni-Seg network: training and inference throughput, naive variants, roofline.

Prints one JSON object. Default: w = 32, 256 x 256 patches, CPU (and CUDA when available)::

    python bench/model.py [--width 32] [--size 256] [--batch 4 32] [--threads 2]
    python bench/model.py methods [--widths paper|demo] [--threads 1]   # every Table-1 method

Timings are the best of ``--iters`` calls after one warm-up, the variants compared being called
in turn, round by round (the best, not the mean, because the machine may be shared; CPU batches
after the first get one call, no warm-up, to keep the default run short). FLOPs are counted analytically: ``2 * Cin/groups * Cout * k * k * Hout *
Wout`` per Conv2d call (forward hooks), plus the dynamic heads (``2 * (c*c + c*c + 2*c) * H * W``
per head), which run as batched matrix products rather than Conv2d modules. MACs = FLOPs / 2.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from omniseg.device import cpu_bf16_hardware
from omniseg.losses import dice_bce_loss
from omniseg.models import OmniSeg, SegmentationModel, count_parameters
from omniseg.models.omniseg import HEAD_IMPLS, run_heads, run_heads_loop
from omniseg.tissues import load_tissues

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(
    fns: dict[str, Callable[[], object]], device: torch.device, iters: int, warmup: int = 1
) -> dict[str, float]:
    """Best wall time in seconds of each function, calls interleaved round by round so that
    load from other processes hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def conv_flops(model: nn.Module, run: Callable[[], object]) -> int:
    """FLOPs of every Conv2d call made by ``run()`` (2 per multiply-add)."""
    total = 0

    def hook(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * mod.in_channels // mod.groups * k * out.numel()  # numel = B*Cout*Hout*Wout

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return total


def head_flops(c: int, h: int, w: int) -> int:
    """FLOPs of one dynamic head (three 1x1 layers c -> c -> c -> 2) on an h x w map."""
    return 2 * (c * c + c * c + 2 * c) * h * w


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def roofline(device: torch.device, iters: int, dtype: torch.dtype | None) -> dict:
    """GFLOP/s of a 3x3 conv 128 -> 128 on a 4 x 128 x 64 x 64 input (both memory formats)."""
    flops = 2 * 128 * 128 * 9 * 64 * 64 * 4
    x = torch.rand(4, 128, 64, 64, device=device)
    fns = {}
    for name, fmt in FORMATS.items():
        conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device, memory_format=fmt)
        fns[name] = functools.partial(conv, x.to(memory_format=fmt))
    with torch.inference_mode(), autocast(device, dtype):
        times = best_times(fns, device, iters * 3)
    out = {name: flops / t / 1e9 for name, t in times.items()}
    out["best"] = max(out.values())
    return out


def train_step_fn(model: OmniSeg, x, target, tissue, variant: str) -> Callable[[], None]:
    """One SGD step; ``variant``: "batched", "head_loop" (per-sample heads) or "backbone"."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.99, nesterov=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if variant == "backbone":
            features, _ = model.encode(x, tissue)
            logits = features[:, :2]  # same loss cost, no controller / head
        elif variant == "head_loop":
            model.check_input(x, tissue)
            features, bottleneck = model.encode(x, tissue)
            params = model.controller_params(bottleneck, tissue)
            logits = run_heads_loop(features, params[:, None])[:, 0]
        else:
            logits = model(x, tissue)
        dice_bce_loss(logits, target).backward()
        opt.step()

    return step


def bench_heads(
    device: torch.device, size: int, batches: list[int], tissues: int, iters: int
) -> dict:
    """Milliseconds of the heads alone: inference (all tissues, largest batch) and training
    (forward + backward, one head per sample, first batch), per implementation and the loop."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b = max(batches)
    feats = torch.randn(b, 8, size, size, generator=g).to(device)
    params = torch.randn(b, tissues, 162, generator=g).to(device)
    with torch.inference_mode():
        infer = best_times(
            {i: lambda i=i: run_heads(feats, params, i) for i in HEAD_IMPLS}, device, iters
        )
    b = batches[0]
    feats = torch.randn(b, 8, size, size, generator=g).to(device).requires_grad_()
    params = torch.randn(b, 1, 162, generator=g).to(device).requires_grad_()
    fns = {
        i: lambda i=i: run_heads(feats, params, i).square().mean().backward() for i in HEAD_IMPLS
    }
    fns["loop"] = lambda: run_heads_loop(feats, params).square().mean().backward()
    train = best_times(fns, device, iters)
    # Score: slowdown against the fastest, summed over inference and training.
    score = {i: infer[i] / min(infer.values()) + train[i] / min(train.values()) for i in HEAD_IMPLS}
    return {
        "infer_ms": {k: 1e3 * v for k, v in infer.items()},
        "infer_batch": max(batches),
        "train_ms": {k: 1e3 * v for k, v in train.items()},
        "train_batch": batches[0],
        "faster": min(score, key=score.get),
    }


def bench_device(args: argparse.Namespace, device: torch.device, n_tissues: int) -> dict:
    size, w = args.size, args.width
    dtype = torch.bfloat16 if (device.type == "cuda" and args.cuda_bf16) else None
    gpu = device.type == "cuda"
    iters = args.iters * (10 if gpu else 1)
    torch.manual_seed(0)
    model = OmniSeg(num_tissues=n_tissues, width=w).to(device)
    tissues = list(range(n_tissues))
    res: dict = {"autocast": str(dtype) if dtype else None}

    res["roofline_gflops"] = roofline(device, iters, dtype)
    res["heads"] = bench_heads(device, size, args.batch, n_tissues, iters)
    OmniSeg.head_impl = res["heads"]["faster"]
    res["flops"] = flops = flop_table(model, size, n_tissues, device)

    # -- training at the first batch size -------------------------------------------------------
    b = args.batch[0]
    x = torch.rand(b, 3, size, size, device=device)
    target = (torch.rand(b, 1, size, size, device=device) > 0.5).float()
    tissue = torch.arange(b, device=device) % n_tissues
    model.train()
    variants = ("batched", "head_loop", "backbone")
    fns = {v: train_step_fn(model, x, target, tissue, v) for v in variants}
    with autocast(device, dtype):
        t = best_times(fns, device, iters)
    res["train"] = {
        "batch": b,
        "steps_per_s": 1 / t["batched"],
        "s_per_step": t["batched"],
        "achieved_gflops_approx": b * flops["train_step_gflop_per_patch_approx"] / t["batched"],
        "head_loop_throughput_ratio": t["batched"] / t["head_loop"],
        "backbone_only_steps_per_s": 1 / t["backbone"],
        "controller_head_overhead": t["batched"] / t["backbone"] - 1,
        # Less noisy on a shared machine: the heads' own forward + backward time (microbench).
        "head_share_from_microbench": res["heads"]["train_ms"][OmniSeg.head_impl]
        / 1e3
        / t["batched"],
    }

    # -- inference: predict_proba for every tissue, both memory formats ----------------------------
    model.eval()
    models = {name: copy.deepcopy(model).to(memory_format=fmt) for name, fmt in FORMATS.items()}
    infer: dict = {}
    for k, b in enumerate(args.batch):
        xb = torch.rand(b, 3, size, size, device=device)
        fns = {
            name: functools.partial(models[name].predict_proba, xb.to(memory_format=fmt), tissues)
            for name, fmt in FORMATS.items()
        }
        # Large CPU batches take many seconds a call: kernels are warm after the first size.
        big = not gpu and k > 0
        with torch.inference_mode(), autocast(device, dtype):
            t = best_times(fns, device, 1 if big else iters, warmup=0 if big else 1)
        row = {f"{name}_patches_per_s": b / t[name] for name in FORMATS}
        row["best_format"] = min(t, key=t.get)
        row["patches_per_s"] = b / min(t.values())
        infer[str(b)] = row

    # Naive inference: one full forward per tissue (the generic base-class predict_proba), at
    # the first batch size in its faster format; kernels are warm already.
    b = args.batch[0]
    fmt = infer[str(b)]["best_format"]
    xb = torch.rand(b, 3, size, size, device=device).to(memory_format=FORMATS[fmt])
    naive = {"naive": lambda: SegmentationModel.predict_proba(models[fmt], xb, tissues)}
    with torch.inference_mode(), autocast(device, dtype):
        t = best_times(naive, device, max(1, iters // 2), warmup=0)["naive"]
    infer["per_tissue_forward_throughput_ratio"] = (b / t) / infer[str(b)]["patches_per_s"]

    best_b = max(args.batch, key=lambda k: infer[str(k)]["patches_per_s"])
    achieved = infer[str(best_b)]["patches_per_s"] * flops["predict_proba_gflop_per_patch"]
    infer["best_batch"] = best_b
    infer["achieved_gflops"] = achieved
    infer["fraction_of_roofline"] = achieved / res["roofline_gflops"]["best"]
    res["infer"] = infer
    OmniSeg.head_impl = "bmm"
    return res


def flop_table(model: OmniSeg, size: int, n_tissues: int, device: torch.device) -> dict:
    x = torch.rand(1, 3, size, size, device=device)
    tissue = torch.zeros(1, dtype=torch.long, device=device)
    backbone = conv_flops(model, lambda: model.encode(x, tissue))
    with torch.no_grad():
        _, bottleneck = model.encode(x, tissue)
    controller = conv_flops(model, lambda: model.controller_params(bottleneck, tissue))
    head = head_flops(model.head_channels, size, size)
    total = backbone + n_tissues * (controller + head)
    return {
        "backbone_gflop_per_patch": backbone / 1e9,
        "head_gflop_per_patch_per_tissue": (controller + head) / 1e9,
        "predict_proba_gflop_per_patch": total / 1e9,
        "predict_proba_gmac_per_patch": total / 2e9,
        "train_step_gflop_per_patch_approx": 3 * (backbone + controller + head) / 1e9,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument(
        "--batch", type=int, nargs="+", default=[4, 32], help="first is the training batch"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--iters", type=int, default=2, help="timed calls per measurement (x10 on CUDA)")
    p.add_argument("--tissues", default="config/tissues.tsv", help="tissue table (number of heads)")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if available")
    p.add_argument("--cuda-bf16", action="store_true", help="autocast to bfloat16 on CUDA")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_tissues = len(load_tissues(args.tissues)) if Path(args.tissues).is_file() else 6
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    report: dict = {
        "width": args.width,
        "size": args.size,
        "batches": args.batch,
        "threads": args.threads,
        "num_tissues": n_tissues,
        "parameters": count_parameters(OmniSeg(num_tissues=n_tissues, width=args.width)),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    t0 = time.perf_counter()
    for dev in devices:
        device = torch.device(dev)
        report[device.type] = bench_device(args, device, n_tissues)
        if device.type == "cuda":
            report[device.type]["name"] = torch.cuda.get_device_name(device)
    report["bench_seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=1))
    return report


# -- methods: every Table-1 method (issue 4) ---------------------------------------------------
# The cost side of Figure 4: one SGD training step (batch 4, the method's partial-label loss) and
# the parameters of the deployed system (a one-network-per-tissue method counts all its
# networks). main() does not call this section; run it with
#   python -c "import runpy; runpy.run_path('bench/model.py')['methods_main']()" [--widths demo]
# Measured 2026-11-27, 1 thread, 2 shared cores under load (~2x slow; ratios interleaved): paper
# widths, 256^2, s/step (x Omni-Seg): omniseg 9.3 (1), unet w64 36.7 (3.9), deeplabv3 R50 OS8
# 31.3 (3.4), tal 11.1 (1.2), med3d 10.4 (1.1), multiclass 11.3 (1.2).

#: Table-1 method -> (registry name, strategy, one network per tissue, paper kwargs, demo kwargs);
#: the demo kwargs are config/config.yaml's (BatchNorm; Omni-Seg's presence gate and conditioned
#: decoder), the paper's config/paper.yaml's architecture (GroupNorm).
METHODS: dict[str, tuple[str, str, bool, dict, dict]] = {
    "omniseg": (
        "omniseg",
        "binary",
        False,
        {"width": 32},
        {
            "width": 16,
            "norm": "batch",
            "presence": True,
            "decoder_conditioning": True,
            "decoder_code_scale": 10,
            "feature_scale": 0.0078125,
        },
    ),
    "multi_unet": ("unet", "binary", True, {"width": 64}, {"width": 8}),
    "multi_deeplabv3": (
        "deeplabv3",
        "binary",
        True,
        {"depth": 50, "width": 64, "output_stride": 8},
        {"depth": 18, "width": 16, "aspp_channels": 64, "output_stride": 16},
    ),
    "tal": ("multiclass", "tal", False, {"width": 32}, {"width": 16, "norm": "batch"}),
    "med3d": ("multihead", "binary", False, {"width": 32}, {"width": 16, "norm": "batch"}),
    "multiclass": (
        "multiclass",
        "multiclass",
        False,
        {"width": 32},
        {"width": 16, "norm": "batch"},
    ),
}


def bench_methods(
    widths: str = "paper",
    size: int | None = None,
    batch: int = 4,
    iters: int = 2,
    n_tissues: int = 6,
    device: str = "cpu",
    methods: list[str] | None = None,
    bf16: bool = False,
    channels_last: bool = False,
) -> dict:
    """Seconds per training step and parameter counts of each method, steps interleaved.

    Args:
        widths: ``"paper"`` (256 x 256 by default) or ``"demo"`` (128 x 128) kwargs.
        size: patch side (default by ``widths``).
        batch: patches per step (all of tissue 0, as the per-tissue pools give).
        bf16: also time every step under bfloat16 autocast, interleaved with the float32 steps
            (``s_per_step_bf16`` and ``bf16_speedup``: float32 time / bf16 time), and inference
            (``predict_proba`` of ``4 * batch`` patches, three heads) in both precisions.
        channels_last: also time every step (and, with ``bf16``, inference) on a channels-last
            copy of the model and input, interleaved with the contiguous ones: ``*_nhwc``
            times and ``nhwc_speedup`` (contiguous time / channels-last time) per precision.
            Steps run in the layout given, whatever ``OMNISEG_CHANNELS_LAST`` says.
    """
    from omniseg.models import build_model
    from omniseg.partial_labels import loss_for

    size = size or (256 if widths == "paper" else 128)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(dev)
    target = (torch.rand(batch, 1, size, size, generator=g) > 0.7).float().to(dev)
    tissue = torch.zeros(batch, dtype=torch.long, device=dev)
    x_infer = torch.rand(4 * batch, 3, size, size, generator=g).to(dev)
    layouts = {"": torch.contiguous_format}
    if channels_last:
        layouts["_nhwc"] = torch.channels_last
    dtypes = {"": None, "_bf16": torch.bfloat16} if bf16 else {"": None}
    steps, rows = {}, {}
    for method in methods or list(METHODS):
        name, strategy, per_tissue, paper_kw, demo_kw = METHODS[method]
        kwargs = paper_kw if widths == "paper" else demo_kw
        torch.manual_seed(0)
        model = build_model(name, num_tissues=n_tissues, **kwargs).to(dev).train()
        loss_fn = loss_for(strategy)
        for layout, fmt in layouts.items():
            net = copy.deepcopy(model).to(memory_format=fmt)
            opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.99, nesterov=True)
            xs, xi = x.contiguous(memory_format=fmt), x_infer.contiguous(memory_format=fmt)

            def step(net=net, opt=opt, xs=xs, loss_fn=loss_fn, dtype=None) -> None:
                opt.zero_grad(set_to_none=True)
                with autocast(dev, dtype):
                    loss = loss_fn(net, xs, target, tissue)
                loss.backward()
                opt.step()

            def infer(net=net, xi=xi, dtype=None) -> None:  # 4 x batch patches, 3 heads, eval
                net.eval()
                with torch.no_grad(), autocast(dev, dtype):
                    net.predict_proba(xi, [0, 1, min(4, n_tissues - 1)])
                net.train()

            for prec, dtype in dtypes.items():
                steps[f"{method}@step{prec}{layout}"] = functools.partial(step, dtype=dtype)
                if bf16:
                    steps[f"{method}@infer{prec}{layout}"] = functools.partial(infer, dtype=dtype)
        n = count_parameters(model)
        networks = n_tissues if per_tissue else 1
        rows[method] = {
            "model": name,
            "kwargs": kwargs,
            "strategy": strategy,
            "networks": networks,
            "params_per_network": n,
            "params_deployed": n * networks,
        }
    times = best_times(steps, dev, iters)
    for method, row in rows.items():
        t = times[f"{method}@step"]
        if "omniseg@step" in times:
            row["relative_to_omniseg"] = round(t / times["omniseg@step"], 2)
        for layout in layouts:
            row[f"s_per_step{layout}"] = round(times[f"{method}@step{layout}"], 3)
            if bf16:
                step_t, infer_t = times[f"{method}@step{layout}"], times[f"{method}@infer{layout}"]
                row[f"s_per_step_bf16{layout}"] = round(times[f"{method}@step_bf16{layout}"], 3)
                row[f"bf16_speedup{layout}"] = round(
                    step_t / times[f"{method}@step_bf16{layout}"], 2
                )
                row[f"s_inference{layout}"] = round(infer_t, 3)
                row[f"s_inference_bf16{layout}"] = round(times[f"{method}@infer_bf16{layout}"], 3)
                row[f"bf16_inference_speedup{layout}"] = round(
                    infer_t / times[f"{method}@infer_bf16{layout}"], 2
                )
        if channels_last:
            for prec in dtypes:
                for kind in ("step", "infer") if bf16 else ("step",):
                    key = f"{method}@{kind}{prec}"
                    row[f"nhwc_speedup_{kind}{prec}"] = round(times[key] / times[f"{key}_nhwc"], 2)
    return {
        "widths": widths,
        "size": size,
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16_hardware(),
        "methods": rows,
    }


def methods_main(argv: list[str] | None = None) -> dict:
    """Command line of :func:`bench_methods`; prints one JSON object."""
    p = argparse.ArgumentParser(description="training step time and parameters per method")
    p.add_argument("--widths", choices=("paper", "demo"), default="paper")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=4, help="patches per training step")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    p.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast steps")
    p.add_argument(
        "--channels-last", action="store_true", help="also time channels-last models and inputs"
    )
    p.add_argument("--tissues", default="config/tissues.tsv")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_tissues = len(load_tissues(args.tissues)) if Path(args.tissues).is_file() else 6
    report = bench_methods(
        args.widths,
        args.size,
        batch=args.batch,
        iters=args.iters,
        n_tissues=n_tissues,
        device=args.device,
        methods=args.methods,
        bf16=args.bf16,
        channels_last=args.channels_last,
    )
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    # `python bench/model.py [...]`: Omni-Seg; `python bench/model.py methods [...]`: every method
    if len(sys.argv) > 1 and sys.argv[1] == "methods":
        methods_main(sys.argv[2:])
    else:
        main()
