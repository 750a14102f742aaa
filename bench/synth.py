"""Benchmark of the synthetic renderer: ROIs per second at 40x on one core.

Prints one JSON object: ``s_per_roi`` (wall clock, rendering only), ``cpu_s_per_roi`` (process
CPU time, less sensitive to other load on the machine), ``write_s_per_roi`` (PNG + truth
writing), per-focus timings, and ``rois_per_s``.

    python bench/synth.py --n 12 --size 2048
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as in the pipeline's demo budget
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from omniseg.io import write_png  # noqa: E402
from omniseg.synthetic.cohort import STAINS, render_tissue, save_truth  # noqa: E402
from omniseg.tissues import load_tissues  # noqa: E402


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="ROIs to render (cycling foci and stains)")
    ap.add_argument("--size", type=int, default=2048, help="ROI edge, pixels at 40x")
    ap.add_argument("--tissues", default=str(root / "config" / "tissues.tsv"))
    args = ap.parse_args()

    tissues = load_tissues(args.tissues)
    keys = tissues.keys
    render_tissue(np.random.default_rng(0), (256, 256), "he", tissues, focus=keys[0])  # warm-up
    wall, cpu, write = [], [], []
    by_focus: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            focus, stain = keys[i % len(keys)], STAINS[i % len(STAINS)]
            t0, c0 = time.perf_counter(), time.process_time()
            image, masks = render_tissue(
                np.random.default_rng(i), (args.size, args.size), stain, tissues, focus=focus
            )
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            by_focus.setdefault(focus, []).append(wall[-1])
            t0 = time.perf_counter()
            write_png(Path(tmp) / "image.png", image)
            write_png(Path(tmp) / "mask.png", masks[focus].astype(np.uint8) * 255)
            save_truth(Path(tmp) / "truth.npz", masks)
            write.append(time.perf_counter() - t0)
    result = {
        "roi_size": args.size,
        "n": args.n,
        "s_per_roi": round(float(np.mean(wall)), 4),
        "cpu_s_per_roi": round(float(np.mean(cpu)), 4),
        "max_s_per_roi": round(float(np.max(wall)), 4),
        "write_s_per_roi": round(float(np.mean(write)), 4),
        "rois_per_s": round(1.0 / float(np.mean(wall)), 3),
        "s_per_roi_by_focus": {k: round(float(np.mean(v)), 4) for k, v in by_focus.items()},
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
