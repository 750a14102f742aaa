"""Benchmark of whole-slide segmentation: throughput, naive ratio, forwards per area, memory.

Synthesises two slides of 4x different area (``--size``, then twice each side), runs each
through the whole-slide path (tissue mask -> tiled prediction at every scale of the tissue table
-> aggregation into ``labels.h5``) in its own subprocess, and prints one JSON object::

    python bench/wsi.py [--model model.pt] [--kwargs JSON] [--width 16] [--context 128]
                        [--size 1536x2304] [--threads 2] [--device cpu] [--out result.json]

Reported, per slide (``slides``):

* ``throughput_tissue_mp_per_s``: megapixels of tissue at 40x (level-0 pixels inside the tissue
  mask) per second, end to end (mask + prediction + aggregation, slide opened to labels.h5);
* the split: ``mask_s``, per scale ``read_s`` (reader threads, overlapped with inference),
  ``read_wait_s`` (main thread waiting for a read), ``infer_s``, ``write_s``; ``aggregate_s``;
* ``forwards_256``: backbone forward passes in 256 x 256-equivalents (tiles x tile^2 / 256^2)
  and ``forwards_per_mp`` / ``forwards_per_mm2`` of tissue (target <= 30 per MP, all tissues;
  the public Omni-Seg slide pipeline spends ~450);
* ``peak_rss_mb``: peak resident memory of the subprocess (``getrusage``), and its RSS after
  imports, model construction and one full batch per scale (``baseline_rss_mb``).

On the smaller slide, in the same subprocess: a naive variant (one full forward per tissue per
tile, same tiles) and ``naive_ratio`` = its prediction time / ours; the conv roofline
(GFLOP/s of a 3x3 conv 128 -> 128 on 4 x 128 x 64 x 64) and ``achieved_fraction`` = model
GFLOP/s during prediction / roofline (model FLOPs counted with torch's FlopCounterMode).
``memory_ratio`` = peak RSS of the large slide / the small one (flat means ~1).

Weights do not matter for speed: unless ``--model`` is given, an untrained Omni-Seg is built
with the demo config's keyword arguments (``methods.omniseg.kwargs`` of ``config/config.yaml``:
its tissue-conditioned decoder runs once per tissue of a scale, which ``forwards_256``, a count
of tiles through the encoder, does not show; the FLOP count does), ``--kwargs '{}'`` builds the
paper's network, ``--width`` overrides the width of either.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- child: one slide ------------------------------------------------------------------------
def child(args: argparse.Namespace) -> dict:
    import h5py
    import torch

    from omniseg.device import select_device
    from omniseg.inference import predict_scale
    from omniseg.models import build_model
    from omniseg.tissues import load_tissues
    from omniseg.wsi.aggregate import aggregate
    from omniseg.wsi.slide import Slide
    from omniseg.wsi.tissue_mask import slide_tissue_mask

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    tissues = load_tissues(args.tissues)
    if args.model:
        from omniseg.checkpoint import load_model

        model, _ = load_model(args.model, tissues, device)
    else:
        torch.manual_seed(0)
        model = build_model("omniseg", num_tissues=len(tissues), **untrained_kwargs(args))
        model.to(device).eval()
        # what load_model sets from a checkpoint: the heads of a tile larger than this come
        # from the window of this size around each block
        model.context = args.context or None
    # one full batch per scale first: peak memory then reflects the slide, not whether the
    # slide has enough tiles to fill a batch (and first-call set-up leaves the timings)
    with torch.inference_mode():
        x = torch.zeros(args.batch_size, 3, args.tile, args.tile, device=device)
        for um in tissues.scales:
            model.predict_proba(x, [t.id for t in tissues.at_scale(um)])
    baseline = _rss_mb()
    work = Path(args.work)
    result: dict = {"slide": args.child, "device": str(device)}

    def run(variant_model, tag: str) -> dict:
        t0 = time.perf_counter()
        with Slide(args.child) as slide:
            mask, ds = slide_tissue_mask(slide, um_per_px=args.mask_um)
            t_mask = time.perf_counter() - t0
            tissue_px = float(mask.sum()) * ds * ds
            scales = {}
            files = []
            for um in tissues.scales:
                out = work / f"{tag}_{um:g}.h5"
                predict_scale(
                    variant_model,
                    slide,
                    tissues.at_scale(um),
                    um,
                    out,
                    tissue_mask_lowres=mask,
                    mask_downsample=ds,
                    tile=args.tile,
                    overlap=args.overlap,
                    batch_size=args.batch_size,
                    device=device,
                    read_tiles=args.read_tiles,
                    workers=args.workers,
                    progress=False,
                )
                with h5py.File(out, "r") as fh:
                    scales[f"{um:g}"] = json.loads(fh.attrs["stats"])
                files.append(out)
            t_pred = time.perf_counter() - t0 - t_mask
            t1 = time.perf_counter()
            if tag == "ours":
                w0, h0 = slide.dimensions
                aggregate(
                    files,
                    tissues,
                    work / "labels.h5",
                    level0_shape=(h0, w0),
                    mpp=slide.mpp,
                    tissue_area_px=int(tissue_px),
                )
            t_agg = time.perf_counter() - t1
            mpp = slide.mpp
        total = time.perf_counter() - t0
        eq = (args.tile / 256) ** 2
        heads = {f"{um:g}": len(tissues.at_scale(um)) for um in tissues.scales}
        per_tissue = tag == "naive"
        fwd = sum(
            s["tiles_predicted"] * eq * (heads[k] if per_tissue else 1) for k, s in scales.items()
        )
        mp = tissue_px / 1e6
        return {
            "tissue_mp": round(mp, 3),
            "tissue_mm2": round(tissue_px * mpp**2 / 1e6, 4),
            "mask_s": round(t_mask, 3),
            "predict_s": round(t_pred, 3),
            "aggregate_s": round(t_agg, 3),
            "total_s": round(total, 3),
            "throughput_tissue_mp_per_s": round(mp / total, 4) if total else None,
            "forwards_256": round(fwd, 1),
            "forwards_per_mp": round(fwd / mp, 2) if mp else None,
            "forwards_per_mm2": round(fwd / (tissue_px * mpp**2 / 1e6), 1) if mp else None,
            "scales": scales,
        }

    result["ours"] = run(model, "ours")
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["baseline_rss_mb"] = round(baseline, 1)
    if args.naive:
        # naive, then ours again: the machine may be shared, so each variant's best run counts
        naive = run(NaivePerTissue(model), "naive")
        again = run(model, "again")
        result["naive"] = naive
        best = min(result["ours"]["predict_s"], again["predict_s"])
        result["naive_ratio"] = round(naive["predict_s"] / best, 3)

        def infer(r):
            return sum(s["infer_s"] for s in r["scales"].values())

        result["naive_infer_ratio"] = round(
            infer(naive) / min(infer(result["ours"]), infer(again)), 3
        )
        result.update(roofline(model, tissues, device, args))
    return result


def untrained_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of the untrained Omni-Seg: ``--kwargs`` (JSON) or the demo config's,
    with ``--width`` over either."""
    if args.kwargs:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise SystemExit(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    else:
        import yaml

        config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
        kwargs = dict(config["methods"]["omniseg"].get("kwargs") or {})
    if args.width:
        kwargs["width"] = args.width
    return kwargs


class NaivePerTissue:
    """One full forward (backbone + head) per tissue per tile, as the public pipeline does."""

    def __init__(self, model):
        self.model = model
        self.size_multiple = getattr(model, "size_multiple", 1)

    def predict_proba(self, x, ids):
        import torch

        b = x.shape[0]
        out = [
            self.model(x, torch.full((b,), int(i), dtype=torch.long, device=x.device)).softmax(1)[
                :, 1
            ]
            for i in ids
        ]
        return torch.stack(out, 1)


def roofline(model, tissues, device, args) -> dict:
    """Conv roofline GFLOP/s and the model's achieved fraction during prediction."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from omniseg.device import autocast_context

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device).eval()
    x = torch.rand(4, 128, 64, 64, device=device)
    flops = 2 * 4 * 64 * 64 * 128 * 128 * 9
    best = float("inf")
    with torch.inference_mode(), autocast_context(device):
        conv(x)
        sync()
        for _ in range(5):
            t0 = time.perf_counter()
            conv(x)
            sync()
            best = min(best, time.perf_counter() - t0)
    peak = flops / best / 1e9
    # model FLOPs per tile at each scale (backbone once + that scale's heads)
    per_tile = {}
    tile = torch.rand(1, 3, args.tile, args.tile, device=device)
    for um in tissues.scales:
        ids = [t.id for t in tissues.at_scale(um)]
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            model.predict_proba(tile, ids)
        per_tile[f"{um:g}"] = fc.get_total_flops()
    return {
        "conv_roofline_gflops": round(peak, 2),
        "model_gflop_per_tile": {k: round(v / 1e9, 3) for k, v in per_tile.items()},
    }


# -- parent ----------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="trained model file (default: untrained)")
    ap.add_argument(
        "--kwargs",
        default="",
        help="JSON keyword arguments of the untrained Omni-Seg (default: the demo config's; "
        "'{}': the paper's network)",
    )
    ap.add_argument("--width", type=int, default=0, help="width of the untrained model")
    ap.add_argument(
        "--context",
        type=int,
        default=128,
        help="training patch size of the untrained model: the window its controller pools on "
        "larger tiles (0: the whole tile)",
    )
    ap.add_argument("--size", default="1536x2304", help="smaller slide, HxW level-0 pixels")
    ap.add_argument("--strips", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="reader threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--read-tiles", type=int, default=4)
    ap.add_argument("--mask-um", type=float, default=8.0)
    ap.add_argument("--tissues", default=str(ROOT / "config" / "tissues.tsv"))
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    ap.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}

    import torch

    from omniseg.synthetic.slide import synthesize_slide
    from omniseg.tissues import load_tissues

    h, w = (int(v) for v in args.size.lower().split("x"))
    tissues = load_tissues(args.tissues)
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "kwargs",
                "width",
                "context",
                "model",
                "tile",
                "overlap",
                "batch_size",
                "read_tiles",
                "workers",
                "device",
                "mask_um",
            )
        },
        "slides": [],
    }
    if not args.model:
        result["settings"]["model_kwargs"] = untrained_kwargs(args)
    if args.device.startswith("cuda") and torch.cuda.is_available():
        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="bench_wsi_") as tmp:
        tmp = Path(tmp)
        for k, (sh, sw) in enumerate([(h, w), (2 * h, 2 * w)]):
            t0 = time.perf_counter()
            paths = synthesize_slide(
                tmp / f"slide{k}.tif",
                tissues,
                seed=k,
                height=sh,
                width=sw,
                strips=args.strips,
                focus=("cap", "ves"),
            )
            synth_s = time.perf_counter() - t0
            work = tmp / f"work{k}"
            work.mkdir()
            cmd = [sys.executable, __file__, "--child", str(paths["slide"]), "--work", str(work)]
            for name in (
                "model",
                "kwargs",
                "width",
                "context",
                "threads",
                "workers",
                "device",
                "tile",
                "overlap",
                "batch_size",
                "read_tiles",
                "mask_um",
                "tissues",
            ):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if k == 0:
                cmd.append("--naive")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"benchmark child failed on {paths['slide']}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["level0_shape"] = [sh, sw]
            res["synth_s"] = round(synth_s, 2)
            result["slides"].append(res)
    small, large = result["slides"]
    ours = small["ours"]
    infer_s = sum(s["infer_s"] for s in ours["scales"].values())
    flops = sum(
        small["model_gflop_per_tile"][k] * s["tiles_predicted"] for k, s in ours["scales"].items()
    )
    achieved = flops / infer_s if infer_s else None
    read_s = sum(s["read_s"] for s in ours["scales"].values())
    wait_s = sum(s["read_wait_s"] for s in ours["scales"].values())
    result["summary"] = {
        "throughput_tissue_mp_per_s": ours["throughput_tissue_mp_per_s"],
        "forwards_per_mp": ours["forwards_per_mp"],
        "forwards_per_mm2": ours["forwards_per_mm2"],
        "naive_forwards_per_mp": small["naive"]["forwards_per_mp"],
        "naive_ratio": small["naive_ratio"],
        "naive_infer_ratio": small["naive_infer_ratio"],
        "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
        "tissue_mp": [small["ours"]["tissue_mp"], large["ours"]["tissue_mp"]],
        "memory_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "conv_roofline_gflops": small["conv_roofline_gflops"],
        "achieved_gflops": round(achieved, 2) if achieved else None,
        "achieved_fraction": round(achieved / small["conv_roofline_gflops"], 3)
        if achieved
        else None,
        "split_s": {
            "mask": ours["mask_s"],
            "read_busy": round(read_s, 3),
            "read_wait": round(wait_s, 3),
            "infer": round(infer_s, 3),
            "write_prob": round(sum(s["write_s"] for s in ours["scales"].values()), 3),
            "aggregate": ours["aggregate_s"],
            "total": ours["total_s"],
        },
        "bottleneck": "inference" if infer_s >= max(read_s, wait_s) else "reading",
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
