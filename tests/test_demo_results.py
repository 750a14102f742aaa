"""The default demo run learns: checks on the results of `snakemake --cores all`.

Run after the quick start (``.ci/run`` does): ``OMNISEG_DEMO_RESULTS=results pytest -m demo``.
Skipped otherwise: training the demo takes minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch

RESULTS = os.environ.get("OMNISEG_DEMO_RESULTS")
pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(
        not RESULTS, reason="set OMNISEG_DEMO_RESULTS to a finished demo's results/"
    ),
]


def chance_dice(results: Path, tissue: str) -> float:
    """Mean Dice of the best trivial answer on the test patches: all foreground or all empty."""
    masks = read_patch_set(results / "patches" / f"{tissue}.h5", split="test")["masks"] > 0
    full = dice_batch(np.ones_like(masks), masks).mean()
    empty = dice_batch(np.zeros_like(masks), masks).mean()
    return float(max(full, empty))


def test_omniseg_learns_well_above_chance():
    results = Path(RESULTS)
    summary = pd.read_csv(results / "eval/omniseg/summary.csv").set_index("tissue")
    tissues = [t for t in summary.index if t != "average"]
    chance = {t: chance_dice(results, t) for t in tissues}
    mean_chance = float(np.mean(list(chance.values())))
    mean_dice = float(summary.loc["average", "dice_pct"])
    assert mean_dice >= mean_chance + 10, (mean_dice, chance)
    above = [t for t in tissues if summary.loc[t, "dice_pct"] > chance[t] + 5]
    assert len(above) >= len(tissues) // 2, (summary["dice_pct"].to_dict(), chance)


def test_every_method_is_in_table1():
    results = Path(RESULTS)
    table = pd.read_csv(results / "tables/table1.csv")
    evaluated = {p.parent.name for p in (results / "eval").glob("*/summary.csv")}
    assert set(table["method"]) == evaluated and "omniseg" in evaluated


def test_every_method_segments_the_demo_slides():
    results = Path(RESULTS)
    table = pd.read_csv(results / "tables/slides.csv")
    evaluated = {p.parent.name for p in (results / "eval").glob("*/summary.csv")}
    assert set(table["method"]) == evaluated
    assert (table["slides"] >= 2).all()  # the demo scores two slides of different seeds
    assert table["dice"].between(0, 100).all() and table["raw_dice"].between(0, 100).all()
