"""The targets of the default demo run, checked on its results: slide floors and Omni-Seg's lead.

Reads a finished default run (``snakemake --cores all``) and prints one JSON object:

* ``slide_floors``: per tissue, the Dice (%) after aggregation of the exported slide method
  (``--slide-method``; default: ``wsi.method`` of ``config/config.yaml``) on the demo slides
  (``results/tables/slides.csv``, pixels pooled over slides) against its floor, and
  ``omniseg_slide_floors``, the same for Omni-Seg's map;
* ``omniseg_vs_baselines``: Omni-Seg's mean test Dice against the best baseline's (Table 1 and
  the slide table), which it must reach within ``--margin`` points;
* ``omniseg_above_trivial``: per tissue, Omni-Seg's test Dice against the best trivial answer
  (every pixel foreground, or none) on the same test patches, and its mean over the tissues,
  which must be 10 points above the trivial answers' mean.

Exit status 1 when a target is missed, so it can gate a run; it is a measurement of training
outcomes, not a test (CI checks a lower bar, ``tests/test_demo_results.py``)::

    python bench/demo_checks.py results [--method omniseg] [--slide-method multi_unet]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch

#: Dice (%) after aggregation on the demo slides, per tissue (issue: "the complete-label map").
SLIDE_FLOORS = {"dt": 70, "pt": 80, "cap": 80, "tuft": 80, "ves": 60, "ptc": 40}

REPO = Path(__file__).resolve().parents[1]


def exported_method(config: Path = REPO / "config" / "config.yaml") -> str:
    """``wsi.method`` of the demo config: the method whose slide maps the demo exports."""
    return str((yaml.safe_load(config.read_text()).get("wsi") or {}).get("method", "omniseg"))


def floors_of(table: pd.DataFrame, method: str) -> dict:
    """Per tissue: ``method``'s Dice after aggregation against its floor (tissues it lacks left
    out)."""
    floors = {}
    for key, floor in SLIDE_FLOORS.items():
        if (method, key) in table.index:
            dice = float(table.loc[(method, key), "dice"])
            floors[key] = {"dice": round(dice, 2), "floor": floor, "met": dice >= floor}
    return floors


def trivial_dice(results: Path, tissue: str) -> float:
    """Mean Dice of the best trivial answer on the test patches: all foreground or all empty."""
    masks = read_patch_set(results / "patches" / f"{tissue}.h5", split="test")["masks"] > 0
    full = dice_batch(np.ones_like(masks), masks).mean()
    empty = dice_batch(np.zeros_like(masks), masks).mean()
    return float(max(full, empty))


def check(
    results: Path, method: str = "omniseg", margin: float = 1.0, slide_method: str | None = None
) -> dict:
    slide_method = slide_method or method
    report: dict = {"results": str(results), "method": method, "slide_method": slide_method}
    ok = True
    slides = results / "tables" / "slides.csv"
    if slides.is_file():
        t = pd.read_csv(slides).set_index(["method", "tissue"])
        scored = list(dict.fromkeys(t.index.get_level_values("method")))
        if slide_method not in scored:
            raise ValueError(
                f"{slides}: the slide method {slide_method!r} is not in the slide table "
                f"(scored: {', '.join(scored)})"
            )
        report["slide_floors"] = floors_of(t, slide_method)
        ok &= all(f["met"] for f in report["slide_floors"].values())
        if slide_method != method:
            report[f"{method}_slide_floors"] = floors_of(t, method)
            ok &= all(f["met"] for f in report[f"{method}_slide_floors"].values())
        means = t.xs("average", level="tissue")["dice"]
        report["slide_mean_dice"] = {m: round(float(v), 2) for m, v in means.items()}
        if method in means:
            best = means.drop(method).max() if len(means) > 1 else -np.inf
            met = bool(means[method] >= best - margin)
            report["omniseg_vs_baselines_slides"] = {"best_baseline": round(float(best), 2),
                                                     "met": met}  # fmt: skip
            ok &= met
    summaries = {
        p.parent.name: pd.read_csv(p).set_index("tissue")
        for p in sorted((results / "eval").glob("*/summary.csv"))
    }
    means = {m: float(s.loc["average", "dice_pct"]) for m, s in summaries.items()}
    report["table1_mean_dice"] = {m: round(v, 2) for m, v in means.items()}
    if method in means and len(means) > 1:
        best = max(v for m, v in means.items() if m != method)
        met = means[method] >= best - margin
        report["omniseg_vs_baselines_table1"] = {"best_baseline": round(best, 2), "met": met}
        ok &= met
    if method in summaries:
        above = {}
        for key in [k for k in summaries[method].index if k != "average"]:
            dice = float(summaries[method].loc[key, "dice_pct"])
            trivial = trivial_dice(results, key)
            above[key] = {"dice": round(dice, 2), "trivial": round(trivial, 2),
                          "met": dice > trivial}  # fmt: skip
            ok &= dice > trivial
        report["omniseg_above_trivial"] = above
        dice = float(summaries[method].loc["average", "dice_pct"])
        trivial = float(np.mean([v["trivial"] for v in above.values()]))
        met = dice >= trivial + 10  # the demo test's bar before a third of the masks were empty
        report["omniseg_mean_10_above_trivial_mean"] = {
            "dice": round(dice, 2), "trivial": round(trivial, 2), "met": met
        }  # fmt: skip
        ok &= met
    report["all_met"] = bool(ok)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="results")
    p.add_argument("--method", default="omniseg")
    p.add_argument("--margin", type=float, default=1.0, help="points below the best baseline")
    p.add_argument("--slide-method", default=None,
                   help="the method whose slide floors are checked (default: wsi.method of "
                   "config/config.yaml)")  # fmt: skip
    args = p.parse_args(argv)
    slide_method = args.slide_method or exported_method()
    try:
        report = check(Path(args.results), args.method, args.margin, slide_method)
    except ValueError as exc:
        print(f"demo_checks: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0 if report["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
